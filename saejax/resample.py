"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023), as a pure state -> state map.

A latent is dead when it has not fired for `Trainer.dead_after_tokens` inputs. Each dead latent
gets a new direction toward an input the SAE reconstructs badly (drawn with probability
proportional to its squared reconstruction loss):
- decoder row: that input, centred by `b_dec`, at unit norm;
- encoder column: the same direction at `encoder_scale` x the mean live encoder norm;
- encoder bias 0, and Adam moments of all those entries 0; its dead counter restarts.
Live latents, their parameters and their optimizer state are left bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from saejax.sae import SAEParams

if TYPE_CHECKING:
    from saejax.train import Trainer, TrainState


def resample_dead(trainer: Trainer, state: TrainState, x_ND: jax.Array, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """Reinitialise the dead latents of `state` from inputs `x_ND`. Jittable.

    Args:
        trainer: the `Trainer` that made `state` (its SAE, optimizer and dead threshold).
        state: a single member's `TrainState` (`vmap` this over a sweep).
        x_ND: candidate inputs (normalised like the training data); the more, the better the
            choice of badly reconstructed inputs.
        key: `jax.random.key`.

    Returns:
        `(new_state, n_resampled)`.
    """
    ae, params = trainer.ae, state.params
    dead_F = trainer.dead_latents(state)

    x_hat = ae(params, x_ND)
    loss_N = jnp.sum((x_ND - x_hat) ** 2, axis=1)
    # Probability ~ loss**2; the floor keeps a perfectly reconstructed batch samplable.
    logits_N = 2.0 * jnp.log(loss_N + 1e-12)
    picks_F = jax.random.categorical(key, logits_N, shape=(ae.d_sae,))
    directions_FD = x_ND[picks_F] - params.b_dec
    directions_FD = directions_FD / jnp.maximum(jnp.linalg.norm(directions_FD, axis=1, keepdims=True), 1e-12)

    enc_norms_F = jnp.linalg.norm(params.w_enc, axis=0)
    n_live = jnp.maximum(jnp.sum(~dead_F), 1)
    live_norm = jnp.where(jnp.any(~dead_F), jnp.sum(jnp.where(dead_F, 0.0, enc_norms_F)) / n_live, 1.0)
    enc_scale = trainer.resample_encoder_scale * live_norm

    new_params = params.replace(
        w_enc=jnp.where(dead_F[None, :], enc_scale * directions_FD.T, params.w_enc),
        b_enc=jnp.where(dead_F, 0.0, params.b_enc),
        w_dec=jnp.where(dead_F[:, None], directions_FD, params.w_dec),
    )

    reset = _latent_mask(params, dead_F)
    tx = trainer.optimizer(state.hparams.learning_rate)
    opt_state = optax.tree_map_params(
        tx, lambda leaf, mask: jnp.where(mask, jnp.zeros_like(leaf), leaf), state.opt_state, reset)
    new_state = state.replace(
        params=new_params,
        opt_state=opt_state,
        tokens_since_fired=jnp.where(dead_F, 0, state.tokens_since_fired),
    )
    return new_state, jnp.sum(dead_F)


def _latent_mask(params: SAEParams, dead_F: jax.Array) -> SAEParams:
    """A params-shaped tree of masks selecting the entries that belong to `dead_F` latents."""
    return params.replace(
        w_enc=dead_F[None, :],
        b_enc=dead_F,
        w_dec=dead_F[:, None],
        b_dec=jnp.zeros((1,), bool),
        threshold=None if params.threshold is None else jnp.zeros((1,), bool),
    )
