"""README's and the user guide's examples run as written, top to bottom in one namespace, as a
reader would, README first and then the guide's pages in the order of the docs' table of contents
(docs/index.md), then BUILD.md: each
Python block, with the sizes a 2-core machine can run (named below, block by block: the
hub's models become a tiny random CLIP of the same depth, 768 becomes its width 32, long runs
become a few steps) and its free names (`x`, `images_uint8`, ...) given small arrays. The
shell blocks' commands name modules and config files that exist, and every `--config.KEY`
they set is a key of that config."""

import importlib
import os
import pathlib
import re
import shlex

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

import saejax
from saejax import cli
from saejax.cli import entry
from saejax.datasets import real_files
from test_pretrained import cache_with
from test_saev_import import _random_sae, _write_torch_sae

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE_PAGES = [ROOT / "docs" / f"{page}.md"
               for page in re.findall(r"^(guide/[\w-]+)$", (ROOT / "docs" / "index.md").read_text(), re.M)]
README = "\n".join(path.read_text() for path in [ROOT / "README.md", *GUIDE_PAGES, ROOT / "BUILD.md"])
BLOCK = re.compile(r"^( *)```(\S*)[^\n]*\n(.*?)^\1```", re.S | re.M)  # the language, then MyST's `{include} path`


def blocks(language):
    for m in BLOCK.finditer(README):
        if m.group(2) == language:
            indent = len(m.group(1))
            yield "\n".join(line[indent:] for line in m.group(3).splitlines())


# What each Python block needs, keyed by its first line: names it uses without defining, and
# the substitutions that shrink it. A new block without an entry fails the test.
SMALL_RUN = [("steps=2_000", "steps=3"), ("ProgressBar(2_000", "ProgressBar(3"), ("batch_size=4096", "batch_size=64"),
             ("image_batch_size=64", "image_batch_size=8"), ("buffer_tokens=2**18", "buffer_tokens=2**9")]
