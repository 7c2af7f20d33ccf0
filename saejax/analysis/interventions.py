"""Residual-stream interventions: pure `resid -> resid` functions built from an SAE and a latent edit.

A latent edit maps codes `z [..., F] -> z'`; its numbers (latent ids, values, token mask) are
pytree leaves, so a new value does not recompile and `vmap` over values or latents works:

>>> edit = sae_edit(ae, params, set_to(latents=[1234], values=[-2.0 * max_1234], mask=patch_mask))
>>> out = bb.forward(bb_params, images, edits={10: edit})          # the model finishes its pass

`sae_edit` keeps the SAE's reconstruction error: it returns
`resid + decode(edit(z)) - decode(z) = resid + (edit(z) - z) @ w_dec`, so a no-op edit returns
the residual exactly and setting latent i to v moves each edited token by exactly
`(v - f_i) * w_dec[i]`. When the SAE was trained on normalised activations, pass its
`Normalization`: encoding happens in normalised space and the change is mapped back to raw space.

Edits that replace the residual outright: `splice(ae, params, norm, tokens)` (the SAE's
reconstruction, error dropped: spliced-in fidelity) and `replace_tokens(values, tokens)` (mean or
zero ablation), at token positions.

Token masks broadcast against the code's leading axes (`[T]` for all images, `[B, T]` per
image); None edits every token.

Latent ids are checked, never wrapped or clamped: a float or negative id is an error when the
edit is built, and an id >= `d_sae` is an error when `sae_edit` is built (or when the edit is
applied, also inside `jit` when the ids are constants). Ids that are traced (passed into a
jitted or vmapped function as arguments) cannot be checked before they run: an out-of-range
traced id edits nothing, and flags an error under
`jax.experimental.checkify.checkify(fn, errors=checkify.user_checks)`:

>>> err, out = checkify.checkify(jax.jit(run), errors=checkify.user_checks)(latent_ids)
>>> err.throw()   # ValueError: latent id out of range ...
"""

from __future__ import annotations

import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from saejax.core.normalization import Normalization
from saejax.core.sae import SAE, SAEParams


def _masked(z, edited, mask):
    if mask is None:
        return edited
    return jnp.where(jnp.asarray(mask, bool)[..., None], edited, z)


def _check_range(latents, d_sae: int) -> None:
    bad = np.asarray(latents)[(np.asarray(latents) < 0) | (np.asarray(latents) >= d_sae)]
    if bad.size:
        raise ValueError(f"latent id {bad.ravel()[0]} is out of range for an SAE with d_sae={d_sae} "
                         f"(ids 0..{d_sae - 1})")


def _in_range(latents: jax.Array, d_sae: int) -> jax.Array:
    """Ids to scatter into `[..., d_sae]` with `mode="drop"`: concrete ids are checked now;
    traced ids out of range become `d_sae` (dropped, never wrapped) and are flagged to
    checkify."""
    if not isinstance(latents, jax.core.Tracer):
        _check_range(latents, d_sae)
        return latents
    ok = (latents >= 0) & (latents < d_sae)
    checkify.debug_check(jnp.all(ok), f"latent id out of range for d_sae={d_sae}: {{ids}}", ids=latents)
    return jnp.where(ok, latents, d_sae)


@flax.struct.dataclass
class SetLatents:
    """Set `z[..., latents[j]] = values[j]` on the masked tokens (the paper's edit); with
    `where_active`, only on the tokens where latent `latents[j]` is non-zero."""

    latents: jax.Array
    values: jax.Array
    mask: jax.Array | None = None
    where_active: bool = flax.struct.field(pytree_node=False, default=False)

    def __call__(self, z: jax.Array) -> jax.Array:
        latents, values = _in_range(self.latents, z.shape[-1]), self.values.astype(z.dtype)
        if self.where_active:
            current = z.at[..., latents].get(mode="fill", fill_value=0)
            values = jnp.where(current != 0, values, current)
        return _masked(z, z.at[..., latents].set(values, mode="drop"), self.mask)


