import json
import os
import subprocess
import sys

import jax
import numpy as np

from saejax.checkpoint import load_sae
from saejax.datasets import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SAEJAX = os.path.join(os.path.dirname(sys.executable), "saejax")  # the installed console script


def run_binary(workdir, steps, *, console_script):
    """`saejax synthetic` from outside the checkout, or `python -m experiments.synthetic` in it."""
    command = [SAEJAX, "synthetic"] if console_script else [sys.executable, "-m", "experiments.synthetic"]
    out = subprocess.run(command + [f"--workdir={workdir}", "--config=synthetic:small", f"--config.steps={steps}"],
                         cwd=workdir.parent if console_script else ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_synthetic_binary_trains_exports_and_resumes(tmp_path):
    first = run_binary(tmp_path, 20, console_script=True)
    assert "step 20/20" in first
    second = run_binary(tmp_path, 30, console_script=False)  # the checkout's entry resumes the same run
    assert "resumed from step 20" in second and "step 30/30" in second

    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["steps"] == 30 and len(summary["members"]) == 2
    member = summary["members"][1]
    assert {"nmse", "l0", "dead_fraction", "dense_fraction", "features_recovered", "explained_variance"} <= set(member)
    ae, params, info = load_sae(member["path"])
    assert (ae.d_model, ae.d_sae) == (16, 128) and info["normalization"] is not None
    world = synthetic.make_world(jax.random.split(jax.random.key(0), 5)[0], d_model=16, n_features=64,
                                 mean_active=2.0, noise=0.01)
    recovered, _ = synthetic.feature_recovery(world.features, params.w_dec)
    np.testing.assert_allclose(recovered, member["features_recovered"])
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in logged if r["member"] == 0] == [5, 10, 15, 20, 25, 30]


def test_world_stream_is_a_pure_function_of_the_step():
    world = synthetic.make_world(jax.random.key(0), d_model=8, n_features=16)
    straight = synthetic.WorldStream(world, jax.random.key(1), 4, layer=3)
    batches = [next(straight)[3] for _ in range(4)]
    assert straight.position() == {"step": 4} and not np.allclose(batches[0], batches[1])
    resumed = synthetic.WorldStream(world, jax.random.key(1), 4, layer=3, position={"step": 2})
    np.testing.assert_array_equal(next(resumed)[3], batches[2])
