"""Input normalisation of activations, stored with the SAE that was trained on it.

The reference (saev) centres activations and divides by one scalar so that the mean L2 norm of
a centred activation is sqrt(D): `x_norm = (x - mean) / scalar`. `fold_normalization` rewrites
an SAE's parameters so that the SAE takes and returns raw activations with the same latents.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from saejax.core.sae import SAEParams


@flax.struct.dataclass
class Normalization:
    """`x_norm = (clip(x) - mean) / scalar`.

    Attributes:
        mean: [D] activation mean.
        scalar: scalar divisor, mean ||x - mean|| / sqrt(D).
        clip: `(low, high)` bounds applied to raw activations first, or None. saev's published
            DINOv2 SAE was used with `(-1e-5, 1e5)`; saejax's own statistics have none.
    """

    mean: jax.Array
    scalar: jax.Array
    clip: tuple[float, float] | None = flax.struct.field(pytree_node=False, default=None)

    def apply(self, x_ND: jax.Array) -> jax.Array:
        """Raw -> normalised activations."""
        if self.clip is not None:
            x_ND = jnp.clip(x_ND, *self.clip)
        return (x_ND - self.mean) / self.scalar

    def invert(self, x_ND: jax.Array) -> jax.Array:
        """Normalised -> raw activations."""
        return x_ND * self.scalar + self.mean

    def invert_delta(self, delta_ND: jax.Array) -> jax.Array:
        """A difference of normalised activations -> the same difference in raw space."""
        return delta_ND * self.scalar

    @classmethod
    def identity(cls, d_model: int) -> Normalization:
        return cls(mean=jnp.zeros((d_model,), jnp.float32), scalar=jnp.ones((), jnp.float32))


def estimate_normalization(x_ND: jax.Array) -> Normalization:
    """Statistics from a sample of raw activations (the reference uses 2**19 of them).

    >>> norm = estimate_normalization(sample_ND)
    >>> jnp.mean(jnp.linalg.norm(norm.apply(sample_ND), axis=1))   # == sqrt(D)
    """
    x_ND = jnp.asarray(x_ND, jnp.float32)
    mean = jnp.mean(x_ND, axis=0)
    mean_norm = jnp.mean(jnp.linalg.norm(x_ND - mean, axis=1))
    return Normalization(mean=mean, scalar=mean_norm / math.sqrt(x_ND.shape[1]))


def fold_normalization(params: SAEParams, norm: Normalization) -> SAEParams:
    """Parameters that act on raw activations exactly as `params` act on normalised ones.

    With `x' = (x - m) / s`: `(x' - b_dec) @ w_enc = (x - (m + s b_dec)) @ (w_enc / s)` and
    `s (z @ w_dec + b_dec) + m = z @ (s w_dec) + (m + s b_dec)`, so the latents are unchanged and
    the reconstruction comes out in raw space. Decoder rows are then no longer unit norm.
    """
    if norm.clip is not None:
        raise ValueError(f"a normalisation that clips activations to {norm.clip} cannot be folded into the weights; "
                         f"apply it to the inputs instead")
    s = norm.scalar
    return params.replace(
        w_enc=params.w_enc / s,
        w_dec=params.w_dec * s,
        b_dec=norm.mean + s * params.b_dec,
    )