@flax.struct.dataclass
class ScaleLatents:
    """Multiply `z[..., latents[j]]` by `factors[j]` on the masked tokens."""

    latents: jax.Array
    factors: jax.Array
    mask: jax.Array | None = None

    def __call__(self, z: jax.Array) -> jax.Array:
        latents = _in_range(self.latents, z.shape[-1])
        return _masked(z, z.at[..., latents].multiply(self.factors.astype(z.dtype), mode="drop"), self.mask)


@flax.struct.dataclass
class AddLatents:
    """Add `amounts[j]` to `z[..., latents[j]]` on the masked tokens."""

    latents: jax.Array
    amounts: jax.Array
    mask: jax.Array | None = None

    def __call__(self, z: jax.Array) -> jax.Array:
        latents = _in_range(self.latents, z.shape[-1])
        return _masked(z, z.at[..., latents].add(self.amounts.astype(z.dtype), mode="drop"), self.mask)


@flax.struct.dataclass
class Chain:
    """Apply `edits` in order."""

    edits: tuple

    def __call__(self, z: jax.Array) -> jax.Array:
        for edit in self.edits:
            z = edit(z)
        return z


def _ids(latents) -> jax.Array | np.ndarray:
    """Latent ids as int32 [n]; concrete ids must be non-negative integers (never truncated)."""
    if isinstance(latents, jax.core.Tracer):
        if not jnp.issubdtype(latents.dtype, jnp.integer):
            raise TypeError(f"latent ids must be integers, got dtype {latents.dtype}")
        return jnp.atleast_1d(latents.astype(jnp.int32))
    ids = np.asarray(latents)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"latent ids must be integers, got {latents!r} (dtype {ids.dtype})")
    if (ids < 0).any():
        raise ValueError(f"latent id {ids[ids < 0].ravel()[0]} is negative: ids count from 0, not from the end")
    if (ids > np.iinfo(np.int32).max).any():
        raise ValueError(f"latent id {ids.max()} is out of range")
    # Kept in numpy so the ids stay concrete (and checkable) when the edit is built inside `jit`.
    return np.atleast_1d(ids.astype(np.int32))


def check_latent_ids(latent_edit, d_sae: int) -> None:
    """Raise ValueError if a concrete latent id of `latent_edit` (a `set_to`/`scale`/`add`/`ablate`
    edit or a `chain` of them) is outside `[0, d_sae)`. Traced ids are left to the edit."""
    if isinstance(latent_edit, Chain):
        for edit in latent_edit.edits:
            check_latent_ids(edit, d_sae)
    elif isinstance(latent_edit, (SetLatents, ScaleLatents, AddLatents)):
        if not isinstance(latent_edit.latents, jax.core.Tracer):
            _check_range(latent_edit.latents, d_sae)


def _numbers(values, latents) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32), latents.shape)


