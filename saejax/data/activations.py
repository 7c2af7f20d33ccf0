"""Activations on the fly: a sharded, jitted harvest from a backbone, and a device-resident
shuffle buffer that mixes tokens from many images into SAE batches.

>>> mesh = saejax.sharding.make_mesh()
>>> harvest = make_harvest(bb, layers=(10,), tokens="patches", mesh=mesh)
>>> out = harvest(bb_params, images, image_ids)         # out.acts[10]: [B * 196, 768]
>>> buf = ShuffleBuffer.create(capacity=2**16, row_shape=768, mesh=mesh)
>>> buf = push(buf, out.acts[10], out.image_ids, out.token_ids)   # ... until full
>>> buf = shuffle(buf, key)
>>> buf, batch = take(buf, 4096)     # batch.acts[0]: [4096, 768]; every row once per fill
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from saejax import sharding as shd

TOKEN_SETS = ("cls", "patches", "registers", "all")


def token_indices(layout, tokens: str) -> np.ndarray:
    """Static indices into the token axis for a token set of a backbone's `layout`."""
    if tokens == "all":
        return np.arange(layout.n_tokens)
    if tokens == "cls":
        if layout.cls is None:
            raise ValueError("tokens='cls': this backbone has no CLS token (its token layout is patches only, as in "
                             "SigLIP, whose pooled output comes from an attention-pooling head); use tokens='patches' "
                             "or 'all'")
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
    With bf16 matmuls (`bb.dtype`) YNNPACK is the faster one (18.0 vs 9.9 img/s, ViT-B batch
    8), so it stays on. Empty (no options) on GPU / TPU and for other dtypes.
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
    """A fill of activation rows on device, emptied in a random order, in `groups` that never mix.

    Use: `push` rows until `full()`, `shuffle`, then `take` batches while `remaining()` covers
    a batch, then `clear` and fill again. Every row pushed in a fill comes out exactly once,
    in an order fixed by the shuffle key.

    The rows live in `groups` equal groups: pushed rows are dealt to them in contiguous runs
    (row r of a push of N goes to group r // (N / groups)), each group is shuffled on its own
    (see `shuffle`) and a batch takes B / groups rows from each group, in
    group order. Under a mesh the groups are split over `data` and every operation runs per
    device (`jax.shard_map`): a device shuffles and reads only its own rows, and batches come
    out split over `data` with no gather. The stream depends on `groups` only, not on the
    mesh: any mesh whose `data` size divides `groups` gives the same batches.

    Attributes:
        rows: [G, R, ...] activations (R rows per group; trailing axes as pushed, e.g. [D] or
            [layers, D]).
        image_ids, token_ids: [G, R] int32 provenance of each row.
        order: [G, R] int32 reading order of each group, set by `shuffle` (filled slots first).
        size: rows written per group in this fill.
        read: rows taken per group since the shuffle.
        mesh: the mesh the groups are split over (static), or None.
    """

    rows: jax.Array
    image_ids: jax.Array
    token_ids: jax.Array
    order: jax.Array
    size: jax.Array
    read: jax.Array
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, capacity: int, row_shape: int | Sequence[int], *, groups: int | None = None, dtype=jnp.float32,
               mesh: Mesh | None = None) -> ShuffleBuffer:
        """An empty buffer of `capacity` rows of shape `row_shape` (`d_model`, or `(layers,
        d_model)`), in `groups` groups (default: the mesh's `data` size, or 1)."""
        groups = shd.data_size(mesh) if groups is None else int(groups)
        if groups < 1 or capacity % groups:
            raise ValueError(f"capacity {capacity} is not a multiple of groups={groups}")
        if groups % shd.data_size(mesh):
            raise ValueError(f"groups={groups} must be a multiple of the mesh's data axis ({shd.data_size(mesh)} "
                             f"devices): each device holds whole groups")
        row_shape = (row_shape,) if isinstance(row_shape, (int, np.integer)) else tuple(row_shape)
        per_group = capacity // groups

        def make():
            ids = jnp.zeros((groups, per_group), jnp.int32)
            order = jnp.broadcast_to(jnp.arange(per_group, dtype=jnp.int32), (groups, per_group))
            return cls(jnp.zeros((groups, per_group, *row_shape), dtype), ids, ids, order,
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), mesh)

        if mesh is None:
            return make()
        grouped, scalar = shd.batch_sharding(mesh, 2), shd.replicated(mesh)
        return jax.jit(make, out_shardings=cls(shd.batch_sharding(mesh, 2 + len(row_shape)), grouped, grouped,
                                               grouped, scalar, scalar, mesh))()

    @property
    def groups(self) -> int:
        return self.rows.shape[0]

    @property
    def capacity(self) -> int:
        return self.rows.shape[0] * self.rows.shape[1]

    def full(self) -> jax.Array:
        return self.size >= self.rows.shape[1]

    def remaining(self) -> jax.Array:
        """Rows not yet taken since the shuffle (all groups)."""
        return (self.size - self.read) * self.groups

    def clear(self) -> ShuffleBuffer:
        """Start a new fill (contents are overwritten by the next pushes)."""
        return self.replace(size=jnp.zeros_like(self.size), read=jnp.zeros_like(self.read))


