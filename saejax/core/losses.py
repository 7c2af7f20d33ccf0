"""SAE training objectives: reconstruction (plain or Matryoshka), sparsity penalties, AuxK.

`Objective` bundles the choices; calling it gives the scalar loss and its terms. Every term is
a pure function too, for users who compose their own objective.

Conventions (the reference's): reconstruction is `mean((x_hat - x)**2)` over batch *and*
dimension; penalties are a sum over latents averaged over the batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax.core.sae import SAE, Encoding, SAEParams, step_function

SPARSITY_PENALTIES = ("l1", "l1_decoder_norm", "l0", "none")


def mse(x_ND: jax.Array, x_hat_ND: jax.Array) -> jax.Array:
    """Mean squared error over batch and dimension (the reference's reconstruction loss)."""
    return jnp.mean((x_hat_ND - x_ND) ** 2)


def l1_penalty(enc: Encoding) -> jax.Array:
    """`mean_n sum_j z_nj` (codes are non-negative)."""
    n = enc.pre_acts.shape[0]
    if enc.z is None:
        return jnp.sum(enc.top_vals) / n
    return jnp.sum(enc.z) / n


def l1_decoder_norm_penalty(enc: Encoding, params: SAEParams) -> jax.Array:
    """`mean_n sum_j z_nj ||w_dec_j||` (Anthropic, April 2024): the decoder is left free."""
    norms_F = jnp.linalg.norm(params.w_dec, axis=1)
    n = enc.pre_acts.shape[0]
    if enc.z is None:
        return jnp.sum(enc.top_vals * norms_F[enc.top_idx]) / n
    return jnp.sum(enc.z @ norms_F) / n


def l0_penalty(enc: Encoding, params: SAEParams, bandwidth: float) -> jax.Array:
    """`mean_n #{j : pre_nj > threshold_j}` with the JumpReLU straight-through gradient."""
    n = enc.pre_acts.shape[0]
    return jnp.sum(step_function(enc.pre_acts, params.threshold, bandwidth)) / n


def halving_prefixes(d_sae: int, levels: int = 4) -> tuple[int, ...]:
    """Nested Matryoshka prefixes that halve from `d_sae`: `(d_sae / 8, d_sae / 4, d_sae / 2, d_sae)`
    for 4 levels."""
    return tuple(d_sae // 2 ** i for i in reversed(range(levels)))


def matryoshka_bounds(prefixes: tuple[int, ...], d_sae: int) -> tuple[int, ...]:
    """Validated, increasing prefix sizes ending at `d_sae`."""
    bounds = tuple(sorted(set(prefixes) | {d_sae}))
    if bounds[0] <= 0 or bounds[-1] != d_sae:
        raise ValueError(f"matryoshka prefixes must lie in 1..d_sae={d_sae}, got {prefixes}")
    return bounds


def prefix_reconstructions(ae: SAE, params: SAEParams, enc: Encoding, bounds: tuple[int, ...]) -> jax.Array:
    """[G, N, D]: reconstruction from latents `[0, bounds[g])` for each prefix g.

    One pass over the decoder: per-group partial decodes, then a cumulative sum.
    """
    starts = (0,) + bounds[:-1]
    if enc.z is None:
        # Sparse code: route each kept slot to its group.
        group_NK = jnp.searchsorted(jnp.asarray(bounds), enc.top_idx, side="right")
        contrib_NKD = enc.top_vals[..., None] * params.w_dec[enc.top_idx]
        onehot_GNK = group_NK[None] == jnp.arange(len(bounds))[:, None, None]
        partial_GND = jnp.einsum("gnk,nkd->gnd", onehot_GNK.astype(contrib_NKD.dtype), contrib_NKD)
    else:
        partial_GND = jnp.stack([enc.z[:, s:e] @ params.w_dec[s:e] for s, e in zip(starts, bounds)])
    return jnp.cumsum(partial_GND, axis=0) + params.b_dec


def auxk_loss(ae: SAE, params: SAEParams, enc: Encoding, x_ND: jax.Array, x_hat_ND: jax.Array,
              dead_F: jax.Array, k_aux: int) -> jax.Array:
    """AuxK (Gao et al. 2024): the `k_aux` largest *dead* latents reconstruct the residual error.

    Returns the normalised MSE of that reconstruction against `x - x_hat` (treated as a
    constant), or 0 when no latent is dead.
    """
    error_ND = jax.lax.stop_gradient(x_ND - x_hat_ND)
    k_aux = min(k_aux, ae.d_sae)
    # A dense [N, F] aux code decoded by one matmul: gathering k_aux decoder rows per input
    # would materialise an [N, k_aux, D] array (6 GB at N=4096, k_aux=512, D=768).
    dead_pre_NF = jnp.where(dead_F, enc.pre_acts, -jnp.inf)
    chosen = jax.lax.stop_gradient(dead_pre_NF)
    _, idx = ae.top_k(chosen, k_aux)
    # The row's k_aux-th largest, read through all the indices: XLA:CPU rewrites a top_k whose
    # indices are partly unused into a full sort of every row.
    kth_N1 = jnp.min(jnp.take_along_axis(chosen, idx, axis=1), axis=1, keepdims=True)
    z_aux_NF = jnp.where(dead_F & (dead_pre_NF >= kth_N1) & (enc.pre_acts > 0), enc.pre_acts, 0.0)
    error_hat_ND = z_aux_NF @ params.w_dec
    baseline = jnp.mean((error_ND - jnp.mean(error_ND, axis=0)) ** 2)
    loss = jnp.mean((error_hat_ND - error_ND) ** 2) / jnp.maximum(baseline, 1e-12)
    return jnp.where(jnp.any(dead_F), loss, 0.0)


class LossTerms(NamedTuple):
    """Scalar parts of a training loss (all device arrays)."""

    loss: jax.Array
    mse: jax.Array  # full-dictionary reconstruction
    reconstruction: jax.Array  # the objective's reconstruction term (Matryoshka: mean over prefixes)
    sparsity: jax.Array  # coeff * penalty
    penalty: jax.Array  # the raw penalty (L1 or L0)
    auxk: jax.Array  # auxk_coeff * AuxK loss
    l0: jax.Array  # mean number of active latents
    auxiliary: jax.Array  # the architecture's own term (Gated: reconstruction through the gate)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What an SAE is trained to minimise.

    Attributes:
        sparsity: "l1" (paper), "l1_decoder_norm" (L1 weighted by decoder row norm; use with a
            free decoder), "l0" (JumpReLU) or "none" (TopK family).
        sparsity_warmup_steps: the sparsity coefficient rises linearly from 0 over this many
            steps (the reference declares this but never applies it).
        auxk_coeff: weight of the AuxK loss (1/32 in Gao et al.); 0 disables it.
        k_aux: dead latents used by AuxK.
        matryoshka_prefixes: nested dictionary sizes that must each reconstruct the input
            (Bussmann/Nabeshima 2025); the reconstruction term is their mean. None: plain.
    """

    sparsity: str = "l1"
    sparsity_warmup_steps: int = 0
    auxk_coeff: float = 0.0
    k_aux: int = 512
    matryoshka_prefixes: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.matryoshka_prefixes is not None:  # a list from a config: keep the objective hashable
            object.__setattr__(self, "matryoshka_prefixes", tuple(self.matryoshka_prefixes))
        if self.sparsity not in SPARSITY_PENALTIES:
            raise ValueError(f"unknown sparsity penalty {self.sparsity!r}; expected one of {SPARSITY_PENALTIES}")
        if self.sparsity_warmup_steps < 0 or self.auxk_coeff < 0:
            raise ValueError("sparsity_warmup_steps and auxk_coeff must be >= 0")

    def check(self, ae: SAE) -> None:
        """Raises ValueError when this objective does not fit `ae`."""
        if self.sparsity == "l0" and not ae.arch.trains_threshold:
            raise ValueError(f"the l0 penalty needs an SAE with a trained threshold (jumprelu), got {ae.architecture}")
        if self.matryoshka_prefixes is not None:
            matryoshka_bounds(self.matryoshka_prefixes, ae.d_sae)

    def sparsity_schedule(self, coeff: jax.Array, step: jax.Array) -> jax.Array:
        """The coefficient in force at `step` (0-based): `coeff * min(1, step / warmup)`."""
        if self.sparsity_warmup_steps == 0:
            return coeff
        return coeff * jnp.minimum(1.0, step / self.sparsity_warmup_steps)

    def __call__(self, ae: SAE, params: SAEParams, x_ND: jax.Array, *, sparsity_coeff: jax.Array,
                 k: jax.Array | None = None, dead_F: jax.Array | None = None) -> tuple[jax.Array, tuple[Encoding, LossTerms]]:
        """Loss of `ae` on a batch; differentiable in `params`.

        Args:
            ae: the architecture.
            params: its parameters.
            x_ND: a batch of (normalised) activations.
            sparsity_coeff: the coefficient in force (after `sparsity_schedule`).
            k: TopK family: dynamic k (None: `ae.k`).
            dead_F: [F] bool, latents counted as dead (AuxK only).

        Returns:
            `(loss, (encoding, LossTerms))`, ready for `jax.value_and_grad(..., has_aux=True)`.
        """
        enc = ae.encode_train(params, x_ND, k=k)
        if self.matryoshka_prefixes is None:
            x_hat = ae.decode_encoding(params, enc)
            reconstruction = mse(x_ND, x_hat)
            full_mse = reconstruction
        else:
            bounds = matryoshka_bounds(self.matryoshka_prefixes, ae.d_sae)
            x_hat_GND = prefix_reconstructions(ae, params, enc, bounds)
            per_prefix = jnp.mean((x_hat_GND - x_ND) ** 2, axis=(1, 2))
            reconstruction, full_mse, x_hat = jnp.mean(per_prefix), per_prefix[-1], x_hat_GND[-1]

        # An architecture may penalise other activations than its code (Gated: relu(pi_gate)).
        penalised = enc if enc.gate is None else Encoding(enc.pre_acts, z=enc.gate)
        if self.sparsity == "l1":
            penalty = l1_penalty(penalised)
        elif self.sparsity == "l1_decoder_norm":
            penalty = l1_decoder_norm_penalty(penalised, params)
        elif self.sparsity == "l0":
            penalty = l0_penalty(enc, params, ae.bandwidth)
        else:
            penalty = jnp.zeros(())
        sparsity = sparsity_coeff * penalty

        auxk = jnp.zeros(())
        if self.auxk_coeff > 0:
            if dead_F is None:
                raise ValueError("auxk_coeff > 0 needs dead_F, the mask of dead latents")
            auxk = self.auxk_coeff * auxk_loss(ae, params, enc, x_ND, x_hat, dead_F, self.k_aux)

        auxiliary = ae.arch.auxiliary_loss(ae, params, x_ND, enc)
        loss = reconstruction + sparsity + auxk + auxiliary
        l0 = enc.l0()
        return loss, (enc, LossTerms(loss, full_mse, reconstruction, sparsity, penalty, auxk, l0, auxiliary))
