"""SAE quality metrics: pure, jittable functions of inputs, reconstructions, codes and weights.

Per batch: `l0`, `mse`, `normalized_mse`, `explained_variance`, `cosine_similarity`,
`l2_ratio`, `relative_reconstruction_bias`. Over an evaluation window, accumulate
`ReconstructionSums` batch by batch (`update`), then read the same metrics as if computed on
all the rows at once (`result`); and `FiringStats`, then read per-latent firing frequency, mean
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
class ReconstructionSums:
    """Running sums over an evaluation window, from which `result` reads the per-batch
    reconstruction metrics above as they would be on all the rows at once (variances and
    ratios of sums, not means of per-batch values). A pytree; `merge` adds two windows.

    Attributes:
        n: rows seen.
        squared_error: sum of ||x - x_hat||^2.
        x_sum, x_sq: [D] sums of x and x^2.
        residual_sum, residual_sq: [D] sums of x - x_hat and (x - x_hat)^2.
        cosine_sum: sum of cos(x, x_hat).
        ratio_sum: sum of ||x_hat|| / ||x||.
        hat_sq, hat_dot_x: sums of ||x_hat||^2 and x_hat . x.
    """

    n: jax.Array
    squared_error: jax.Array
    x_sum: jax.Array
    x_sq: jax.Array
    residual_sum: jax.Array
    residual_sq: jax.Array
    cosine_sum: jax.Array
    ratio_sum: jax.Array
    hat_sq: jax.Array
    hat_dot_x: jax.Array

    @classmethod
    def zeros(cls, d_model: int) -> ReconstructionSums:
        scalar, vector = jnp.zeros((), jnp.float32), jnp.zeros((d_model,), jnp.float32)
        return cls(scalar, scalar, vector, vector, vector, vector, scalar, scalar, scalar, scalar)

    def update(self, x_ND: jax.Array, x_hat_ND: jax.Array, eps: float = 1e-8) -> ReconstructionSums:
        """Add a batch of inputs and their reconstructions [N, D]."""
        residual = x_ND - x_hat_ND
        norm_x, norm_hat = jnp.linalg.norm(x_ND, axis=-1), jnp.linalg.norm(x_hat_ND, axis=-1)
        return self.merge(ReconstructionSums(
            n=jnp.asarray(x_ND.shape[0], jnp.float32), squared_error=jnp.sum(residual**2),
            x_sum=jnp.sum(x_ND, 0), x_sq=jnp.sum(x_ND**2, 0), residual_sum=jnp.sum(residual, 0),
            residual_sq=jnp.sum(residual**2, 0),
            cosine_sum=jnp.sum(jnp.sum(x_ND * x_hat_ND, -1) / jnp.maximum(norm_x * norm_hat, eps)),
            ratio_sum=jnp.sum(norm_hat / jnp.maximum(norm_x, eps)), hat_sq=jnp.sum(x_hat_ND**2),
            hat_dot_x=jnp.sum(x_hat_ND * x_ND)))

    def merge(self, other: ReconstructionSums) -> ReconstructionSums:
        """The sums of both windows (other rows, devices or processes)."""
        return jax.tree.map(jnp.add, self, other)

    def result(self) -> dict[str, jax.Array]:
        """`mse`, `nmse` (`normalized_mse`), `explained_variance`, `cosine` (`cosine_similarity`),
        `l2_ratio` and `relative_reconstruction_bias` of every row seen."""
        n, d = self.n, self.x_sum.shape[-1]
        var_x = jnp.sum(self.x_sq / n - (self.x_sum / n) ** 2, axis=-1)
        var_residual = jnp.sum(self.residual_sq / n - (self.residual_sum / n) ** 2, axis=-1)
        mse_ = self.squared_error / (n * d)
        return {"mse": mse_, "nmse": mse_ * d / var_x, "explained_variance": 1 - var_residual / var_x,
                "cosine": self.cosine_sum / n, "l2_ratio": self.ratio_sum / n,
                "relative_reconstruction_bias": self.hat_sq / self.hat_dot_x}


@flax.struct.dataclass
class FiringStats:
    """Running per-latent statistics over an evaluation window: the one firing accumulator
    (evaluation, discovery's attribution scores, the probe edits' latent statistics).

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

    def update(self, z_NF: jax.Array, weights_N: jax.Array | None = None) -> FiringStats:
        """Add a batch of codes [N, F] (`weights_N`: 1 for an input, 0 for padding; all ones
        when None)."""
        if weights_N is None:
            return FiringStats(
                n_inputs=self.n_inputs + z_NF.shape[0],
                counts=self.counts + jnp.sum(z_NF > 0, axis=0),
                sums=self.sums + jnp.sum(z_NF, axis=0),
                maxes=jnp.maximum(self.maxes, jnp.max(z_NF, axis=0)),
            )
        w = weights_N.astype(jnp.float32)[:, None]
        return FiringStats(
            n_inputs=self.n_inputs + jnp.sum(w),
            counts=self.counts + jnp.sum((z_NF > 0) * w, axis=0),
            sums=self.sums + jnp.sum(z_NF * w, axis=0),
            maxes=jnp.maximum(self.maxes, jnp.max(jnp.where(w > 0, z_NF, 0), axis=0)),
        )

    def reduce(self) -> FiringStats:
        """Statistics stacked along a leading axis (devices, processes, members of a window)
        merged into one."""
        return FiringStats(jnp.sum(self.n_inputs, 0), jnp.sum(self.counts, 0), jnp.sum(self.sums, 0),
                           jnp.max(self.maxes, 0))

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
