"""Peak matmul throughput of common accelerators, for the MFU columns of the benchmarks.

`peak_tflops(device, dtype)` looks the device's `device_kind` up in `PEAK_TFLOPS` (dense, no
sparsity; vendor datasheet figures); `--peak_tflops` on a benchmark overrides it. On a CPU
there is no table entry: `cpu_matrix_units()` says whether the CPU has bf16 matrix units
(AMX) or bf16 dot-product instructions, i.e. whether bf16 can be expected to beat float32.
"""

from __future__ import annotations

# device_kind substring -> (bf16 TFLOP/s, float32 TFLOP/s without TF32). First match wins.
PEAK_TFLOPS = {
    "TPU v6 lite": (918.0, None),  # Trillium (v6e); TPUs run float32 matmuls as bf16 passes
    "TPU v5 lite": (197.0, None),  # v5e
    "TPU v5p": (459.0, None),
    "TPU v5": (459.0, None),
    "TPU v4": (275.0, None),
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),  # SXM
    "A100": (312.0, 19.5),
    "L4": (121.0, 30.3),
    "A10G": (70.0, 31.2),
}


def peak_tflops(device, dtype: str, override: float = 0.0) -> float | None:
    """The device's peak TFLOP/s for matmuls in `dtype` ("bfloat16" or "float32"), or None."""
    if override:
        return override
    for kind, (bf16, f32) in PEAK_TFLOPS.items():
        if kind in device.device_kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def cpu_matrix_units() -> str:
    """What this CPU offers bf16 matmuls, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown CPU (no /proc/cpuinfo): bf16 may or may not be faster than float32"
    if "amx_bf16" in flags:
        return "CPU with AMX bf16 matrix units: bf16 matmuls are expected to beat float32"
    if "avx512_bf16" in flags:
        return "CPU with AVX-512 BF16 (no AMX): bf16 may beat float32 modestly"
    return "CPU without bf16 matrix units (e.g. AMD Zen 3): bf16 is not expected to beat float32"


def mfu(flops_per_s: float | None, peak: float | None) -> str:
    """MFU as a percentage string, or '-' when the peak or the FLOPs are unknown."""
    if not flops_per_s or not peak:
        return "-"
    return f"{100 * flops_per_s / (peak * 1e12):.1f}%"