def set_to(latents, values, mask=None, *, where_active: bool = False) -> SetLatents:
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
    return set_to(latents, 0.0, mask)


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
        latent_edit: a latent edit (`set_to`, `scale`, `add`, `ablate`, `chain`), or any
            `z -> z` callable (a pytree, if its numbers should stay traced).
        norm: the statistics the SAE was trained with, or None for raw activations.

    Raises:
        ValueError: a latent id of `latent_edit` is outside `[0, ae.d_sae)`.
    """
    check_latent_ids(latent_edit, ae.d_sae)
    return SAEEdit(ae, params, latent_edit, norm)


def _positions(tokens) -> tuple[int, ...] | None:
    return None if tokens is None else tuple(int(t) for t in np.asarray(tokens).reshape(-1))


def _at_tokens(resid: jax.Array, tokens: tuple[int, ...] | None, fn) -> jax.Array:
    """`resid` with `fn` applied to the rows at `tokens` (positions on the token axis, -2; all when None)."""
    if tokens is None:
        return fn(resid).astype(resid.dtype)
    index = jnp.asarray(tokens)
    return resid.at[..., index, :].set(fn(resid[..., index, :]).astype(resid.dtype))


@flax.struct.dataclass
class Splice:
    """The SAE's reconstruction, its error dropped, in place of the residual at `tokens`; build
    it with `splice`."""

    ae: SAE = flax.struct.field(pytree_node=False)
    params: SAEParams
    norm: Normalization | None = None
    tokens: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    def __call__(self, resid: jax.Array) -> jax.Array:
        def reconstruct(x):
            x_ND = x.reshape(-1, x.shape[-1])
            x_ND = x_ND if self.norm is None else self.norm.apply(x_ND)
            x_hat = self.ae(self.params, x_ND)
            return (x_hat if self.norm is None else self.norm.invert(x_hat)).reshape(x.shape)

        return _at_tokens(resid, self.tokens, reconstruct)


def splice(ae: SAE, params: SAEParams, norm: Normalization | None = None, tokens=None) -> Splice:
    """`resid -> decode(encode(resid))` at the token positions `tokens` (all when None; e.g.
    `activations.token_indices(bb.layout, "patches")`): the SAE spliced into the model, as
    spliced-in fidelity (`saejax.fidelity`) runs it. Only those tokens go through the SAE."""
    return Splice(ae, params, norm, _positions(tokens))


@flax.struct.dataclass
class ReplaceTokens:
    """The residual at `tokens` set to `values`; build it with `replace_tokens`."""

    values: jax.Array
    tokens: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    def __call__(self, resid: jax.Array) -> jax.Array:
        return _at_tokens(resid, self.tokens, lambda x: jnp.broadcast_to(self.values, x.shape))


def replace_tokens(values, tokens=None) -> ReplaceTokens:
    """Set the residual at the token positions `tokens` (all when None) to `values`, broadcast
    against `[..., D]`: a [D] mean activation for mean ablation, 0 for zero ablation."""
    return ReplaceTokens(jnp.asarray(values, jnp.float32), _positions(tokens))


@flax.struct.dataclass
class DirectionEdit:
    """`resid + scale * direction` on the masked tokens: steering without an SAE."""

    direction: jax.Array
    scale: jax.Array
    mask: jax.Array | None = None

    def __call__(self, resid: jax.Array) -> jax.Array:
        steered = resid + (self.scale * self.direction).astype(resid.dtype)
        return _masked(resid, steered, self.mask)


@flax.struct.dataclass
class DirectionWhereFiring:
    """`resid + scale * direction` on the tokens where an SAE latent fires: the random-direction
    baseline matched to a where-active edit (same tokens, same norm). `edit` supplies the codes;
    `mask` (as for the latent edits) limits the tokens further."""

    edit: SAEEdit
    latent: jax.Array
    direction: jax.Array
    scale: jax.Array
    mask: jax.Array | None = None

    def __call__(self, resid: jax.Array) -> jax.Array:
        fires = self.edit.codes(resid)[..., self.latent] > 0
        if self.mask is not None:
            fires = fires & jnp.asarray(self.mask, bool)
        return jnp.where(fires[..., None], resid + (self.scale * self.direction).astype(resid.dtype), resid)


def direction_edit(direction, scale=1.0, mask=None) -> DirectionEdit:
    """Add `scale * direction` ([D]) to the residual of the masked tokens."""
    return DirectionEdit(jnp.asarray(direction, jnp.float32), jnp.asarray(scale, jnp.float32), mask)


__all__ = ["set_to", "scale", "add", "ablate", "chain", "sae_edit", "check_latent_ids", "splice", "replace_tokens",
           "direction_edit", "SetLatents", "ScaleLatents", "AddLatents", "Chain", "SAEEdit", "Splice", "ReplaceTokens",
           "DirectionEdit", "DirectionWhereFiring"]


def __getattr__(name):
    # `set` until saejax 0.3: the old name shadowed the builtin.
    if name == "set":
        warnings.warn("saejax.interventions.set is deprecated (it shadowed the builtin): use set_to, with the same "
                      "arguments; set goes away in saejax 0.3", DeprecationWarning, stacklevel=2)
        return set_to
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
