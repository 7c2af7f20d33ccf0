"""The jitted sweep step a training run takes: `jit_sweep_step(trainer, states, mesh)` gives
`(step, resample)` for stacked states on a mesh, with the shardings stated here, at the jit
boundary (`Trainer.shardings`), and, on request, members whose loss turns NaN or Inf frozen
while the others go on.

>>> step, resample = jit_sweep_step(trainer, states, mesh)
>>> states, metrics = step(states, x_BD)                       # states donated
>>> step, resample = jit_sweep_step(trainer, states, mesh, freeze_nonfinite=True)
>>> states, metrics, frozen = step(states, x_BD, frozen)       # frozen: bool [members]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from saejax import sharding as shd


def jit_sweep_step(trainer, states, mesh: Mesh, *, freeze_nonfinite: bool = False) -> tuple[Callable, Callable]:
    """`(sweep_step, sweep_resample)` jitted for `mesh`: states (donated) in and out with
    `trainer.shardings`, the batch `[B, D]` split over `data`, so each device computes on B / n
    rows and the gradients are all-reduced over `data`. `states` may be abstract.

    With `freeze_nonfinite`, both take and return a bool `[members]` mask of frozen members:
    `step(states, x, frozen) -> (states, metrics, frozen)`. A member whose loss is NaN or Inf
    joins the mask, and frozen members keep their state (the step and resampling leave them
    as they were), so one diverging member does not stop the others.

    Built once per trainer, mesh and state shapes: asking again (a second `fit`) returns
    the same compiled functions.
    """
    leaves, treedef = jax.tree.flatten(states)
    return _jit_sweep(trainer, mesh, treedef, tuple((tuple(x.shape), x.dtype) for x in leaves), freeze_nonfinite)


@functools.lru_cache(maxsize=16)
def _jit_sweep(trainer, mesh: Mesh, treedef, leaf_types, freeze_nonfinite: bool) -> tuple[Callable, Callable]:
    states = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaf_types])
    state_sh = trainer.shardings(states, mesh)
    members = states.step.shape[0]
    members_split = state_sh.step.spec[0] == shd.MODEL
    latents_split = state_sh.params.w_dec.spec[1] == shd.MODEL
    trainer = dataclasses.replace(trainer, ae=dataclasses.replace(trainer.ae, mesh=mesh, shard_latents=latents_split))
    # Members split over `model`: tell the per-device pieces (shard_map) that the vmapped axis is split too.
    vmap = functools.partial(jax.vmap, in_axes=(0, None), spmd_axis_name=shd.MODEL if members_split else None)
    per_member = NamedSharding(mesh, shd.resolve(mesh, (members,), ("member",)))
    batch = shd.batch_sharding(mesh, 2)
    if not freeze_nonfinite:
        step = jax.jit(vmap(trainer.step), in_shardings=(state_sh, batch), out_shardings=(state_sh, per_member),
                       donate_argnums=0)
        resample = jax.jit(vmap(trainer.resample), in_shardings=(state_sh, batch),
                           out_shardings=(state_sh, per_member), donate_argnums=0)
        return step, resample

    def guarded_step(states, x, frozen):
        new, metrics = vmap(trainer.step)(states, x)
        frozen = frozen | ~jnp.isfinite(metrics["loss"])
        return _keep_frozen(new, states, frozen), metrics, frozen

    def guarded_resample(states, x, frozen):
        new, count = vmap(trainer.resample)(states, x)
        return _keep_frozen(new, states, frozen), jnp.where(frozen, 0, count), frozen

    # The frozen mask is tiny and read by the host at checkpoints: replicated, so every process can.
    mask = shd.replicated(mesh)
    shardings = dict(in_shardings=(state_sh, batch, mask), out_shardings=(state_sh, per_member, mask),
                     donate_argnums=0)
    return jax.jit(guarded_step, **shardings), jax.jit(guarded_resample, **shardings)


def _keep_frozen(new, old, frozen: jax.Array):
    """`new`, except the members in `frozen`, which keep `old`."""

    def pick(n, o):
        if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(pick(jax.random.key_data(n), jax.random.key_data(o)),
                                            impl=jax.random.key_impl(n))
        return jnp.where(frozen.reshape((-1,) + (1,) * (n.ndim - 1)), o, n)

    return jax.tree.map(pick, new, old)
