"""Activations on the fly: a sharded, jitted harvest from a backbone, and a device-resident
shuffle buffer that mixes tokens from many images into SAE batches.

>>> mesh = saejax.sharding.make_mesh()
>>> harvest = make_harvest(bb, layers=(10,), tokens="patches", mesh=mesh)
>>> out = harvest(bb_params, images, image_ids)         # out.acts[10]: [B * 196, 768]
>>> buf = ShuffleBuffer.create(capacity=2**16, d_model=768, mesh=mesh)
>>> buf = push(buf, out.acts[10], out.image_ids, out.token_ids)   # ... until full
>>> buf = shuffle(buf, key)
>>> buf, batch = take(buf, 4096)     # batch.acts[0]: [4096, 768]; every row once per fill
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from saejax import sharding as shd
from saejax.normalization import Normalization, estimate_normalization

TOKEN_SETS = ("cls", "patches", "registers", "all")


def token_indices(layout, tokens: str) -> np.ndarray:
    """Static indices into the token axis for a token set of a backbone's `layout`."""
    if tokens == "all":
        return np.arange(layout.n_tokens)
    if tokens == "cls":
        if layout.cls is None:
            raise ValueError("this backbone has no CLS token")
        return np.array([layout.cls])
    if tokens == "patches":
        return np.arange(*layout.patches)
    if tokens == "registers":
        start, stop = layout.registers
        if stop <= start:
            raise ValueError("this backbone has no register tokens")
        return np.arange(start, stop)
    raise ValueError(f"unknown token set {tokens!r}; expected one of {TOKEN_SETS}")


def cpu_compiler_options(dtype, mesh: Mesh | None = None) -> dict:
    """XLA options for jitting a ViT forward: on CPU in float32, YNNPACK fusions off.

    XLA:CPU (jax 0.10) hands dots to YNNPACK, whose float32 GEMM ran the ViT-B harvest 45%
    slower than XLA's own dot on this project's 2-core AVX-512 box (benchmarks/harvest.py).
    Empty (no options) on GPU / TPU and for other dtypes.
    """
    devices = mesh.devices.flat if mesh is not None else jax.devices()
    if next(iter(devices)).platform != "cpu" or jnp.dtype(dtype) != jnp.float32:
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


class Harvest(NamedTuple):
    """Flattened activations: row `r` is token `token_ids[r]` of image `image_ids[r]`.

    Attributes:
        acts: {layer: [N, D]} with N = images x selected tokens, image-major.
        image_ids: [N] int32.
        token_ids: [N] int32, index into the backbone's token axis.
    """

    acts: dict
    image_ids: jax.Array
    token_ids: jax.Array


def make_harvest(bb, layers: Sequence[int], *, tokens: str = "patches", mesh: Mesh | None = None) -> Callable:
    """A jitted `harvest(params, images, image_ids) -> Harvest`.

    The forward stops after the last requested layer. With a mesh, images (and so the rows of
    the output) are split over its `data` axis and the backbone parameters are replicated.

    Args:
        bb: a backbone from `saejax.backbones.load`.
        layers: hook indices (residual after block i).
        tokens: "patches", "cls", "registers" or "all".
        mesh: a mesh from `saejax.sharding.make_mesh`, or None for the default device.
    """
    layers = tuple(sorted(int(i) for i in layers))
    if not layers:
        raise ValueError("make_harvest needs at least one layer")
    for i in layers:
        if not 0 <= i < bb.n_layers:
            raise ValueError(f"layer {i} out of range: this backbone has blocks 0..{bb.n_layers - 1}")
    selected = token_indices(bb.layout, tokens)

    def harvest(params, images_BHWC, image_ids_B):
        out = bb.forward(params, images_BHWC, capture=layers, full=False)
        b, t = images_BHWC.shape[0], len(selected)
        acts = {i: out.captured[i][:, selected].reshape(b * t, -1) for i in layers}
        image_ids = jnp.repeat(image_ids_B.astype(jnp.int32), t)
        token_ids = jnp.tile(jnp.asarray(selected, jnp.int32), b)
        return Harvest(acts, image_ids, token_ids)

    options = cpu_compiler_options(bb.dtype, mesh)
    if mesh is None:
        return jax.jit(harvest, compiler_options=options)
    rows = shd.batch_sharding(mesh, 1)
    return jax.jit(
        harvest,
        compiler_options=options,
        in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh, 4), rows),
        out_shardings=Harvest({i: shd.batch_sharding(mesh, 2) for i in layers}, rows, rows),
    )


