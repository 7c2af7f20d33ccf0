"""An architecture registered from user code (`tests/registered_architecture.py`) trains through
the `train_sae` binary's sweep, its checkpoints and the portable format, like the built-in ones."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.configs import clip_vit_b16
from saejax.cli.builders import train_sae, validate_config
from saejax import sae
from saejax.checkpoint import load_sae

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "shifted_relu_from_a_test"


@pytest.fixture(autouse=True)
def registered():
    """Registered in this process for this module's tests only, so other tests see the built-in list."""
    sae.register(importlib.import_module("tests.registered_architecture").ShiftedReluArchitecture)
    yield
    del sae.ARCHITECTURE_REGISTRY[NAME]


def test_an_architecture_no_module_registered_is_refused_by_name():
    config = clip_vit_b16.get_config("small")
    config.sae.architecture = NAME
    validate_config(config)  # registered (by the fixture)
    del sae.ARCHITECTURE_REGISTRY[NAME]
    try:
        with pytest.raises(ValueError, match=f"sae.architecture must be one of relu, topk, batchtopk, jumprelu, "
                                             f"gated, got '{NAME}'"):
            validate_config(config)
    finally:
        sae.register(importlib.import_module("tests.registered_architecture").ShiftedReluArchitecture)


def test_a_registered_architecture_is_listed_and_built_by_name():
    assert NAME in sae.architectures()
    ae = sae.create(NAME, 8, 32)
    assert ae.arch is sae.ARCHITECTURE_REGISTRY[NAME] and not ae.tied_init
    assert sae.create("topk", 8, 32, k=4).tied_init  # a built-in one keeps its constructor's defaults
    with pytest.raises(ValueError, match="unknown SAE architecture 'not_registered'"):
        sae.create("not_registered", 8, 32)


def test_a_registered_architecture_trains_resumes_and_exports(tmp_path):
    overrides = [f"--config.sae.architecture={NAME}", "--config.total_tokens=3072", "--config.checkpoint_every=6",
                 "--config.fidelity.images=0"]
    command = [sys.executable, "-m", "experiments.train_sae", "--config=clip_vit_b16:small",
               f"--workdir={tmp_path}", *overrides]
    out = subprocess.run(command + ["--import_modules=tests.registered_architecture"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "6"]

    config = clip_vit_b16.get_config("small")  # resumed in this process: its last checkpoint is the end
    config.sae.architecture, config.total_tokens, config.checkpoint_every, config.fidelity.images = NAME, 3072, 6, 0
    run = train_sae(config, str(tmp_path))
    members = json.load(open(tmp_path / "eval.json"))["members"]
    assert [m["member"] for m in members] == [0, 1]  # the 2-member sweep
    ae, params, info = load_sae(members[1]["path"])
    assert ae.architecture == NAME and info["layer"] == 1 and info["steps"] == 12
    np.testing.assert_array_equal(np.asarray(params.w_enc), np.asarray(run.states[1].params.w_enc[1]))

    x = jax.random.normal(jax.random.key(0), (64, ae.d_model))
    pre = ae.pre_activations(params, x)
    np.testing.assert_allclose(ae.encode(params, x), jnp.maximum(pre - 0.1, 0.0), atol=1e-6)
    assert bool(jnp.any((pre > 0) & (pre < 0.1)))  # where this differs from plain ReLU
