"""The `saejax` console script and `--config` names: every command is reachable, the shipped
configs resolve by name from anywhere, and a wrong command or config is an error that names it.
(The commands' work is tested through them elsewhere: test_synthetic_experiment runs
`saejax synthetic` from outside the checkout, CI runs a built wheel's `saejax demo` and
`saejax train` in a fresh environment.)"""

import importlib
import inspect
import os
import subprocess
import sys

import pytest

import saejax
from saejax import cli
from saejax.cli import entry
from test_readme import default_config

SAEJAX = os.path.join(os.path.dirname(sys.executable), "saejax")
CONFIGS = os.path.join(os.path.dirname(saejax.__file__), "configs")


def saejax_command(*args, cwd):
    return subprocess.run([SAEJAX, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_and_shipped_config(tmp_path):
    out = saejax_command("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out.stdout
    shipped = sorted(f.removesuffix(".py") for f in os.listdir(CONFIGS) if f.endswith(".py")
                     and f not in ("__init__.py", "paper.py"))
    assert entry.shipped_configs() == shipped and ", ".join(shipped) in out.stdout
    version = saejax_command("--version", cwd=tmp_path)
    assert version.stdout.split()[:2] == ["saejax", saejax.__version__] and "jax" in version.stdout


def test_every_command_has_run_main_and_an_existing_default_config():
    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(f"saejax.cli.{module_name}")
        assert list(inspect.signature(module.run).parameters)[:2] == ["config", "workdir"], name
        default = default_config(module.__name__)
        assert os.path.isfile(os.path.join(CONFIGS, default)), (name, default)
        # The checkout's `python -m experiments.NAME` runs the same main.
        assert importlib.import_module(f"experiments.{module_name}").main is module.main


def test_a_commands_help_shows_its_docstring_and_flags(tmp_path):
    out = saejax_command("train-vit", "--help", cwd=tmp_path)  # hyphens work too
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: saejax train_vit --workdir=DIR")
    assert inspect.getdoc(importlib.import_module("saejax.cli.train_vit")).splitlines()[0] in out.stdout
    for flag in ("--workdir", "--config", "--import_modules", "--peer_timeout_s"):
        assert f"  {flag}:" in out.stdout, flag
    assert "(default shapes_vit;" in " ".join(out.stdout.split())  # --config's default, named


@pytest.mark.parametrize("value, expected", [
    ("clip_vit_b16", "clip_vit_b16.py"),
    ("clip_vit_b16:small", "clip_vit_b16.py:small"),
    ("clip_vit_b16.py:small", "clip_vit_b16.py:small"),
    (":small", "shapes_demo.py:small"),  # the command's own config
    ("experiments/configs/cub.py:small", "cub.py:small"),  # a checkout's old path
])
def test_config_names_resolve_to_the_shipped_files(value, expected):
    assert entry.resolve_config(value, "shapes_demo.py") == os.path.join(CONFIGS, expected)


def test_an_existing_file_is_used_as_given(tmp_path):
    mine = tmp_path / "clip_vit_b16.py"  # a user's own file wins over the shipped one of that name
    mine.write_text("def get_config(arg=''):\n    return {}\n")
    assert entry.resolve_config(f"{mine}:small", "x.py") == f"{mine}:small"


@pytest.mark.parametrize("value", ["clip_vit_b61", "/home/me/configs/clip_vit_b16.py", "paper", "__init__"])
def test_a_wrong_config_is_an_error_naming_it(value):
    with pytest.raises(ValueError, match=rf"--config={value}: .* is neither a file nor a config shipped with "
                                         rf"saejax \(ade20k, .*clip_vit_b16"):
        entry.resolve_config(value, "clip_vit_b16.py")


def test_wrong_commands_and_configs_exit_2_naming_them(tmp_path):
    out = saejax_command("trian", cwd=tmp_path)
    assert out.returncode == 2 and "saejax: no command 'trian'" in out.stderr and "commands:" in out.stderr
    out = saejax_command("train", "--config=clip_vit_b61:small", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2 and "--config=clip_vit_b61:small: 'clip_vit_b61' is neither a file" in out.stderr
    assert not (tmp_path / "run").exists()
