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


def test_paper_scale_arithmetic_is_xlas_own():
    """benchmarks/paper_scale.py's table: per-device peak and FLOPs are XLA's numbers for the
    compiled program, and a predicted time is FLOPs x calls at half the chips' bf16 peak."""
    import pytest

    from benchmarks import paper_scale
    from saejax import sharding

    program = paper_scale.sae_step(16, 64, 32, 2, "tiny sweep", calls=10)
    fn, args = program.build(sharding.make_mesh(1, 1, jax.devices()[:1]))
    costs = paper_scale.compiled_costs(fn, args)
    compiled = fn.lower(*args).compile()
    m = compiled.memory_analysis()
    assert costs["peak"] == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                             + m.temp_size_in_bytes)
    assert costs["flops"] == compiled.cost_analysis()["flops"]
    # Two members, each an encoder and a decoder matmul forward and twice that backward.
    assert costs["flops"] >= 2 * 3 * 2 * (2 * 32 * 16 * 64)
    assert paper_scale.predicted_seconds(1e12, 10, "H100") == pytest.approx(1e13 / (0.5 * 989e12))
    assert paper_scale.predicted_seconds(1e12, 10, "v5e-8") == pytest.approx(1e13 / (0.5 * 197e12 * 8))
    assert paper_scale.overlapped_seconds(10.0, 4.0, 1.0) == 10.0  # the harvest hidden behind the steps
    assert paper_scale.overlapped_seconds(10.0, 4.0, 0.0) == 14.0
    assert paper_scale.overlapped_seconds(3.0, 4.0, 0.5) == 5.5
    assert paper_scale.duration(90) == "  90.0 s" and paper_scale.duration(7200) == "  2.00 h"
    # What does not fit is named: the program and mesh, or the host array.
    big = dict(costs, peak=81 * paper_scale.GIB, arguments=1 * paper_scale.GIB, temporaries=80 * paper_scale.GIB)
    assert paper_scale.over_limits("train_sae", {"tiny sweep": {"1 device": costs}}, {"batches": 1e9}) == []
    assert paper_scale.over_limits("train_sae", {"tiny sweep": {"1 device": big, "data=8": costs}},
                                   {"tokens": 65e9}) == [
        "train_sae: tiny sweep needs 81.0 GiB per device on 1 device (arguments 1.0, temporaries 80.0; limit 80)",
        "train_sae: 'tokens' holds 65.0 GB of host memory (limit 64)"]
