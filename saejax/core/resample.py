"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023), as a pure function of
explicit pieces, so a user with their own training loop can resample too.

Each dead latent gets a new direction toward an input the SAE reconstructs badly (drawn with
probability proportional to its squared reconstruction loss):
- decoder row: that input, centred by `b_dec`, at unit norm;
- encoder column: the same direction at `encoder_scale` x the mean live encoder norm;
- encoder bias 0, and the optimizer moments of all those entries 0.
Live latents, their parameters and their optimizer state are left bit for bit.

>>> params, opt_state, n = resample_dead(ae, tx, params, opt_state, dead_F, x_ND, key)

`saejax.train.Trainer.resample` applies it to a `TrainState` (and restarts the dead counters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from saejax.core.sae import SAE, SAEParams


def resample_dead(ae: SAE, optimizer: optax.GradientTransformation, params: SAEParams, opt_state: optax.OptState,
                  dead_F: jax.Array, x_ND: jax.Array, key: jax.Array, *,
                  encoder_scale: float = 0.2) -> tuple[SAEParams, optax.OptState, jax.Array]:
    """Reinitialise the `dead_F` latents of one SAE from inputs `x_ND`. Jittable; `vmap` it
    over a sweep.

    Args:
        ae: the architecture.
        optimizer: the optax transformation that made `opt_state` (its params-shaped leaves,
            e.g. Adam's moments, are zeroed for the resampled latents).
        params: the SAE's parameters.
        opt_state: `optimizer`'s state for `params`.
        dead_F: [F] bool, the latents to resample.
        x_ND: candidate inputs (normalised like the training data); the more, the better the
            choice of badly reconstructed inputs.
        key: `jax.random.key`.
        encoder_scale: resampled encoder columns get this times the mean live encoder norm.

    Returns:
        `(params, opt_state, number of latents resampled)`.
    """
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
    enc_scale = encoder_scale * live_norm

    new_params = params.replace(
        w_enc=jnp.where(dead_F[None, :], enc_scale * directions_FD.T, params.w_enc),
        b_enc=jnp.where(dead_F, 0.0, params.b_enc),
        w_dec=jnp.where(dead_F[:, None], directions_FD, params.w_dec),
        **{name: jnp.where(dead_F, 0.0, getattr(params, name)) for name in ae.arch.resampled_params},
    )
    reset = _latent_mask(ae, params, dead_F)
    opt_state = optax.tree_map_params(
        optimizer, lambda leaf, mask: jnp.where(mask, jnp.zeros_like(leaf), leaf), opt_state, reset)
    return new_params, opt_state, jnp.sum(dead_F)


def _latent_mask(ae, params: SAEParams, dead_F: jax.Array) -> SAEParams:
    """A params-shaped tree of masks selecting the entries that belong to `dead_F` latents
    (whose Adam moments are reset); an architecture's other extra params (a threshold) keep
    theirs."""
    extra = {name: (dead_F if name in ae.arch.resampled_params else jnp.zeros((1,), bool))
             for name in ae.arch.extra_params}
    return params.replace(w_enc=dead_F[None, :], b_enc=dead_F, w_dec=dead_F[:, None], b_dec=jnp.zeros((1,), bool),
                          **extra)
