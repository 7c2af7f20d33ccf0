"""Resampling matrices that reproduce PyTorch's bicubic `F.interpolate` exactly.

DINOv2 resizes its learned position-embedding grid (e.g. 37x37 for the 518 px pre-training
resolution) to the patch grid of the input (16x16 at 224 px). The PyTorch `transformers` models
do this with `torch.nn.functional.interpolate(..., mode="bicubic", align_corners=False)`:

* `Dinov2Model`: no antialiasing (Keys cubic, a = -0.75, clamped borders);
* `Dinov2WithRegistersModel`: `antialias=True` (PIL-style separable filter, a = -0.5, support
  stretched by the downscale factor, weights renormalised at the borders).

(`transformers`' old Flax DINOv2 used `jax.image.scale_and_translate` with a = -0.5 and an
off-by-0.1 scale instead, so its outputs differed from PyTorch whenever the grid was resized.)
Here the 1-D resampling weights are computed once in numpy (they depend only on the static
sizes) and applied as two small matrix products, which is exact up to float rounding and
cheap under `jit`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def bicubic_matrix(in_size: int, out_size: int, *, antialias: bool) -> np.ndarray:
    """1-D weights of torch's bicubic resize, `align_corners=False`, output size given.

    Args:
        in_size: Length of the input axis.
        out_size: Length of the output axis.
        antialias: Reproduce `antialias=True` (PIL-style filter) instead of the plain kernel.

    Returns:
        float64 array [out_size, in_size]: `y = W @ x` resizes `x` along that axis.
    """
    if antialias:
        return _antialiased_matrix(in_size, out_size, lambda x: _cubic(x, -0.5), support=2.0)
    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    a = -0.75
    for i in range(out_size):
        real = scale * (i + 0.5) - 0.5
        base = math.floor(real)
        t = real - base
        coeffs = (_cubic(t + 1.0, a), _cubic(t, a), _cubic(1.0 - t, a), _cubic(2.0 - t, a))
        for k, c in enumerate(coeffs):
            j = min(max(base - 1 + k, 0), in_size - 1)
            w[i, j] += c
    return w


def bilinear_antialiased_matrix(in_size: int, out_size: int) -> np.ndarray:
    """1-D weights of torch's `F.interpolate(mode="bilinear", align_corners=False,
    antialias=True)` (SigLIP 2 NaFlex resizes its position grid this way); [out_size, in_size]."""
    return _antialiased_matrix(in_size, out_size, lambda x: max(0.0, 1.0 - abs(x)), support=1.0)


def _antialiased_matrix(in_size, out_size, kernel, *, support) -> np.ndarray:
    # torch's `_compute_indices_weights_aa`: the kernel is stretched by the downscale factor and
    # the weights are renormalised where they meet the border.
    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    if scale >= 1.0:
        support, invscale = support * scale, 1.0 / scale
    else:
        invscale = 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        weights = np.array([kernel((j - center + 0.5) * invscale) for j in range(xmin, xmax)])
        total = weights.sum()
        if total != 0.0:
            weights = weights / total
        w[i, xmin:xmax] = weights
    return w


def resize_grid(pe, side: int, weights: tuple[np.ndarray, np.ndarray]):
    """Resizes a square grid of embeddings, [side * side, D] -> [rows * cols, D], with 1-D
    weight matrices `(rows x side, cols x side)` from the functions above (float32 math)."""
    wh, ww = (jnp.asarray(w, jnp.float32) for w in weights)
    d = pe.shape[-1]
    out = jnp.einsum("ia,jb,abd->ijd", wh, ww, pe.reshape(side, side, d).astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(-1, d).astype(pe.dtype)


def positions_on_grid(positions, grid: tuple[int, int], matrix):
    """A square table of learned positions, [side * side, D], on the model's patch grid
    [rows * cols, D], resized with the 1-D weights `matrix(side, n)` (one of the functions
    above); the table itself when the grid is its own."""
    side = math.isqrt(positions.shape[0])
    if side * side != positions.shape[0]:
        raise ValueError(f"{positions.shape[0]} position embeddings do not form a square grid")
    if tuple(grid) == (side, side):
        return positions
    return resize_grid(positions, side, (matrix(side, grid[0]), matrix(side, grid[1])))
