"""Residual-stream interventions: pure `resid -> resid` functions built from an SAE and a latent edit.

A latent edit maps codes `z [..., F] -> z'`; its numbers (latent ids, values, token mask) are
pytree leaves, so a new value does not recompile and `vmap` over values or latents works:

>>> edit = sae_edit(ae, params, set(latents=[1234], values=[-2.0 * max_1234], mask=patch_mask))
>>> out = bb.forward(bb_params, images, edits={10: edit})          # the model finishes its pass

`sae_edit` keeps the SAE's reconstruction error: it returns
`resid + decode(edit(z)) - decode(z) = resid + (edit(z) - z) @ w_dec`, so a no-op edit returns
the residual exactly and setting latent i to v moves each edited token by exactly
`(v - f_i) * w_dec[i]`. When the SAE was trained on normalised activations, pass its
`Normalization`: encoding happens in normalised space and the change is mapped back to raw space.

Token masks broadcast against the code's leading axes (`[T]` for all images, `[B, T]` per
image); None edits every token.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from saejax.normalization import Normalization
from saejax.sae import SAE, SAEParams


def _masked(z, edited, mask):
    if mask is None:
        return edited
    return jnp.where(jnp.asarray(mask, bool)[..., None], edited, z)


@flax.struct.dataclass
class SetLatents:
    """Set `z[..., latents[j]] = values[j]` on the masked tokens (the paper's edit); with
    `where_active`, only on the tokens where latent `latents[j]` is non-zero."""

    latents: jax.Array
    values: jax.Array
    mask: jax.Array | None = None
    where_active: bool = flax.struct.field(pytree_node=False, default=False)

    def __call__(self, z: jax.Array) -> jax.Array:
        values = self.values.astype(z.dtype)
        if self.where_active:
            current = z[..., self.latents]
            values = jnp.where(current != 0, values, current)
        return _masked(z, z.at[..., self.latents].set(values), self.mask)


@flax.struct.dataclass
class ScaleLatents:
    """Multiply `z[..., latents[j]]` by `factors[j]` on the masked tokens."""

    latents: jax.Array
    factors: jax.Array
    mask: jax.Array | None = None

    def __call__(self, z: jax.Array) -> jax.Array:
        return _masked(z, z.at[..., self.latents].multiply(self.factors.astype(z.dtype)), self.mask)


@flax.struct.dataclass
class AddLatents:
    """Add `amounts[j]` to `z[..., latents[j]]` on the masked tokens."""

    latents: jax.Array
    amounts: jax.Array
    mask: jax.Array | None = None

    def __call__(self, z: jax.Array) -> jax.Array:
        return _masked(z, z.at[..., self.latents].add(self.amounts.astype(z.dtype)), self.mask)


@flax.struct.dataclass
class Chain:
    """Apply `edits` in order."""

    edits: tuple

    def __call__(self, z: jax.Array) -> jax.Array:
        for edit in self.edits:
            z = edit(z)
        return z


def _ids(latents) -> jax.Array:
    return jnp.atleast_1d(jnp.asarray(latents, jnp.int32))


def _numbers(values, latents) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32), latents.shape)


def set(latents, values, mask=None, *, where_active: bool = False) -> SetLatents:  # noqa: A001 - the paper's name
    """Set each latent in `latents` to the matching value of `values` (a scalar broadcasts).

    `where_active=True` edits a latent only on the tokens where it fires, so tokens where it
    is silent are not pushed along its decoder direction (the paper's quantitative protocol
    edits every token; this is the "edit the patches where the feature is" variant).
    """
    latents = _ids(latents)
    return SetLatents(latents, _numbers(values, latents), mask, where_active)


def scale(latents, factors, mask=None) -> ScaleLatents:
    """Multiply each latent in `latents` by the matching factor (a scalar broadcasts)."""
    latents = _ids(latents)
    return ScaleLatents(latents, _numbers(factors, latents), mask)


def add(latents, amounts, mask=None) -> AddLatents:
    """Add the matching amount to each latent in `latents` (a scalar broadcasts)."""
    latents = _ids(latents)
    return AddLatents(latents, _numbers(amounts, latents), mask)


def ablate(latents, mask=None) -> SetLatents:
    """Set the latents to zero."""
    return set(latents, 0.0, mask)


def chain(*edits) -> Chain:
    """Compose latent edits left to right."""
    return Chain(tuple(edits))


@flax.struct.dataclass
class SAEEdit:
    """A residual edit through an SAE; build it with `sae_edit`. Call it on `[..., D]`."""

    ae: SAE = flax.struct.field(pytree_node=False)
    params: SAEParams
    latent_edit: Any
    norm: Normalization | None = None

    def codes(self, resid: jax.Array) -> jax.Array:
        """`[..., D]` residuals -> `[..., F]` SAE codes (normalised first when `norm` is set)."""
        x_ND = resid.reshape(-1, resid.shape[-1])
        if self.norm is not None:
            x_ND = self.norm.apply(x_ND)
        return self.ae.encode(self.params, x_ND).reshape(*resid.shape[:-1], -1)

    def __call__(self, resid: jax.Array) -> jax.Array:
        z = self.codes(resid)
        change = (self.latent_edit(z) - z).reshape(-1, self.ae.d_sae)
        delta_ND = change @ self.params.w_dec
        if self.norm is not None:
            delta_ND = self.norm.invert_delta(delta_ND)
        return resid + delta_ND.reshape(resid.shape).astype(resid.dtype)


def sae_edit(ae: SAE, params: SAEParams, latent_edit, norm: Normalization | None = None) -> SAEEdit:
    """`resid -> resid + decode(latent_edit(z)) - decode(z)` with `z = encode(resid)`.

    Args:
        ae: the SAE architecture.
        params: its parameters (in normalised space when `norm` is given).
        latent_edit: a latent edit (`set`, `scale`, `add`, `ablate`, `chain`), or any
            `z -> z` callable (a pytree, if its numbers should stay traced).
        norm: the statistics the SAE was trained with, or None for raw activations.
    """
    return SAEEdit(ae, params, latent_edit, norm)


@flax.struct.dataclass
class DirectionEdit:
    """`resid + scale * direction` on the masked tokens: steering without an SAE."""

    direction: jax.Array
    scale: jax.Array
    mask: jax.Array | None = None

    def __call__(self, resid: jax.Array) -> jax.Array:
        steered = resid + (self.scale * self.direction).astype(resid.dtype)
        return _masked(resid, steered, self.mask)


def direction_edit(direction, scale=1.0, mask=None) -> DirectionEdit:
    """Add `scale * direction` ([D]) to the residual of the masked tokens."""
    return DirectionEdit(jnp.asarray(direction, jnp.float32), jnp.asarray(scale, jnp.float32), mask)


__all__ = ["set", "scale", "add", "ablate", "chain", "sae_edit", "direction_edit", "SetLatents", "ScaleLatents",
           "AddLatents", "Chain", "SAEEdit", "DirectionEdit"]
