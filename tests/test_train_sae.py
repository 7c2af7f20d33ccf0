"""The train_sae binary end to end: a `:small` config, preemption (SIGTERM) and resumption to
the same parameters as an uninterrupted run (SIGKILL at random moments: tests/test_faults.py);
NaN handling."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import saejax

from saejax.configs import clip_vit_b16
from saejax.cli.builders import build_trainer
from saejax.checkpoint import TrainCheckpointer, load_sae
from conftest import chromium_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "clip_vit_b16:small"


def command(workdir, backbone_dir, *overrides):
    return [sys.executable, "-m", "experiments.train_sae", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.backbone.random.directory={backbone_dir}", "--config.total_tokens=38400",  # 150 steps
            "--config.checkpoint_every=10", *overrides]


def run(workdir, backbone_dir, *overrides, env=None):
    out = subprocess.run(command(workdir, backbone_dir, *overrides), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    return out


def run_until_checkpoint_then(sig, workdir, backbone_dir, after_step, *overrides):
    """Start the binary, send `sig` once a checkpoint of `after_step` or later exists; the
    deadline only bounds the wait."""
    proc = subprocess.Popen(command(workdir, backbone_dir, *overrides), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpts = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        if steps and max(steps) >= after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def final_params(workdir):
    return [load_sae(os.path.join(str(workdir), "sae", "layer_1", f"member_{i}"))[1] for i in range(2)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    backbone_dir = str(tmp_path_factory.mktemp("backbone") / "tiny_clip")
    workdir = tmp_path_factory.mktemp("straight")
    out = run(workdir, backbone_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, backbone_dir, out


def test_small_config_trains_logs_evaluates_and_exports(uninterrupted):
    workdir, _, out = uninterrupted
    assert "layer 1 member 1: lr 0.003" in out.stdout
    evaluation = json.load(open(workdir / "eval.json"))
    assert evaluation["steps"] == 150 and len(evaluation["members"]) == 2
    # Which saejax wrote the run's files: eval.json, the exported SAEs, the report page.
    assert evaluation["written_by"] == saejax.written_by()
    for member in evaluation["members"]:
        assert json.load(open(os.path.join(member["path"], "config.json")))["written_by"] == saejax.written_by()
    assert f"Written by saejax {saejax.__version__}" in open(workdir / "report.html").read()
    for member in evaluation["members"]:
        assert {"l0", "mse", "nmse", "explained_variance", "dead_fraction", "dense_fraction", "frequency",
                "mean_when_firing", "cosine", "l2_ratio", "relative_reconstruction_bias", "log10_frequency_histogram",
                "encoder_decoder_cosine", "max_decoder_cosine", "near_duplicate_fraction", "fidelity_pooled",
                "pooled_cosine"} <= set(member)
        assert len(member["frequency"]) == 128 and 0 < member["nmse"] < 1.5
        assert member["n_images"] == 32 and "kl_spliced" not in member  # a random CLIP: no head, pooled fidelity
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["member"] == 0] == list(range(1, 151))
    assert {r["layer"] for r in lines} == {1}
    assert os.listdir(workdir / "tensorboard")
    ae, params, info = load_sae(workdir / "sae" / "layer_1" / "member_0")
    assert (ae.d_model, ae.d_sae) == (32, 128) and info["layer"] == 1 and info["normalization"] is not None


def test_the_sweep_report_in_headless_chromium(uninterrupted, tmp_path):
    """report.html as a person reads it: both scatter plots with a point per member and the
    Pareto front marked, loss curves, a density histogram per member, and a table whose numbers
    are eval.json's."""
    from playwright.sync_api import sync_playwright

    workdir, _, _ = uninterrupted
    members = json.load(open(workdir / "eval.json"))["members"]
    errors = []
    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=chromium_path(),
                                   args=["--no-sandbox"])
        page = chrome.new_page(viewport={"width": 1200, "height": 1400})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{workdir / 'report.html'}")
        scatters = page.locator("svg.scatter")
        assert scatters.count() == 2  # L0 vs NMSE, L0 vs fidelity
        for i in range(2):
            assert scatters.nth(i).locator("circle.point").count() == 2
            assert scatters.nth(i).locator("circle.front-point").count() >= 1
        assert "L0 vs fidelity_pooled" in scatters.nth(1).text_content()
        assert page.locator("polyline").count() >= 2  # loss and NMSE curves, one line per member
        assert page.locator(".density svg").count() == 2
        rows = page.locator("table.metrics tr.member")
        assert rows.count() == 2
        header = page.locator("table.metrics th").all_inner_texts()
        nmse_column = header.index("NMSE")
        for row, member in zip(range(2), members):
            cells = rows.nth(row).locator("td").all_inner_texts()
            assert float(cells[nmse_column]) == pytest.approx(member["nmse"], abs=1e-4)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        chrome.close()
    assert not errors