SETUP = {
    "import jax, optax, saejax\nfrom saejax.core.train import Hparams": (
        "x = jax.random.normal(jax.random.key(1), (16, 32)); sample = jax.random.normal(jax.random.key(2), (64, 32))\n"
        "x_batch = jax.random.normal(jax.random.key(3), (64, 32))", [("768", "32")]),
    'bb, bb_params = saejax.backbones.load("openai/clip-vit-base-patch16")': (
        "images_uint8 = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)\n"
        "max_4213 = 3.0; patch_mask = jnp.arange(17) > 0; norm = saejax.normalization.Normalization.identity(32)", []),
    'source = saejax.data.HfDatasetSource("ILSVRC/imagenet-1k"': ("", []),
    "import jax, saejax\nfrom saejax import data, loop, sae, sharding, stream, train": ("", [("768", "32")] + SMALL_RUN),
    "from saejax.run import RunSpec, run_training": ("", [("total_tokens=100_000_000", "total_tokens=64 * 4"),
                                                          ("mesh=mesh,", "mesh=mesh, normalization_samples=512, "
                                                                         "eval_images=8, fidelity_images=8,")]
                                                     + SMALL_RUN),
    "site = saejax.site.Site(bb, bb_params, layer=10, ae=ae, sae_params=params)": (
        "probe = saejax.probes.LinearProbe(jnp.zeros((32, 5)), jnp.zeros(5)); patches = [0, 5]\n"
        "pixels = bb.preprocess(images_uint8[:1]); latents = jnp.asarray([3]); maxima = jnp.asarray([2.0])\n"
        "ae, params = saejax.sae.relu(32, 64), saejax.sae.relu(32, 64).init(jax.random.key(0))", []),
    'ae, params, info = saejax.checkpoint.import_saev("path/to/sae.pt")': ("", []),
}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A tiny random CLIP of ViT-B's depth in place of the hub's, image folders, a hub cache."""
    clip = saejax.backbones.create_random("clip", str(tmp_path / "clip"), seed=0, hidden_size=32, num_hidden_layers=12,
                                          num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    load = saejax.backbones.load
    monkeypatch.setattr(saejax.backbones, "load", lambda name, **kw: load(
        clip if name == "openai/clip-vit-base-patch16" else name, **{**kw, "cache_dir": False}))
    rng = np.random.default_rng(0)
    for folder, n in (("images", 24), ("val", 10)):
        (tmp_path / folder).mkdir()
        for i in range(n):  # real photos' sizes, aspect ratios and pixel formats
            width, height = real_files.photo_size(rng, 40)
            kind = real_files.FORMATS[i % len(real_files.FORMATS)]
            real_files.save_photo(tmp_path / folder / f"{i}.{'png' if kind == 'png_rgba' else 'jpg'}",
                                  rng.integers(0, 256, (height, width, 3), dtype=np.uint8), kind)
    hub = tmp_path / "hub"
    cache_with(hub, "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K",
               _write_torch_sae(tmp_path / "sae.pt", _random_sae(d=768, f=768), config={"d_vit": 768, "exp_factor": 1}))
    # A Hugging Face data set in place of ImageNet: saved (train, validation) and as parquet.
    cells = [{"bytes": open(tmp_path / "images" / name, "rb").read(), "path": None}
             for name in sorted(os.listdir(tmp_path / "images"))]
    imagenet = datasets.Dataset.from_dict({"image": cells, "label": [i % 3 for i in range(len(cells))]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "label": datasets.ClassLabel(num_classes=3)}))
    datasets.DatasetDict({"train": imagenet, "validation": imagenet.select(range(8))}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "shards").mkdir()
    imagenet.to_parquet(str(tmp_path / "shards" / "train-0.parquet"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return {"/data/images": str(tmp_path / "images"), "/data/val": str(tmp_path / "val"),
            "/tmp/run": str(tmp_path / "run"), "path/to/sae.pt": str(ROOT / "tests" / "fixtures" / "saev_sae.pt"),
            "ILSVRC/imagenet-1k": str(tmp_path / "hf"), "/data/birds_saved": str(tmp_path / "hf"),
            "/data/shards/*.parquet": str(tmp_path / "shards" / "*.parquet")}


def test_the_python_examples_run(world):
    namespace = {"jax": jax, "jnp": jnp, "np": np, "saejax": saejax}
    ran = []
    for code in blocks("python"):
        key = next((k for k in SETUP if code.startswith(k)), None)
        assert key is not None, f"a README example without an entry in SETUP: {code.splitlines()[0]!r}"
        setup, substitutions = SETUP[key]
        for old, new in substitutions + list(world.items()):
            code = code.replace(old, new)
        exec(setup, namespace)  # noqa: S102
        exec(compile(code, f"README: {key.splitlines()[0]}", "exec"), namespace)  # noqa: S102
        ran.append(key)
    assert ran == list(SETUP)  # every entry is a block, in reading order
    # What the examples claim, checked on what they left behind.
    assert namespace["out"].captured[10].shape == (2, 17, 32)
    assert namespace["trained"].evaluation["members"][0]["layer"] == 10
    assert os.path.isfile(os.path.join(world["/tmp/run"], "sae", "layer_10", "member_1", "config.json"))
    assert namespace["probs_SK"].shape == (41, 5)
    assert namespace["info"]["layer"] == 10 and float(namespace["info"]["normalization"].scalar) > 2


def default_config(module: str) -> str | None:
    """The config file a command reads without --config (its `run_binary(..., "file.py")`):
    `saejax.cli.NAME`, or `experiments.NAME`, which runs it."""
    path = ROOT / "saejax" / "cli" / (module.rpartition(".")[2] + ".py")
    found = re.search(r'run_binary\("\w+", run, "([\w.]+)"', path.read_text()) if path.is_file() else None
    return found.group(1) if found else None


def shell_commands() -> list[tuple[str, list[str]]]:
    """`(module, words)` of every `python -m MODULE ...` and `saejax COMMAND ...` in the shell
    blocks and the text; "[--flag]" and "file.py[:small]" mark what may be left out."""
    inline = re.findall(r"`((?:python -m|saejax) [^`]+)`", README.replace("\n", " "))
    text = " ".join([" ".join(line.rstrip("\\") for line in code.splitlines()) for code in blocks("bash")] + inline)
    text = re.sub(r"(?:^|(?<=[\s/`]))saejax (?=[a-z])", "\0saejax:", text.replace("python -m ", "\0module:"))
    found = []
    for command in text.split("\0")[1:]:
        kind, _, rest = command.partition(":")
        words = [w.strip("[]") for w in shlex.split(rest.split("#")[0].split("&&")[0])]
        if kind == "saejax":
            assert words[0].replace("-", "_") in cli.COMMANDS, f"the docs run a command that does not exist: saejax {words[0]}"
            words[0] = "saejax.cli." + cli.COMMANDS[words[0].replace("-", "_")][0]
        if re.fullmatch(r"[a-z0-9_.]+", words[0]):  # not a placeholder, as in `python -m experiments.NAME`
            found.append((words[0], words))
    return found


def test_the_shell_examples_name_real_modules_configs_and_keys():
    checked = 0
    for module, words in shell_commands():
        assert importlib.util.find_spec(module) is not None, f"the docs run a module that does not exist: {module}"
        default = default_config(module)
        value = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), default)
        if value is None or "..." in value:
            continue
        path, _, variant = entry.resolve_config(value.replace("[", ""), default).partition(":")
        spec = importlib.util.spec_from_file_location("readme_config", path)
        config_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config_module)
        for config in [config_module.get_config(v) for v in ({variant, ""} if "[:" in value else {variant})]:
            for word in words:
                if word.startswith("--config."):
                    key = word.split("=", 1)[0].removeprefix("--config.")
                    node = config
                    for part in key.split("."):
                        assert part in node, f"the docs set --config.{key}, which {path} does not have"
                        node = node[part]
        checked += 1
    assert checked >= 15  # README's commands with a config, in blocks and in the text
