"""Optimizer pieces for SAEs, as optax gradient transformations (`GradientTransformation`).

The paper's recipe keeps decoder rows at unit norm: the gradient component parallel to each
row is removed before Adam, and rows are renormalised after the update:

>>> tx = optax.chain(remove_parallel_decoder_grad(), optax.scale_by_adam(),
...                  optax.scale_by_learning_rate(schedule), renormalize_decoder_rows())

`make_optimizer` builds exactly that, and `with_unit_norm_decoder(tx)` puts the two decoder
transforms around any other optax transformation (clipping, weight decay, a schedule of your
own). Both transforms act on the `w_dec` field of an `SAEParams`-shaped tree and need `params`
passed to `update`.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def _require_params(params, name):
    if params is None:
        raise ValueError(f"{name} needs the current params: call tx.update(grads, state, params)")


def remove_parallel_decoder_grad() -> optax.GradientTransformation:
    """Project out of each decoder row's gradient its component along that (unit) row.

    `g_i <- g_i - (g_i . w_i) w_i`, as saev's `remove_parallel_grads` (which assumes unit rows).
    """

    def update_fn(updates, state, params=None):
        _require_params(params, "remove_parallel_decoder_grad")
        w_FD, g_FD = params.w_dec, updates.w_dec
        parallel_F1 = jnp.sum(g_FD * w_FD, axis=-1, keepdims=True)
        return updates.replace(w_dec=g_FD - parallel_F1 * w_FD), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def renormalize_decoder_rows() -> optax.GradientTransformation:
    """Turn the final update into one that lands every decoder row on unit norm.

    Put last in a chain: the new row is `(w + u) / ||w + u||`, so `u <- that - w`.
    """

    def update_fn(updates, state, params=None):
        _require_params(params, "renormalize_decoder_rows")
        new_FD = params.w_dec + updates.w_dec
        new_FD = new_FD / jnp.linalg.norm(new_FD, axis=-1, keepdims=True)
        return updates.replace(w_dec=new_FD - params.w_dec), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def with_unit_norm_decoder(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` between `remove_parallel_decoder_grad` and `renormalize_decoder_rows`: whatever
    `tx` does to the gradient, decoder rows move along their sphere and stay at unit norm."""
    return optax.chain(remove_parallel_decoder_grad(), tx, renormalize_decoder_rows())


def learning_rate_schedule(learning_rate, *, warmup_steps: int = 500, decay_steps: int | None = None,
                           final_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 (the reference: `lr * step / warmup_steps`), then constant, or a
    cosine decay to `final_fraction * learning_rate` over `decay_steps` more steps.

    `learning_rate` may be a traced scalar (a `vmap` sweep member's own rate).
    """
    if warmup_steps > 0:
        warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    else:
        warmup = optax.constant_schedule(learning_rate)
    if decay_steps is None:
        after = optax.constant_schedule(learning_rate)
    else:
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(learning_rate, *, warmup_steps: int = 500, decay_steps: int | None = None,
                   final_fraction: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   unit_norm_decoder: bool = True) -> optax.GradientTransformation:
    """The paper's optimizer: Adam (no weight decay, no clipping) with LR warmup, plus the
    unit-norm decoder transforms when `unit_norm_decoder`.

    Args:
        learning_rate: peak learning rate (float or traced scalar).
        warmup_steps: linear warmup length (500 in the paper).
        decay_steps: if set, cosine decay over this many steps after warmup.
        final_fraction: cosine decay ends at this fraction of the peak.
        b1, b2, eps: Adam's (torch's defaults).
        unit_norm_decoder: keep decoder rows unit norm (paper); False leaves them free (e.g.
            for the `l1_decoder_norm` penalty).
    """
    schedule = learning_rate_schedule(learning_rate, warmup_steps=warmup_steps, decay_steps=decay_steps,
                                      final_fraction=final_fraction)
    adam = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.scale_by_learning_rate(schedule)]
    if not unit_norm_decoder:
        return optax.chain(*adam)
    # Flat, not `with_unit_norm_decoder(chain(*adam))`: checkpoints store this state layout.
    return optax.chain(remove_parallel_decoder_grad(), *adam, renormalize_decoder_rows())
