"""SAE quality metrics: pure, jittable functions of inputs, reconstructions and codes.

Per batch: `l0`, `mse`, `normalized_mse`, `explained_variance`. Over an evaluation window,
accumulate `FiringStats` batch by batch (`update`), then read per-latent firing frequency,
mean activation when firing, and the dead and dense fractions.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

DENSE_FREQUENCY = 1e-2  # the paper: a latent firing on more than 1% of inputs is dense


def l0(z_NF: jax.Array) -> jax.Array:
    """Mean number of non-zero latents per input."""
    return jnp.mean(jnp.sum(z_NF != 0, axis=-1))


def mse(x_ND: jax.Array, x_hat_ND: jax.Array) -> jax.Array:
    """Mean squared error over inputs and dimensions."""
    return jnp.mean((x_hat_ND - x_ND) ** 2)


def normalized_mse(x_ND: jax.Array, x_hat_ND: jax.Array) -> jax.Array:
    """MSE divided by the variance of `x` around its batch mean (predicting the mean scores 1)."""
    return mse(x_ND, x_hat_ND) / jnp.mean((x_ND - jnp.mean(x_ND, axis=0)) ** 2)


def explained_variance(x_ND: jax.Array, x_hat_ND: jax.Array) -> jax.Array:
    """`1 - Var(x - x_hat) / Var(x)`, variances summed over dimensions. Unlike `1 - nmse`, a
    constant offset of the reconstruction is not counted against it."""
    residual_var = jnp.sum(jnp.var(x_ND - x_hat_ND, axis=0))
    return 1.0 - residual_var / jnp.sum(jnp.var(x_ND, axis=0))


@flax.struct.dataclass
class FiringStats:
    """Running per-latent statistics over an evaluation window.

    Attributes:
        n_inputs: scalar, inputs seen.
        counts: [F] inputs on which each latent fired.
        sums: [F] sum of each latent's values.
        maxes: [F] largest value seen (0 if never fired).
    """

    n_inputs: jax.Array
    counts: jax.Array
    sums: jax.Array
    maxes: jax.Array

    @classmethod
    def zeros(cls, d_sae: int) -> FiringStats:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((d_sae,), jnp.float32), jnp.zeros((d_sae,), jnp.float32),
                   jnp.zeros((d_sae,), jnp.float32))

    def update(self, z_NF: jax.Array) -> FiringStats:
        """Add a batch of codes [N, F]."""
        return FiringStats(
            n_inputs=self.n_inputs + z_NF.shape[0],
            counts=self.counts + jnp.sum(z_NF > 0, axis=0),
            sums=self.sums + jnp.sum(z_NF, axis=0),
            maxes=jnp.maximum(self.maxes, jnp.max(z_NF, axis=0)),
        )

    def frequency(self) -> jax.Array:
        """[F] fraction of inputs on which each latent fired."""
        return self.counts / jnp.maximum(self.n_inputs, 1)

    def mean_when_firing(self) -> jax.Array:
        """[F] mean value of each latent over the inputs where it fired (0 if it never did)."""
        return self.sums / jnp.maximum(self.counts, 1)

    def dead_fraction(self) -> jax.Array:
        """Fraction of latents that never fired in the window."""
        return jnp.mean(self.counts == 0)

    def dense_fraction(self, threshold: float = DENSE_FREQUENCY) -> jax.Array:
        """Fraction of latents firing on more than `threshold` of inputs."""
        return jnp.mean(self.frequency() > threshold)

    def summary(self) -> dict[str, jax.Array]:
        """Scalar window metrics plus the per-latent arrays."""
        return dict(dead_fraction=self.dead_fraction(), dense_fraction=self.dense_fraction(),
                    frequency=self.frequency(), mean_when_firing=self.mean_when_firing(), max=self.maxes)
