"""SAE quality metrics: pure, jittable functions of inputs, reconstructions, codes and weights.

Per batch: `l0`, `mse`, `normalized_mse`, `explained_variance`, `cosine_similarity`,
`l2_ratio`, `relative_reconstruction_bias`. Over an evaluation window, accumulate
`FiringStats` batch by batch (`update`), then read per-latent firing frequency, mean
activation when firing, the dead and dense fractions, and `log10_frequency_histogram`. Of the
dictionary itself: `encoder_decoder_cosine` and `max_decoder_cosine` (near-duplicate latents).
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


def cosine_similarity(x_ND: jax.Array, x_hat_ND: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Mean over inputs of cos(x, x_hat)."""
    dot = jnp.sum(x_ND * x_hat_ND, axis=-1)
    return jnp.mean(dot / jnp.maximum(jnp.linalg.norm(x_ND, axis=-1) * jnp.linalg.norm(x_hat_ND, axis=-1), eps))


def l2_ratio(x_ND: jax.Array, x_hat_ND: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Mean over inputs of ||x_hat|| / ||x|| (SAELens' `l2_ratio`): below 1 means shrinkage."""
    return jnp.mean(jnp.linalg.norm(x_hat_ND, axis=-1) / jnp.maximum(jnp.linalg.norm(x_ND, axis=-1), eps))


def relative_reconstruction_bias(x_ND: jax.Array, x_hat_ND: jax.Array) -> jax.Array:
    """gamma = E[||x_hat||^2] / E[x_hat . x] (Rajamanoharan et al. 2024, Gated SAEs): the scale
    `gamma` minimising E||x_hat / gamma - x||^2. 1 is unbiased; below 1, the SAE shrinks."""
    return jnp.sum(x_hat_ND**2) / jnp.sum(x_hat_ND * x_ND)


def encoder_decoder_cosine(w_enc_DF: jax.Array, w_dec_FD: jax.Array, eps: float = 1e-8) -> jax.Array:
    """[F] cosine between each latent's encoder column and its decoder row."""
    dot = jnp.sum(w_enc_DF.T * w_dec_FD, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(w_enc_DF, axis=0) * jnp.linalg.norm(w_dec_FD, axis=-1), eps)


def max_decoder_cosine(w_dec_FD: jax.Array, *, block: int = 1024) -> jax.Array:
    """[F] each latent's largest decoder cosine with any OTHER latent (near 1: a near-duplicate).

    Computed `block` rows at a time, so the [F, F] cosine matrix never exists (131k latents:
    a 69 GB matrix otherwise)."""
    f = w_dec_FD.shape[0]
    rows = w_dec_FD / jnp.maximum(jnp.linalg.norm(w_dec_FD, axis=-1, keepdims=True), 1e-8)
    block = min(block, f)
    n_blocks = -(-f // block)
    padded = jnp.pad(rows, ((0, n_blocks * block - f), (0, 0)))

    def one(i):
        cos = jax.lax.dynamic_slice_in_dim(padded, i * block, block) @ rows.T  # [block, F]
        own = i * block + jnp.arange(block)
        return jnp.max(jnp.where(own[:, None] == jnp.arange(f)[None, :], -jnp.inf, cos), axis=-1)

    return jax.lax.map(one, jnp.arange(n_blocks)).reshape(-1)[:f]


LOG10_FREQUENCY_BINS = tuple(x / 4 for x in range(-32, 1))  # 10^-8 .. 10^0 in quarter decades


def log10_frequency_histogram(frequency_F: jax.Array, edges=LOG10_FREQUENCY_BINS) -> tuple[jax.Array, jax.Array]:
    """`(counts, n_dead)`: latents per bin of log10(firing frequency) between consecutive
    `edges` (a frequency below the first edge counts in the first bin), and the latents that
    never fired (frequency 0, which has no log)."""
    edges = jnp.asarray(edges, jnp.float32)
    alive = frequency_F > 0
    log_f = jnp.log10(jnp.where(alive, frequency_F, 1.0))
    index = jnp.clip(jnp.searchsorted(edges, log_f, side="right") - 1, 0, len(edges) - 2)
    counts = jnp.zeros((len(edges) - 1,), jnp.int32).at[index].add(alive.astype(jnp.int32))
    return counts, jnp.sum(~alive)


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
