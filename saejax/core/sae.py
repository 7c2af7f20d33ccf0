"""Sparse autoencoder architectures: ReLU (the paper), TopK, BatchTopK, JumpReLU and Gated.

Each constructor closes over static sizes and returns an `SAE`, a frozen (hashable) bundle of
pure functions over an explicit `SAEParams` pytree:

>>> ae = topk(d_model=768, d_sae=16_384, k=32)
>>> params = ae.init(jax.random.key(0))
>>> z = ae.encode(params, x)          # [N, D] -> [N, F]
>>> x_hat = ae.decode(params, z)      # [N, F] -> [N, D]

Shapes: N inputs, D = `d_model`, F = `d_sae` latents, K = `k` (the static top-k size).
All architectures share `pre = (x - b_dec) @ w_enc + b_enc` (the reference's forward, bit for
bit) and `x_hat = z @ w_dec + b_dec`; they differ in how `z` is made from `pre`.

Mixed precision: `SAE.compute_dtype` (e.g. `jnp.bfloat16`) casts the inputs of the encoder and
decoder matmuls, forward and backward, and accumulates them in float32
(`preferred_element_type`). Everything else stays in the parameters' float32: the
pre-activations, the code, the reconstruction, the loss, the gradients, Adam and the decoder
renormalisation. A TopK code's sparse decode and K-sparse encoder gradient are gathers and
scatter-adds, not matmuls, and stay float32.

Long because it holds every registered architecture with its custom VJPs; each is short, and they share the SAE bundle and its checks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from saejax.sharding import DATA, MODEL



@flax.struct.dataclass
class SAEParams:
    """Parameters of one SAE. Row `i` of `w_dec` is latent `i`'s direction.

    Attributes:
        w_enc: [D, F] encoder weights.
        b_enc: [F] encoder bias.
        w_dec: [F, D] decoder weights.
        b_dec: [D] decoder bias, also subtracted before encoding.
        threshold: [F] JumpReLU thresholds (trained) or the BatchTopK inference threshold
            (estimated during training); None for the others.
        r_mag: [F] Gated: the magnitude path's per-latent log-rescale of `w_enc`'s columns.
        b_mag: [F] Gated: the magnitude path's bias (`b_enc` is the gate's bias).
    """

    w_enc: jax.Array
    b_enc: jax.Array
    w_dec: jax.Array
    b_dec: jax.Array
    threshold: jax.Array | None = None
    r_mag: jax.Array | None = None
    b_mag: jax.Array | None = None


class Encoding(NamedTuple):
    """A training-time forward: dense pre-activations plus the code, dense or sparse.

    Attributes:
        pre_acts: [N, F] pre-activations.
        z: [N, F] dense code, or None when the code is only kept sparse.
        top_idx: [N, K] latent ids of a TopK code (None otherwise).
        top_vals: [N, K] their values; slots past a member's dynamic k hold 0.
        batch_threshold: scalar, the smallest kept value of a BatchTopK batch (else None).
        gate: [N, F] Gated: `relu(pi_gate)`, what the sparsity penalty and the auxiliary
            reconstruction read (else None).
    """

    pre_acts: jax.Array
    z: jax.Array | None = None
    top_idx: jax.Array | None = None
    top_vals: jax.Array | None = None
    batch_threshold: jax.Array | None = None
    gate: jax.Array | None = None

    def firing_counts(self) -> jax.Array:
        """[F] number of inputs on which each latent is non-zero."""
        if self.z is not None:
            return jnp.sum(self.z > 0, axis=0, dtype=jnp.int32)
        d_sae = self.pre_acts.shape[-1]
        return jnp.zeros((d_sae,), jnp.int32).at[self.top_idx].add((self.top_vals > 0).astype(jnp.int32))

    def l0(self) -> jax.Array:
        """Mean number of non-zero latents per input."""
        active = (self.top_vals if self.z is None else self.z) > 0
        return jnp.sum(active) / self.pre_acts.shape[0]

    def dense(self) -> jax.Array:
        """[N, F] the code as a dense array."""
        if self.z is not None:
            return self.z
        return _scatter_rows(self.top_idx, self.top_vals, self.pre_acts.shape[-1])


def _scatter_rows(idx_NK, vals_NK, d_sae):
    n = idx_NK.shape[0]
    return jnp.zeros((n, d_sae), vals_NK.dtype).at[jnp.arange(n)[:, None], idx_NK].set(vals_NK)


def matmul(a, b, compute_dtype=None):
    """`a @ b`; with a `compute_dtype`, its inputs are cast to it and the product is
    accumulated and returned in float32, and so are the two matmuls of its gradient."""
    if compute_dtype is None:
        return a @ b
    return _mixed_matmul(a, b, compute_dtype)


def _low_matmul(a, b, compute_dtype):
    return jnp.matmul(a.astype(compute_dtype), b.astype(compute_dtype), preferred_element_type=jnp.float32)


# Autodiff of a matmul with float32 output would run its gradient matmuls on the float32
# cotangent; these run them in `compute_dtype` as well.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(a, b, compute_dtype):
    return _low_matmul(a, b, compute_dtype)


def _mixed_matmul_fwd(a, b, compute_dtype):
    return _low_matmul(a, b, compute_dtype), (a, b)


def _mixed_matmul_bwd(compute_dtype, residuals, g):
    a, b = residuals
    return (_low_matmul(g, b.T, compute_dtype).astype(a.dtype),
            _low_matmul(a.T, g, compute_dtype).astype(b.dtype))


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


# (x - b) @ w, with a backward pass that sums the b gradient over the batch *before* the
# matmul: one [D, F] vector-matrix product instead of a full [N, D] x [D, F] matmul.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def centered_matmul(x_ND, b_D, w_DF, compute_dtype=None):
    """`(x - b) @ w` whose gradient for `b` costs a vector-matrix product, not a matmul."""
    return matmul(x_ND - b_D, w_DF, compute_dtype)


def _centered_matmul_fwd(x_ND, b_D, w_DF, compute_dtype):
    centered_ND = x_ND - b_D
    return matmul(centered_ND, w_DF, compute_dtype), (centered_ND, w_DF)


def _centered_matmul_bwd(compute_dtype, residuals, g_NF):
    centered_ND, w_DF = residuals
    g_x_ND = matmul(g_NF, w_DF.T, compute_dtype)  # dead code (removed by XLA) unless x is differentiated
    g_b_D = -(jnp.sum(g_NF, axis=0) @ w_DF.T)
    g_w_DF = matmul(centered_ND.T, g_NF, compute_dtype)
    return g_x_ND.astype(centered_ND.dtype), g_b_D, g_w_DF.astype(w_DF.dtype)


centered_matmul.defvjp(_centered_matmul_fwd, _centered_matmul_bwd)


# TopK values with a K-sparse backward pass. Autodiff of `top_k` scatters the [N, K] gradient
# into a dense [N, F] array and pays a full [D, N] x [N, F] matmul plus an [N, F] column sum
# for the encoder gradients, though only N*K of those entries are non-zero.
@jax.custom_vjp
def take_topk(vals_NK, idx_NK, x_ND, b_dec_D, w_DF, b_enc_F):
    """The selected pre-activations `vals = pre[n, idx]` (returned as they are), where
    `pre = (x - b_dec) @ w + b_enc`.

    Differentiable in `x`, `b_dec`, `w` and `b_enc` through the K selected entries only
    (scatter-adds of N*K rows); `vals` and `idx` get no gradient (pass stopped values).
    """
    return vals_NK


def _take_topk_fwd(vals_NK, idx_NK, x_ND, b_dec_D, w_DF, b_enc_F):
    return vals_NK, (idx_NK, x_ND - b_dec_D, w_DF)


def _take_topk_bwd(residuals, g_NK):
    idx_NK, centered_ND, w_DF = residuals
    (n, k), (d, f) = idx_NK.shape, w_DF.shape
    flat_idx = idx_NK.reshape(-1)
    # Scatter rows of the [F, D] gradient (contiguous; columns of [D, F] are ~2x slower on
    # CPU), then transpose once.
    rows_MD = (g_NK[..., None] * centered_ND[:, None, :]).reshape(n * k, d)
    g_w_DF = jnp.zeros((f, d), g_NK.dtype).at[flat_idx].add(rows_MD).T
    g_b_enc_F = jnp.zeros((f,), g_NK.dtype).at[flat_idx].add(g_NK.reshape(-1))
    g_x_ND = jnp.einsum("nk,nkd->nd", g_NK, w_DF.T[idx_NK])  # dead code unless x is differentiated
    return None, None, g_x_ND, -(w_DF @ g_b_enc_F), g_w_DF, g_b_enc_F


take_topk.defvjp(_take_topk_fwd, _take_topk_bwd)


def distributed_top_k(x_NF: jax.Array, k: int, mesh: Mesh | None = None, *,
                      shard_latents: bool = False) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` over latents (the same values and indices, ties to the lower
    index), computed on each device's own rows.

    XLA does not partition a top-k: left to itself it gathers the whole [N, F] array onto every
    device. Under `mesh` the top-k runs in a `shard_map` over the rows' `data` split instead;
    with `shard_latents`, each device also takes the top-k of its own slice of latents, and a
    top-k of the `model * k` candidates merges them, so only the candidates cross devices.
    """
    n, f = x_NF.shape
    if mesh is None or n % mesh.shape[DATA] or (mesh.shape[DATA] == 1 and not shard_latents):
        return jax.lax.top_k(x_NF, k)
    slices = mesh.shape[MODEL] if shard_latents and f % mesh.shape[MODEL] == 0 else 1
    width = f // slices

    def local(x):
        vals, idx = jax.lax.top_k(x, min(k, width))
        if slices == 1:
            return vals, idx
        return vals, idx + jax.lax.axis_index(MODEL) * width

    spec = PartitionSpec(DATA, MODEL if slices > 1 else None)
    vals, idx = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(x_NF)
    if slices == 1:
        return vals, idx

    def merge(vals, idx):
        top_vals, pos = jax.lax.top_k(vals, k)
        return top_vals, jnp.take_along_axis(idx, pos, axis=-1)

    rows = PartitionSpec(DATA, None)
    return jax.shard_map(merge, mesh=mesh, in_specs=rows, out_specs=(rows, rows))(vals, idx)