def _per_group(mesh: Mesh | None, fn: Callable, grouped: tuple, shared: tuple = ()):
    """`vmap(fn)` over the leading (group) axis of `grouped`, with `shared` broadcast; under a
    mesh, inside a `shard_map` so that each device runs it on its own groups only."""
    mapped = jax.vmap(fn, in_axes=(0,) * len(grouped) + (None,) * len(shared))
    if mesh is None:
        return mapped(*grouped, *shared)
    split, whole = PartitionSpec(shd.DATA), PartitionSpec()
    return jax.shard_map(mapped, mesh=mesh, in_specs=(split,) * len(grouped) + (whole,) * len(shared),
                         out_specs=split)(*grouped, *shared)


def push(buf: ShuffleBuffer, rows_N: jax.Array, image_ids_N: jax.Array, token_ids_N: jax.Array) -> ShuffleBuffer:
    """Append rows to the fill, `N / groups` contiguous rows to each group. Rows that do not
    fit are dropped, never written over others: make each group's capacity a multiple of
    `N / groups`."""
    n, g = rows_N.shape[0], buf.groups
    if n % g:
        raise ValueError(f"pushing {n} rows into {g} groups: the rows must split evenly")
    if n > buf.capacity:
        raise ValueError(f"pushing {n} rows into a buffer of capacity {buf.capacity}")
    m, per_group = n // g, buf.rows.shape[1]
    start = jnp.minimum(buf.size, per_group - m)
    already_filled = jnp.arange(m) < buf.size - start  # slots of this window holding this fill's rows

    def write(stored, new, start, already_filled):
        old = jax.lax.dynamic_slice_in_dim(stored, start, m)
        mask = already_filled.reshape((m,) + (1,) * (stored.ndim - 1))
        return jax.lax.dynamic_update_slice_in_dim(stored, jnp.where(mask, old, new.astype(stored.dtype)), start, 0)

    def grouped(x):
        return x.reshape(g, m, *x.shape[1:])

    rows, image_ids, token_ids = _per_group(
        buf.mesh, lambda r, i, t, nr, ni, nt, start, filled: tuple(
            write(a, b, start, filled) for a, b in ((r, nr), (i, ni), (t, nt))),
        (buf.rows, buf.image_ids, buf.token_ids, grouped(rows_N), grouped(image_ids_N), grouped(token_ids_N)),
        (start, already_filled))
    return buf.replace(rows=rows, image_ids=image_ids, token_ids=token_ids,
                       size=jnp.minimum(buf.size + m, per_group))


def shuffle(buf: ShuffleBuffer, key: jax.Array) -> ShuffleBuffer:
    """Draw a random reading order over each group's filled rows and start reading from the
    first; group g uses `jax.random.split(key, groups)[g]` (a single group uses `key`)."""
    per_group = buf.rows.shape[1]

    def draw(group_key, size):
        priority = jnp.where(jnp.arange(per_group) < size, jax.random.uniform(group_key, (per_group,)), 2.0)
        return jnp.argsort(priority).astype(jnp.int32)

    keys = key[None] if buf.groups == 1 else jax.random.split(key, buf.groups)
    order = _per_group(buf.mesh, draw, (keys,), (buf.size,))
    return buf.replace(order=order, read=jnp.zeros_like(buf.read))


def take(buf: ShuffleBuffer, batch_size: int) -> tuple[ShuffleBuffer, Harvest]:
    """The next `batch_size` rows in the shuffled order, `batch_size / groups` from each group
    in group order, as a `Harvest` with `acts={0: rows}` (split over `data` under a mesh).

    Past the end of the fill, reading wraps around to its start; check `remaining()`.
    """
    g = buf.groups
    if batch_size % g:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {g} buffer groups")
    b = batch_size // g

    def read(rows, image_ids, token_ids, order, start, size):
        slots = order[(start + jnp.arange(b)) % jnp.maximum(size, 1)]
        return rows[slots], image_ids[slots], token_ids[slots]

    def flat(x):
        return x.reshape(batch_size, *x.shape[2:])

    rows, image_ids, token_ids = _per_group(buf.mesh, read, (buf.rows, buf.image_ids, buf.token_ids, buf.order),
                                            (buf.read, buf.size))
    return buf.replace(read=buf.read + b), Harvest({0: flat(rows)}, flat(image_ids), flat(token_ids))
