"""The numbers the benchmarks print come from these helpers: FLOP counts and device peaks."""

import os
import types

import jax
import jax.numpy as jnp

from benchmarks import peak
from benchmarks.harvest import harvest_flops
from saejax import backbones

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


def test_harvest_flop_count_matches_xla_cost_analysis():
    """The analytic count of a ViT forward (the MFU numerator) against XLA's own count of the
    compiled forward, which also counts the elementwise work (norms, softmax, GELU): a few
    percent above, never below."""
    bb, params = backbones.load(os.path.join(FIXTURES, "clip_vision"), cache_dir=False)
    x = jnp.zeros((4, bb.image_size, bb.image_size, 3))
    forward = jax.jit(lambda p, im: bb.forward(p, im, capture=(1,), full=False).captured[1])
    counted = forward.lower(params, x).compile().cost_analysis()["flops"]
    ours = 4 * harvest_flops(bb, n_blocks=2)
    assert ours < counted < 1.3 * ours, (ours, counted)


def test_peak_table_lookups():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert peak.peak_tflops(device("NVIDIA H100 80GB HBM3"), "bfloat16") == 989.0
    assert peak.peak_tflops(device("NVIDIA H100 PCIe"), "bfloat16") == 756.0
    assert peak.peak_tflops(device("TPU v5 lite"), "bfloat16") == 197.0
    assert peak.peak_tflops(device("TPU v5p"), "bfloat16") == 459.0
    assert peak.peak_tflops(device("NVIDIA A100-SXM4-80GB"), "float32") == 19.5
    assert peak.peak_tflops(device("cpu"), "bfloat16") is None
    assert peak.peak_tflops(device("cpu"), "bfloat16", override=2.5) == 2.5
    assert peak.mfu(494.5e12, 989.0) == "50.0%" and peak.mfu(1e9, None) == "-"
    assert "CPU" in peak.cpu_matrix_units()