@flax.struct.dataclass
class ShuffleBuffer:
    """A fill of activation rows on device, emptied in a random order.

    Use: `push` rows until `full()`, `shuffle`, then `take` batches while `remaining()` covers
    a batch, then `clear` and fill again. Every row pushed in a fill comes out exactly once,
    in an order fixed by the shuffle key.

    Attributes:
        rows: [C, D] activations.
        image_ids, token_ids: [C] int32 provenance of each row.
        order: [C] int32 reading order set by `shuffle` (filled slots first).
        size: rows written in this fill.
        read: rows taken since the shuffle.
    """

    rows: jax.Array
    image_ids: jax.Array
    token_ids: jax.Array
    order: jax.Array
    size: jax.Array
    read: jax.Array

    @classmethod
    def create(cls, capacity: int, d_model: int, *, dtype=jnp.float32, mesh: Mesh | None = None) -> ShuffleBuffer:
        """An empty buffer; with a mesh, its rows are split over the `data` axis."""

        def make():
            ids = jnp.zeros((capacity,), jnp.int32)
            return cls(jnp.zeros((capacity, d_model), dtype), ids, ids, jnp.arange(capacity, dtype=jnp.int32),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

        if mesh is None:
            return make()
        rows, scalar = shd.batch_sharding(mesh, 1), shd.replicated(mesh)
        return jax.jit(make, out_shardings=cls(shd.batch_sharding(mesh, 2), rows, rows, scalar, scalar, scalar))()

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def full(self) -> jax.Array:
        return self.size >= self.capacity

    def remaining(self) -> jax.Array:
        """Rows not yet taken since the shuffle."""
        return self.size - self.read

    def clear(self) -> ShuffleBuffer:
        """Start a new fill (contents are overwritten by the next pushes)."""
        return self.replace(size=jnp.zeros_like(self.size), read=jnp.zeros_like(self.read))


def push(buf: ShuffleBuffer, rows_ND: jax.Array, image_ids_N: jax.Array, token_ids_N: jax.Array) -> ShuffleBuffer:
    """Append rows to the fill. Rows that do not fit are dropped, never written over others:
    make the capacity a multiple of the rows pushed at a time."""
    n = rows_ND.shape[0]
    if n > buf.capacity:
        raise ValueError(f"pushing {n} rows into a buffer of capacity {buf.capacity}")
    start = jnp.minimum(buf.size, buf.capacity - n)
    already_filled = jnp.arange(n) < buf.size - start  # slots of this window holding this fill's rows

    def write(stored, new):
        old = jax.lax.dynamic_slice_in_dim(stored, start, n)
        mask = already_filled.reshape((n,) + (1,) * (stored.ndim - 1))
        return jax.lax.dynamic_update_slice_in_dim(stored, jnp.where(mask, old, new.astype(stored.dtype)), start, 0)

    return buf.replace(rows=write(buf.rows, rows_ND), image_ids=write(buf.image_ids, image_ids_N),
                       token_ids=write(buf.token_ids, token_ids_N), size=jnp.minimum(buf.size + n, buf.capacity))


def shuffle(buf: ShuffleBuffer, key: jax.Array) -> ShuffleBuffer:
    """Draw a random reading order over the filled rows and start reading from the first."""
    priority = jnp.where(jnp.arange(buf.capacity) < buf.size, jax.random.uniform(key, (buf.capacity,)), 2.0)
    return buf.replace(order=jnp.argsort(priority).astype(jnp.int32), read=jnp.zeros_like(buf.read))


def take(buf: ShuffleBuffer, batch_size: int) -> tuple[ShuffleBuffer, Harvest]:
    """The next `batch_size` rows in the shuffled order, as a `Harvest` with `acts={0: rows}`.

    Past the end of the fill, reading wraps around to its start; check `remaining()`.
    """
    slots = buf.order[(buf.read + jnp.arange(batch_size)) % jnp.maximum(buf.size, 1)]
    batch = Harvest({0: buf.rows[slots]}, buf.image_ids[slots], buf.token_ids[slots])
    return buf.replace(read=buf.read + batch_size), batch


def estimate_normalization_from(batches: Iterable[jax.Array], n_samples: int, key: jax.Array) -> Normalization:
    """Normalisation statistics from a stream of activation batches ([N, D] each).

    Takes a random subset of rows from each batch (at most half a batch, so the sample spans
    many batches) until `n_samples` rows are collected (the reference uses 2**19), then
    `estimate_normalization` on them. Raises ValueError if the stream ends first.
    """
    collected, have = [], 0
    for i, x in enumerate(batches):
        take_n = min(max(1, x.shape[0] // 2), n_samples - have)
        rows = jax.random.choice(jax.random.fold_in(key, i), x.shape[0], (take_n,), replace=False)
        collected.append(jnp.asarray(x)[rows])
        have += take_n
        if have >= n_samples:
            return estimate_normalization(jnp.concatenate(collected))
    raise ValueError(f"the activation stream ended after {have} rows; {n_samples} were asked for")
