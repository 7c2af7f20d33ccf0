"""The train_sae binary end to end: a `:small` config, preemption (SIGTERM), a hard kill
(SIGKILL) and resumption to the same parameters as an uninterrupted run; NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import clip_vit_b16
from experiments.sae_training import build_trainer
from saejax.checkpoint import TrainCheckpointer, load_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/clip_vit_b16.py:small"


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
    for member in evaluation["members"]:
        assert {"l0", "mse", "nmse", "explained_variance", "dead_fraction", "dense_fraction", "frequency",
                "mean_when_firing"} <= set(member)
        assert len(member["frequency"]) == 128 and 0 < member["nmse"] < 1.5
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["member"] == 0] == list(range(1, 151))
    assert {r["layer"] for r in lines} == {1}
    assert os.listdir(workdir / "tensorboard")
    ae, params, info = load_sae(workdir / "sae" / "layer_1" / "member_0")
    assert (ae.d_model, ae.d_sae) == (32, 128) and info["layer"] == 1 and info["normalization"] is not None


def test_preempted_and_killed_runs_resume_to_the_same_parameters(uninterrupted, tmp_path):
    straight, backbone_dir, _ = uninterrupted
    code, stdout, stderr = run_until_checkpoint_then(signal.SIGTERM, tmp_path, backbone_dir, after_step=30)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM at step" in stdout and "saved a checkpoint" in stdout
    code, _, stderr = run_until_checkpoint_then(signal.SIGKILL, tmp_path, backbone_dir, after_step=80)
    assert code == -signal.SIGKILL, stderr[-3000:]
    resumed_at = TrainCheckpointer(tmp_path / "checkpoints").latest_step()
    assert 80 <= resumed_at < 150
    out = run(tmp_path, backbone_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from step {resumed_at}" in out.stdout
    for got, want in zip(final_params(tmp_path), final_params(straight)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)


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


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_one_builder_makes_every_architecture_from_a_config(architecture):
    config = clip_vit_b16.get_config("small")
    config.sae.architecture, config.sae.k = architecture, 4
    config.objective.sparsity = "l0" if architecture == "jumprelu" else "l1"
    trainer, hparams = build_trainer(config, d_model=32)
    assert (trainer.ae.architecture, trainer.ae.d_sae) == (architecture, 128)
    assert trainer.ae.k == (4 if "topk" in architecture else None)
    config.sae.d_sae = 48  # an explicit size wins over the expansion (the synthetic configs give one)
    assert build_trainer(config, d_model=32)[0].ae.d_sae == 48