def test_pareto_front_by_hand():
    from saejax.run.report import pareto_front

    l0 = [10, 20, 30, 20, 5, float("nan")]
    nmse = [0.5, 0.2, 0.1, 0.3, 0.9, 0.0]
    np.testing.assert_array_equal(pareto_front(l0, nmse), [True, True, True, False, True, False])
    fidelity = [0.9, 0.8, 0.95, 0.95, 0.1, 1.0]
    np.testing.assert_array_equal(pareto_front(l0, fidelity, maximize=True), [True, False, False, True, True, False])


def test_a_preempted_run_resumes_to_the_same_parameters(uninterrupted, tmp_path):
    """SIGTERM saves and stops; the rerun ends where an uninterrupted run does (SIGKILL at random
    moments: tests/test_faults.py)."""
    straight, backbone_dir, _ = uninterrupted
    code, stdout, stderr = run_until_checkpoint_then(signal.SIGTERM, tmp_path, backbone_dir, after_step=30)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM at step" in stdout and "saved a checkpoint" in stdout
    resumed_at = TrainCheckpointer(tmp_path / "checkpoints").latest_step()
    assert 30 <= resumed_at < 150
    out = run(tmp_path, backbone_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from step {resumed_at}" in out.stdout
    for got, want in zip(final_params(tmp_path), final_params(straight)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    # Steps logged after the last checkpoint and replayed on resume are written once.
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["member"] == 0] == list(range(1, 151))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
    _, backbone_dir, _ = uninterrupted
    out = run(tmp_path, backbone_dir, "--config.sweep.learning_rate=(1e30,)", "--config.checkpoint_every=1",
              "--config.optimizer.warmup_steps=0")
    assert out.returncode != 0
    assert "NonFiniteLossError" in out.stderr and "The newest checkpoint" in out.stderr
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    step = ckpt.latest_step()
    assert step is not None and step < 150
    config = clip_vit_b16.get_config("small")
    config.sweep.learning_rate = (1e30,)
    trainer, hparams = build_trainer(config, d_model=32)
    state = ckpt.restore({"1": jax.eval_shape(lambda: trainer.init_sweep(jax.random.key(0), hparams))}).state["1"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_one_builder_makes_every_architecture_from_a_config(architecture):
    config = clip_vit_b16.get_config("small")
    config.sae.architecture, config.sae.k = architecture, 4
    config.objective.sparsity = "l0" if architecture == "jumprelu" else "l1"
    trainer, hparams = build_trainer(config, d_model=32)
    assert (trainer.ae.architecture, trainer.ae.d_sae) == (architecture, 128)
    assert trainer.ae.k == (4 if "topk" in architecture else None)
    config.sae.d_sae = 48  # an explicit size wins over the expansion (the synthetic configs give one)
    assert build_trainer(config, d_model=32)[0].ae.d_sae == 48


def test_resuming_with_a_changed_config_is_refused_unless_allowed(uninterrupted, tmp_path):
    straight, backbone_dir, _ = uninterrupted
    for override, key, change in (("--config.sweep.learning_rate=(1e-2,3e-2)", "sweep.learning_rate",
                                   "[0.001, 0.003] -> [0.01, 0.03]"),
                                  ("--config.layers=(0,)", "layers", "[1] -> [0]")):
        out = run(straight, backbone_dir, override)
        assert out.returncode == 1
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("train_sae failed: ConfigChangedError: the config differs") and change in last
        assert f"--allow_config_change={key}" in last
    assert TrainCheckpointer(straight / "checkpoints").latest_step() == 150  # nothing was touched

    workdir = tmp_path / "changed"
    shutil.copytree(straight, workdir)
    out = run(workdir, backbone_dir, "--config.total_tokens=40960", "--config.sweep.learning_rate=(1e-2,3e-2)",
              "--allow_config_change=sweep.learning_rate")  # 160 steps: 10 more at the new rates
    assert out.returncode == 0 and "resuming from step 150" in out.stdout, out.stderr[-3000:]
    members = json.load(open(workdir / "eval.json"))["members"]
    assert [m["learning_rate"] for m in members] == pytest.approx([1e-2, 3e-2])


def test_a_second_run_on_a_busy_workdir_fails_at_once(uninterrupted, tmp_path):
    from saejax.checkpoint.workdir import WorkdirLock

    _, backbone_dir, _ = uninterrupted
    with WorkdirLock(tmp_path):
        out = run(tmp_path, backbone_dir)
    assert out.returncode == 1
    assert f"is in use by PID {os.getpid()} on host" in out.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unreadable_images_stop_the_run_in_one_line_or_are_skipped_and_counted(uninterrupted, tmp_path):
    from PIL import Image

    _, backbone_dir, _ = uninterrupted
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("validation", 16)):
        os.makedirs(tmp_path / split)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
    (tmp_path / "train" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    config_file = tmp_path / "folder_config.py"
    config_file.write_text(
        "from saejax.configs.clip_vit_b16 import get_config as small\n"
        "def get_config():\n"
        "    c = small('small')\n"
        f"    c.data = dict(kind='folder', train_dir={str(tmp_path / 'train')!r}, "
        f"validation_dir={str(tmp_path / 'validation')!r}, image_size=32, seed=0, skip_unreadable=False)\n"
        "    c.eval_images = 16\n"
        "    return c\n")
    args = [f"--config={config_file}", f"--config.backbone.random.directory={backbone_dir}",
            "--config.total_tokens=5120"]

    def binary(workdir, *more):
        return subprocess.run([sys.executable, "-m", "experiments.train_sae", f"--workdir={workdir}", *args, *more],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    out = binary(tmp_path / "strict")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("train_sae failed: UnreadableImageError:")
    assert "bad.jpg" in out.stderr.strip().splitlines()[-1]
    out = binary(tmp_path / "lenient", "--config.data.skip_unreadable=True")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped 1 unreadable images" in out.stdout
    lines = [json.loads(line) for line in open(tmp_path / "lenient" / "metrics.jsonl")]
    assert len(lines) == 2 * 20 and {r["skipped_images"] for r in lines} == {1}


def test_bad_configs_fail_before_any_work():
    from saejax.cli.builders import validate_config

    config = clip_vit_b16.get_config("small")
    config.log_every, config.checkpoint_every, config.sae.architecture = 0, -1, "topk"
    config.sae.k = None
    with pytest.raises(ValueError, match=r"log_every must be an integer >= 1, got 0; checkpoint_every must be an "
                                         r"integer >= 0, got -1; .*sae.k must be an integer >= 1, got None"):
        validate_config(config)
    config = clip_vit_b16.get_config("small")
    config.sae.architecture = "topk"  # --config.sae.architecture=topk alone works: k has a default
    validate_config(config)
    assert build_trainer(config, d_model=32)[0].ae.k == 8
    config.sae.architecture = "gelu"
    with pytest.raises(ValueError, match="sae.architecture must be one of relu, topk, batchtopk, jumprelu, gated, "
                                         "got 'gelu'"):
        validate_config(config)


def test_normalization_statistics_are_keyed_to_backbone_layers_and_tokens(uninterrupted):
    from saejax.cli.builders import normalization_identity
    from saejax.run.training import cached_normalization

    def never():
        raise AssertionError("the saved statistics should have been read")

    straight, _, _ = uninterrupted
    path = os.path.join(straight, "normalization.npz")
    config = clip_vit_b16.get_config("small")
    assert set(cached_normalization(path, normalization_identity(config), (1,), never)) == {1}
    config.tokens = "all"
    with pytest.raises(ValueError, match=r"normalization.npz does not fit this run: it was estimated for "
                                         r"tokens: 'patches' -> 'all'"):
        cached_normalization(path, normalization_identity(config), (1,), never)
    config = clip_vit_b16.get_config("small")
    with pytest.raises(ValueError, match=r"layers \[0\] are not in it"):
        cached_normalization(path, normalization_identity(config), (0, 1), never)


def test_close_all_keeps_the_first_error():
    from saejax.run.training import close_all

    def full_disk():
        raise OSError(28, "No space left on device")

    def flush_fails():
        raise RuntimeError("tensorboardX: could not flush")

    closed = []
    with pytest.raises(OSError, match="No space left on device"):
        try:
            full_disk()
        finally:
            close_all(flush_fails, lambda: closed.append(1))
    assert closed == [1]
    with pytest.raises(RuntimeError, match="could not flush"):  # nothing else went wrong: its error counts
        close_all(flush_fails)


def test_a_diverging_member_is_frozen_and_the_sweep_finishes(uninterrupted, tmp_path):
    _, backbone_dir, _ = uninterrupted
    out = run(tmp_path, backbone_dir, "--config.sweep.learning_rate=(1e30,3e-3)", "--config.on_nonfinite=freeze",
              "--config.optimizer.warmup_steps=0", "--config.total_tokens=10240")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layer 1: sweep member(s) [0] diverged (NaN or Inf loss) and were frozen" in out.stdout
    members = json.load(open(tmp_path / "eval.json"))["members"]
    assert [m["frozen"] for m in members] == [True, False] and members[1]["nmse"] < 1.5
    last = {r["member"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["step"] == 40}
    assert (last[0]["frozen"], last[1]["frozen"]) == (1.0, 0.0)