# JumpReLU with the straight-through estimators of Rajamanoharan et al. (2024): a rectangle
# kernel of width `bandwidth` gives the threshold a pseudo-gradient.
def _rectangle(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump_relu(pre_NF, threshold_F, bandwidth):
    """`pre * (pre > threshold)`; the threshold gets the kernel pseudo-gradient."""
    return pre_NF * (pre_NF > threshold_F)


def _jump_relu_fwd(pre_NF, threshold_F, bandwidth):
    return jump_relu(pre_NF, threshold_F, bandwidth), (pre_NF, threshold_F)


def _jump_relu_bwd(bandwidth, residuals, g_NF):
    pre_NF, threshold_F = residuals
    g_pre = g_NF * (pre_NF > threshold_F)
    kernel = _rectangle((pre_NF - threshold_F) / bandwidth)
    g_threshold = jnp.sum(-(threshold_F / bandwidth) * kernel * g_NF, axis=0)
    return g_pre, g_threshold


jump_relu.defvjp(_jump_relu_fwd, _jump_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_function(pre_NF, threshold_F, bandwidth):
    """Heaviside `pre > threshold` as float; the threshold gets the kernel pseudo-gradient."""
    return (pre_NF > threshold_F).astype(pre_NF.dtype)


def _step_fwd(pre_NF, threshold_F, bandwidth):
    return step_function(pre_NF, threshold_F, bandwidth), (pre_NF, threshold_F)


def _step_bwd(bandwidth, residuals, g_NF):
    pre_NF, threshold_F = residuals
    kernel = _rectangle((pre_NF - threshold_F) / bandwidth)
    g_threshold = jnp.sum(-(1.0 / bandwidth) * kernel * g_NF, axis=0)
    return jnp.zeros_like(pre_NF), g_threshold


step_function.defvjp(_step_fwd, _step_bwd)


# ------------------------------------------------------------------------ the architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one SAE architecture makes its code, and what it adds to the parameters and the loss.

    A new architecture is a subclass (a frozen dataclass) with its `name`, the `SAE` config
    fields it reads (`uses`, all `to_config` writes for it), the `SAEParams` fields it owns
    (`extra_params`, each [F]), and `encode_train`; `register` it and a constructor function
    builds `SAE(name, ...)`. The hooks below have defaults that fit most architectures.
    """

    name: ClassVar[str]
    uses: ClassVar[tuple[str, ...]] = ()  # SAE fields among k, threshold_init, bandwidth, threshold_decay
    extra_params: ClassVar[tuple[str, ...]] = ()  # SAEParams fields beyond w_enc, b_enc, w_dec, b_dec
    resampled_params: ClassVar[tuple[str, ...]] = ()  # extra params reset to 0 for a resampled latent
    trains_threshold: ClassVar[bool] = False  # a learned threshold: the L0 penalty applies
    tied_init: ClassVar[bool] = False  # `SAE.tied_init`'s default for this architecture

    def check(self, ae: SAE) -> None:
        """Raises ValueError when `ae`'s config does not fit this architecture."""

    def init_extra(self, ae: SAE, dtype) -> dict[str, jax.Array]:
        """Initial values of `extra_params`."""
        return {}

    def encode_train(self, ae: SAE, params: SAEParams, x_ND: jax.Array, k) -> Encoding:
        """The training-time code (see `SAE.encode_train`)."""
        raise NotImplementedError

    def encode(self, ae: SAE, params: SAEParams, x_ND: jax.Array, k) -> jax.Array:
        """The inference code [N, F] (see `SAE.encode`)."""
        return self.encode_train(ae, params, x_ND, k).dense()

    def after_update(self, ae: SAE, params: SAEParams, enc: Encoding, step: jax.Array) -> SAEParams:
        """What a training step does to `params` after the optimizer update."""
        return params

    def auxiliary_loss(self, ae: SAE, params: SAEParams, x_ND: jax.Array, enc: Encoding) -> jax.Array:
        """A loss term of the architecture itself, added with weight 1 (0 for most)."""
        return jnp.zeros(())


ARCHITECTURE_REGISTRY: dict[str, Architecture] = {}


def register(architecture: type[Architecture]) -> type[Architecture]:
    """Class decorator: makes `SAE(architecture.name, ...)` build this architecture."""
    ARCHITECTURE_REGISTRY[architecture.name] = architecture()
    return architecture


@register
@dataclasses.dataclass(frozen=True)
class ReluArchitecture(Architecture):
    """The paper's: `z = relu(pre)`."""

    name: ClassVar[str] = "relu"

    def encode_train(self, ae, params, x_ND, k):
        pre = ae.pre_activations(params, x_ND)
        return Encoding(pre, z=jax.nn.relu(pre))


def _needs_k(ae):
    if ae.k is None or not 0 < ae.k <= ae.d_sae:
        raise ValueError(f"{ae.architecture} needs 0 < k <= d_sae={ae.d_sae}, got k={ae.k}")


@register
@dataclasses.dataclass(frozen=True)
class TopKArchitecture(Architecture):
    """Keep the k largest pre-activations (then ReLU); the code stays sparse for the decode."""

    name: ClassVar[str] = "topk"
    uses: ClassVar[tuple[str, ...]] = ("k",)
    tied_init: ClassVar[bool] = True

    def check(self, ae):
        _needs_k(ae)

    def encode_train(self, ae, params, x_ND, k):
        pre = ae.pre_activations(params, x_ND)
        # The dense `pre` only chooses the latents; the chosen values carry a K-sparse
        # gradient (`take_topk`). `pre_acts` stays differentiable for AuxK.
        chosen = jax.lax.stop_gradient(pre)
        vals, idx = ae.top_k(chosen, ae.k)
        vals = jax.nn.relu(take_topk(vals, idx, x_ND, params.b_dec, params.w_enc, params.b_enc))
        if k is not None:
            vals = jnp.where(jnp.arange(ae.k) < k, vals, 0.0)
        return Encoding(pre, top_idx=idx, top_vals=vals)


@register
@dataclasses.dataclass(frozen=True)
class BatchTopKArchitecture(Architecture):
    """The k*N largest (positive) activations of the whole batch in training; at inference a
    threshold estimated during training, so one input's code never depends on others."""

    name: ClassVar[str] = "batchtopk"
    uses: ClassVar[tuple[str, ...]] = ("k", "threshold_decay")
    extra_params: ClassVar[tuple[str, ...]] = ("threshold",)
    tied_init: ClassVar[bool] = True

    def check(self, ae):
        _needs_k(ae)

    def init_extra(self, ae, dtype):
        return {"threshold": jnp.zeros((ae.d_sae,), dtype)}

    def encode_train(self, ae, params, x_ND, k):
        pre = ae.pre_activations(params, x_ND)
        n = x_ND.shape[0]
        acts = jax.nn.relu(pre)
        top = jax.lax.top_k(acts.reshape(-1), ae.k * n)[0]
        kth = top[-1] if k is None else top[k * n - 1]
        keep = (acts >= kth) & (acts > 0)
        smallest_kept = jnp.min(jnp.where(keep, acts, jnp.inf))
        return Encoding(pre, z=jnp.where(keep, acts, 0.0), batch_threshold=smallest_kept)

    def encode(self, ae, params, x_ND, k):
        pre = ae.pre_activations(params, x_ND)
        return jnp.where(pre > params.threshold, pre, 0.0)

    def after_update(self, ae, params, enc, step):
        """This batch's smallest kept value is folded into the inference threshold (the first
        batch sets it)."""
        batch = jnp.broadcast_to(enc.batch_threshold, params.threshold.shape)
        ema = ae.threshold_decay * params.threshold + (1 - ae.threshold_decay) * batch
        return params.replace(threshold=jnp.where(step == 0, batch, ema))


@register
@dataclasses.dataclass(frozen=True)
class JumpReluArchitecture(Architecture):
    """`z = pre * (pre > threshold)` with a trained threshold and straight-through gradients."""

    name: ClassVar[str] = "jumprelu"
    uses: ClassVar[tuple[str, ...]] = ("threshold_init", "bandwidth")
    extra_params: ClassVar[tuple[str, ...]] = ("threshold",)
    trains_threshold: ClassVar[bool] = True
    tied_init: ClassVar[bool] = True

    def init_extra(self, ae, dtype):
        return {"threshold": jnp.full((ae.d_sae,), ae.threshold_init, dtype)}

    def encode_train(self, ae, params, x_ND, k):
        pre = ae.pre_activations(params, x_ND)
        return Encoding(pre, z=jump_relu(pre, params.threshold, ae.bandwidth))

    def after_update(self, ae, params, enc, step):
        """Thresholds are kept non-negative."""
        return params.replace(threshold=jnp.maximum(params.threshold, 0.0))


@register
@dataclasses.dataclass(frozen=True)
class GatedArchitecture(Architecture):
    """Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude
    path sharing the encoder decides how much.

        pi_gate = (x - b_dec) @ w_enc + b_enc                   (b_enc is the gate's bias)
        pi_mag  = (x - b_dec) @ (w_enc * exp(r_mag)) + b_mag
        z       = 1[pi_gate > 0] * relu(pi_mag)

    The sparsity penalty reads `relu(pi_gate)` (`Encoding.gate`), and `auxiliary_loss` asks
    the gate alone to reconstruct the input through the decoder: with the decoder frozen
    (`stop_gradient`, the paper's choice) unless `gated_aux_decoder_grad`, which is SAELens'
    (6.x) choice. The magnitude path reuses the gate's matmul: scaling `w_enc`'s columns by
    `exp(r_mag)` scales the product's columns alike.
    """

    name: ClassVar[str] = "gated"
    uses: ClassVar[tuple[str, ...]] = ("gated_aux_decoder_grad",)
    extra_params: ClassVar[tuple[str, ...]] = ("r_mag", "b_mag")
    resampled_params: ClassVar[tuple[str, ...]] = ("r_mag", "b_mag")

    def init_extra(self, ae, dtype):
        return {"r_mag": jnp.zeros((ae.d_sae,), dtype), "b_mag": jnp.zeros((ae.d_sae,), dtype)}

    def encode_train(self, ae, params, x_ND, k):
        pi_gate = ae.pre_activations(params, x_ND)
        pi_mag = (pi_gate - params.b_enc) * jnp.exp(params.r_mag) + params.b_mag
        z = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
        return Encoding(pi_gate, z=z, gate=jax.nn.relu(pi_gate))

    def auxiliary_loss(self, ae, params, x_ND, enc):
        w_dec, b_dec = params.w_dec, params.b_dec
        if not ae.gated_aux_decoder_grad:
            w_dec, b_dec = jax.lax.stop_gradient(w_dec), jax.lax.stop_gradient(b_dec)
        via_gate = matmul(enc.gate, w_dec, ae.compute_dtype) + b_dec
        return jnp.mean((via_gate - x_ND) ** 2)


def architectures() -> tuple[str, ...]:
    """The names of every registered architecture, those registered after import included."""
    return tuple(ARCHITECTURE_REGISTRY)


def _kaiming_uniform(key, shape, fan_in, dtype):
    # torch.nn.init.kaiming_uniform_ defaults (a=0, fan_in, leaky_relu gain sqrt(2)).
    bound = (6.0 / fan_in) ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class SAE:
    """A sparse autoencoder architecture: static configuration plus pure functions.

    Build one with `relu`, `topk`, `batchtopk`, `jumprelu` or `gated`. Hashable, so it can be
    a static argument of `jax.jit`. Fields are static; everything numeric lives in
    `SAEParams`. What differs between architectures lives in their `Architecture` (`arch`).

    Attributes:
        architecture: a name in `ARCHITECTURE_REGISTRY` (`architectures()`).
        d_model: D, the width of the activations.
        d_sae: F, the number of latents.
        k: TopK/BatchTopK: latents kept per input (the static maximum; a smaller dynamic k can
            be passed to `encode`, which is how a `vmap` sweep varies k).
        tied_init: initialise `w_enc = w_dec.T` (Gao et al.) instead of independent
            kaiming-uniform matrices (the paper). None: the architecture's default
            (`Architecture.tied_init`: True for TopK, BatchTopK and JumpReLU), so `SAE("topk",
            ...)` and `topk(...)` build the same SAE.
        threshold_init: JumpReLU initial threshold.
        bandwidth: JumpReLU straight-through kernel width.
        threshold_decay: BatchTopK: the inference threshold is an exponential moving average
            of each batch's smallest kept value, with this weight on the old value.
        gated_aux_decoder_grad: Gated: the auxiliary reconstruction also trains the decoder
            (SAELens); False freezes it there (the paper).
        compute_dtype: None (float32 throughout) or a dtype such as `jnp.bfloat16` for the
            inputs of the encoder and decoder matmuls, accumulated in float32 (see the module
            docstring). How to run, not what the SAE is: `to_config` leaves it out.
        mesh: the mesh a jitted training step runs on, with inputs split over its `data` axis:
            top-k selections then run per device (`distributed_top_k`, the same results).
        shard_latents: the latents are split over the mesh's `model` axis.
            `saejax.core.sweep_step.jit_sweep_step` sets both; they are layout, so `to_config`
            leaves them out.
    """

    architecture: str
    d_model: int
    d_sae: int
    k: int | None = None
    tied_init: bool | None = None
    threshold_init: float = 1e-3
    bandwidth: float = 1e-3
    threshold_decay: float = 0.99
    gated_aux_decoder_grad: bool = False
    compute_dtype: Any = None
    mesh: Mesh | None = None
    shard_latents: bool = False

    def __post_init__(self):
        if self.architecture not in ARCHITECTURE_REGISTRY:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of "
                             f"{tuple(ARCHITECTURE_REGISTRY)}")
        if self.d_model <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_model and d_sae must be positive, got d_model={self.d_model}, d_sae={self.d_sae}")
        self.arch.check(self)
        if self.tied_init is None:
            object.__setattr__(self, "tied_init", self.arch.tied_init)
        if self.compute_dtype is not None:
            dtype = jnp.dtype(self.compute_dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"compute_dtype must be a float dtype such as bfloat16, got {self.compute_dtype!r}")
            object.__setattr__(self, "compute_dtype", None if dtype == jnp.float32 else dtype)

    @property
    def arch(self) -> Architecture:
        """This SAE's `Architecture` (from the registry)."""
        return ARCHITECTURE_REGISTRY[self.architecture]

    # ----------------------------------------------------------------------------- params

    def init(self, key: jax.Array, *, decoder_norm: float | None = 1.0, b_dec: jax.Array | None = None,
             dtype=jnp.float32) -> SAEParams:
        """Fresh parameters.

        Args:
            key: a `jax.random.key`.
            decoder_norm: rescale every decoder row to this L2 norm (1.0 for the paper's
                unit-norm decoder); None keeps the raw initialisation.
            b_dec: [D] initial decoder bias (e.g. `data_mean` or `geometric_median` of a data
                sample); zeros when None.
            dtype: parameter dtype.

        Returns:
            `SAEParams`. Biases are zero (except `b_dec` if given).
        """
        d, f = self.d_model, self.d_sae
        k_enc, k_dec = jax.random.split(key)
        # Shapes and fan-ins as torch's kaiming_uniform_ sees saev's tensors: fan_in = size(1).
        w_dec = _kaiming_uniform(k_dec, (f, d), d, dtype)
        if decoder_norm is not None:
            w_dec = decoder_norm * w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
        w_enc = w_dec.T if self.tied_init else _kaiming_uniform(k_enc, (d, f), f, dtype)
        return SAEParams(
            w_enc=w_enc,
            b_enc=jnp.zeros((f,), dtype),
            w_dec=w_dec,
            b_dec=jnp.zeros((d,), dtype) if b_dec is None else jnp.asarray(b_dec, dtype),
            **self.arch.init_extra(self, dtype),
        )

    def check_params(self, params: SAEParams, where: str = "params") -> None:
        """Raises ValueError naming the field when `params` do not fit this architecture."""
        d, f = self.d_model, self.d_sae
        expected = {"w_enc": (d, f), "b_enc": (f,), "w_dec": (f, d), "b_dec": (d,),
                    **{name: (f,) for name in self.arch.extra_params}}
        for name, shape in expected.items():
            value = getattr(params, name)
            if value is None:
                raise ValueError(f"{where}: missing {name!r} (needed by {self.architecture})")
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}: {name!r} has shape {tuple(value.shape)}, expected {shape}")

    # ------------------------------------------------------------------------------ forward

    def pre_activations(self, params: SAEParams, x_ND: jax.Array) -> jax.Array:
        """[N, D] -> [N, F]: `(x - b_dec) @ w_enc + b_enc`."""
        return centered_matmul(x_ND, params.b_dec, params.w_enc, self.compute_dtype) + params.b_enc

    def encode(self, params: SAEParams, x_ND: jax.Array, *, k: jax.Array | int | None = None) -> jax.Array:
        """Inference code. [N, D] -> [N, F].

        Args:
            params: `SAEParams`.
            x_ND: inputs.
            k: TopK only: a dynamic k <= `self.k` (may be traced). BatchTopK uses its
                learned threshold at inference, so one input's code never depends on others.
        """
        return self.arch.encode(self, params, x_ND, k)

    def encode_train(self, params: SAEParams, x_ND: jax.Array, *, k: jax.Array | int | None = None) -> Encoding:
        """Training code: an `Encoding` with the pre-activations (AuxK needs them).

        TopK keeps its code sparse (`top_idx`, `top_vals`) so the decode can gather rows;
        BatchTopK keeps the k*N largest activations of the whole batch.
        """
        return self.arch.encode_train(self, params, x_ND, k)

    def top_k(self, x_NF: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """`jax.lax.top_k` over latents, per device under `mesh` (`distributed_top_k`)."""
        return distributed_top_k(x_NF, k, self.mesh, shard_latents=self.shard_latents)

    def decode(self, params: SAEParams, z_NF: jax.Array) -> jax.Array:
        """[N, F] -> [N, D]: `z @ w_dec + b_dec`."""
        return matmul(z_NF, params.w_dec, self.compute_dtype) + params.b_dec

    def decode_sparse(self, params: SAEParams, idx_NK: jax.Array, vals_NK: jax.Array) -> jax.Array:
        """Decode a sparse code by gathering K decoder rows per input. -> [N, D]."""
        return jnp.einsum("nk,nkd->nd", vals_NK, params.w_dec[idx_NK]) + params.b_dec

    def decode_encoding(self, params: SAEParams, enc: Encoding) -> jax.Array:
        """Decode an `Encoding`, sparsely when it is sparse."""
        if enc.z is None:
            return self.decode_sparse(params, enc.top_idx, enc.top_vals)
        return self.decode(params, enc.z)

    def __call__(self, params: SAEParams, x_ND: jax.Array) -> jax.Array:
        """Reconstruction `decode(encode(x))`."""
        return self.decode(params, self.encode(params, x_ND))

    def after_update(self, params: SAEParams, enc: Encoding, step: jax.Array) -> SAEParams:
        """What a training step does to `params` after the optimizer update.

        JumpReLU: thresholds are kept non-negative. BatchTopK: this batch's smallest kept value
        is folded into the inference threshold (the first batch sets it).
        """
        return self.arch.after_update(self, params, enc, step)

    # ---------------------------------------------------------------------- serialisation

    def to_config(self) -> dict[str, Any]:
        """JSON-ready description: the shared fields and those its architecture `uses`;
        `from_config` inverts it."""
        names = ("architecture", "d_model", "d_sae", "tied_init") + self.arch.uses
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SAE:
        """An SAE from `to_config` output (also older configs, which listed every field)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"mesh", "shard_latents", "compute_dtype"}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown SAE config keys {sorted(unknown)}; expected a subset of {sorted(fields)}")
        return cls(**config)


def relu(d_model: int, d_sae: int, *, tied_init: bool | None = None, compute_dtype=None) -> SAE:
    """The paper's SAE: `z = relu((x - b_dec) @ w_enc + b_enc)`, trained with an L1 penalty."""
    return SAE("relu", d_model, d_sae, tied_init=tied_init, compute_dtype=compute_dtype)


def topk(d_model: int, d_sae: int, k: int, *, tied_init: bool | None = None, compute_dtype=None) -> SAE:
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations (then ReLU)."""
    return SAE("topk", d_model, d_sae, k=k, tied_init=tied_init, compute_dtype=compute_dtype)


def batchtopk(d_model: int, d_sae: int, k: int, *, tied_init: bool | None = None, threshold_decay: float = 0.99,
              compute_dtype=None) -> SAE:
    """BatchTopK SAE (Bussmann et al. 2024): top k*N activations over the batch in training;
    at inference a threshold estimated during training (`SAEParams.threshold`)."""
    return SAE("batchtopk", d_model, d_sae, k=k, tied_init=tied_init, threshold_decay=threshold_decay,
               compute_dtype=compute_dtype)


def gated(d_model: int, d_sae: int, *, tied_init: bool | None = None, aux_decoder_grad: bool = False,
          compute_dtype=None) -> SAE:
    """Gated SAE (Rajamanoharan et al. 2024; see `GatedArchitecture`); train with the "l1" (or
    "l1_decoder_norm", SAELens') penalty, which then reads the gate's activations."""
    return SAE("gated", d_model, d_sae, tied_init=tied_init, gated_aux_decoder_grad=aux_decoder_grad,
               compute_dtype=compute_dtype)


def jumprelu(d_model: int, d_sae: int, *, threshold_init: float = 1e-3, bandwidth: float = 1e-3,
             tied_init: bool | None = None, compute_dtype=None) -> SAE:
    """JumpReLU SAE (Rajamanoharan et al. 2024): `z = pre * (pre > threshold)` with a trained,
    directly stored threshold and straight-through gradients; pair with the L0 penalty."""
    return SAE("jumprelu", d_model, d_sae, tied_init=tied_init, threshold_init=threshold_init, bandwidth=bandwidth,
               compute_dtype=compute_dtype)


def create(architecture: str, d_model: int, d_sae: int, **kwargs) -> SAE:
    """An SAE of any registered architecture by name: a built-in one through its constructor
    above, one registered elsewhere as `SAE(architecture, d_model, d_sae, **kwargs)` (the
    defaults, `tied_init` among them, are the architecture's either way)."""
    constructor = {"relu": relu, "topk": topk, "batchtopk": batchtopk, "gated": gated, "jumprelu": jumprelu}.get(
        architecture)
    if constructor is None:
        return SAE(architecture, d_model, d_sae, **kwargs)
    return constructor(d_model, d_sae, **kwargs)


# ------------------------------------------------------------------------ b_dec initialisers

def data_mean(x_ND: jax.Array) -> jax.Array:
    """[N, D] -> [D] mean, the reference's `b_dec` initialisation."""
    return jnp.mean(x_ND, axis=0)


def geometric_median(x_ND: jax.Array, *, iters: int = 100, eps: float = 1e-8) -> jax.Array:
    """[N, D] -> [D] geometric median by Weiszfeld iterations (Anthropic's `b_dec` init)."""

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x_ND - m, axis=1), eps)
        return (w @ x_ND) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, body, jnp.mean(x_ND, axis=0))
