"""Multi-device behaviour on 8 fake CPU devices, each check in its own process (XLA_FLAGS must
be set before jax is imported)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("name", ["buffer_sharded_equals_unsharded", "mesh_shapes", "harvest_sharded_equals_unsharded",
                                  "sae_step_is_data_parallel", "training_equals_one_device",
                                  "frozen_member_on_a_data_model_mesh", "binary_runs_and_resumes_on_eight_devices",
                                  "fidelity_sharded_equals_one_device", "backbones_run_under_explicit_sharding_axes"])
def test_on_eight_devices(name):
    root = os.path.dirname(HERE)  # the checkout on the path, as for a test run from it
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_checks.py"), name], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-4000:]
