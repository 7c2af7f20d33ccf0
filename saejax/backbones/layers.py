"""saejax's own Flax ViT layers, for the families `transformers` has no Flax class for.

SigLIP, SigLIP 2 and DINOv3 are built from these pieces. Every family shares one pre-norm
`Block` (attention, then MLP, each with an optional layer scale), so a new family is its
embedding, its readout and a table of PyTorch weight names (see `OwnFamily`).

Own-family params are a plain tree, the same for every family:

    {"embed": {...}, "blocks": {"0": Block params, "1": ...}, "readout": {...}}

with Block params `ln1/{scale,bias}`, `attn/{q,k,v,o}/{kernel,bias}`, `ln2`,
`mlp/{up,gate?,down}/{kernel,bias}` and, with layer scale, `ls1/scale`, `ls2/scale`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@contextlib.contextmanager
def low_precision_matmuls(dtype):
    """Inside this context, every Flax `nn.Dense` applied runs its matmul with inputs cast to
    `dtype` (e.g. bf16) and float32 accumulation and output (`preferred_element_type`).

    This is saejax's one mixed-precision policy for every backbone family, the `transformers`
    Flax modules included: the modules themselves are built in float32, so LayerNorm, softmax,
    GELU, the attention scores and the residual stream stay float32, as under PyTorch's
    `torch.autocast(dtype=torch.bfloat16)` (its LayerNorm and softmax run in float32, and its
    residual adds promote to float32). The patch-embedding convolution (under 1% of a ViT's
    FLOPs) stays float32.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        (x,) = args
        params = module.variables["params"]
        y = jax.lax.dot_general(x.astype(dtype), params["kernel"].astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y + params["bias"] if module.use_bias else y

    with nn.intercept_methods(interceptor):
        yield


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names -> functions with the same numerics as PyTorch `ACT2FN`.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation for a config's `hidden_act`; an unknown name is an error that lists the known ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}") from None


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_2d(grid: tuple[int, int], head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """DINOv3's axial rotary embedding for a patch grid: `(cos, sin)`, each [rows * cols, head_dim].

    Patch centres are normalised to [-1, 1] along each axis, so any grid (any image size) uses
    the same frequencies; a quarter of the head dimension rotates with y, a quarter with x, and
    the pattern is tiled twice (`rotate_half` pairs dimension j with j + head_dim / 2).
    """
    rows, cols = grid
    inv_freq = 1.0 / theta ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)
    ys = (np.arange(0.5, rows, dtype=np.float32) / rows) * 2.0 - 1.0
    xs = (np.arange(0.5, cols, dtype=np.float32) / cols) * 2.0 - 1.0
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)  # [P, 2] (y, x)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).reshape(len(coords), -1)
    angles = np.tile(angles, 2).astype(np.float32)
    return np.cos(angles), np.sin(angles)


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v, o projections.

    `rope=(cos, sin)` [P, head_dim] rotates the queries and keys of the LAST P tokens (the
    patches; CLS and register tokens in front are left alone, as in DINOv3).
    """

    n_heads: int
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    o_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv: Array | None = None, rope=None) -> Array:
        kv = x if kv is None else kv
        d = x.shape[-1]
        if d % self.n_heads:
            raise ValueError(f"hidden size {d} is not divisible by num_attention_heads={self.n_heads}")
        head_dim = d // self.n_heads

        def project(name, inputs, bias):
            y = nn.Dense(d, use_bias=bias, dtype=self.dtype, name=name)(inputs)
            return y.reshape(*y.shape[:-1], self.n_heads, head_dim)  # [B, T, N, H]

        q, k, v = project("q", x, self.q_bias), project("k", kv, self.k_bias), project("v", kv, self.v_bias)
        if rope is not None:
            cos, sin = (jnp.asarray(a, q.dtype)[:, None, :] for a in rope)  # [P, 1, H]
            n = cos.shape[0]

            def rotate(t):
                prefix, patches = t[:, :-n], t[:, -n:]
                return jnp.concatenate([prefix, patches * cos + rotate_half(patches) * sin], axis=1)

            q, k = rotate(q), rotate(k)
        out = jax.nn.dot_product_attention(q, k, v)
        return nn.Dense(d, use_bias=self.o_bias, dtype=self.dtype, name="o")(out.reshape(*out.shape[:-2], d))


class Mlp(nn.Module):
    """`down(act(up(x)))`, or with `gated` the SwiGLU form `down(act(gate(x)) * up(x))`."""

    hidden: int
    act: str
    gated: bool = False
    bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = activation(self.act)
        up = nn.Dense(self.hidden, use_bias=self.bias, dtype=self.dtype, name="up")(x)
        h = act(nn.Dense(self.hidden, use_bias=self.bias, dtype=self.dtype, name="gate")(x)) * up if self.gated else act(up)
        return nn.Dense(x.shape[-1], use_bias=self.bias, dtype=self.dtype, name="down")(h)


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x * self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32).astype(x.dtype)


class Block(nn.Module):
    """The pre-norm transformer block every own family shares:
    `h = x + ls1(attn(ln1(x)))`, `out = h + ls2(mlp(ln2(h)))` (layer scales optional)."""

    n_heads: int
    mlp_dim: int
    act: str
    eps: float
    gated: bool = False
    layer_scale: bool = False
    qkv_bias: tuple[bool, bool, bool] = (True, True, True)
    o_bias: bool = True
    mlp_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, rope=None) -> Array:
        q, k, v = self.qkv_bias
        a = Attention(self.n_heads, q, k, v, self.o_bias, dtype=self.dtype, name="attn")(
            nn.LayerNorm(self.eps, dtype=self.dtype, name="ln1")(x), rope=rope)
        h = x + (LayerScale(name="ls1")(a) if self.layer_scale else a)
        m = Mlp(self.mlp_dim, self.act, self.gated, self.mlp_bias, dtype=self.dtype, name="mlp")(
            nn.LayerNorm(self.eps, dtype=self.dtype, name="ln2")(h))
        return h + (LayerScale(name="ls2")(m) if self.layer_scale else m)


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling ("MAP") head: a learned probe attends over the
    tokens, then a residual MLP; returns [B, D]."""

    n_heads: int
    mlp_dim: int
    act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, x.shape[-1]), jnp.float32)
        h = Attention(self.n_heads, dtype=self.dtype, name="attn")(
            jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1])), kv=x)
        h = h + Mlp(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(
            nn.LayerNorm(self.eps, dtype=self.dtype, name="ln")(h))
        return h[:, 0]


# ---------------------------------------------------------------------- the forward pieces
class OwnModel:
    """`embed` / `block` / `readout` over own-family params (the contract `Backbone` drives).

    Args:
        embed: Flax module, pixels [B, S, S, 3] -> residual [B, T, D].
        block: the shared `Block`, applied to `params["blocks"][str(i)]`.
        readout: Flax module, residual [B, T, D] -> `(tokens, pooled, logits)`.
        n_layers: number of blocks.
        image_size: the input side S (for the parameter shapes).
        rope: static `(cos, sin)` for the patch tokens, or None.
    """

    def __init__(self, embed: nn.Module, block: Block, readout: nn.Module, *, n_layers: int, image_size: int,
                 rope=None):
        self.embed_module, self.block_module, self.readout_module = embed, block, readout
        self.n_layers, self.image_size, self.rope = n_layers, image_size, rope

    def embed(self, p, x):
        return self.embed_module.apply({"params": p["embed"]}, x)

    def block(self, p, h, i):
        return self.block_module.apply({"params": p["blocks"][str(i)]}, h, self.rope)

    def readout(self, p, h, layout):
        return self.readout_module.apply({"params": p["readout"]}, h)

    def param_shapes(self) -> dict[tuple, tuple]:
        """Flat `{key: shape}` of every parameter, from `jax.eval_shape` (nothing is computed)."""
        from flax.traverse_util import flatten_dict  # noqa: PLC0415

        key = jax.random.key(0)
        pixels = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
        embed = jax.eval_shape(self.embed_module.init, key, pixels)
        resid = jax.eval_shape(lambda p, x: self.embed_module.apply(p, x), embed, pixels)
        block = jax.eval_shape(self.block_module.init, key, resid, self.rope)
        readout = jax.eval_shape(self.readout_module.init, key, resid)
        shapes = {("embed",) + k: v.shape for k, v in flatten_dict(embed["params"]).items()}
        for i in range(self.n_layers):
            shapes.update({("blocks", str(i)) + k: v.shape for k, v in flatten_dict(block["params"]).items()})
        shapes.update({("readout",) + k: v.shape for k, v in flatten_dict(readout["params"]).items()})
        return {k: tuple(v) for k, v in shapes.items()}


# ---------------------------------------------------------------------- PyTorch weights
def convert_torch(state: Mapping[str, np.ndarray], renames: Sequence[tuple[str, str]],
                  target: Mapping[tuple, tuple]) -> tuple[dict[tuple, np.ndarray], list[str]]:
    """A PyTorch state dict -> flat own-family params.

    Each name is rewritten by `renames` (regex substitutions, in order; "." separates the
    parts of the key), packed `in_proj_weight` / `in_proj_bias` (`nn.MultiheadAttention`) are
    split into q, k, v, and a trailing `weight` becomes the key the target holds: `kernel`
    (Linear weights transposed, Conv2d OIHW -> HWIO), `scale` (LayerNorm), or the name itself.

    Returns:
        `(params, unused)`: the converted params and the names no target key took.
    """
    out, unused = {}, []
    for name, value in state.items():
        renamed = name
        for pattern, replacement in renames:
            renamed = re.sub(pattern, replacement, renamed)
        parts = tuple(renamed.split("."))
        if parts[-1] in ("in_proj_weight", "in_proj_bias"):
            leaf = "weight" if parts[-1] == "in_proj_weight" else "bias"
            pieces = [(parts[:-1] + (p, leaf), v) for p, v in zip("qkv", np.split(value, 3, axis=0), strict=True)]
        else:
            pieces = [(parts, value)]
        for key, v in pieces:
            placed = _place(key, v, target)
            if placed is None:
                unused.append(name)
            else:
                out[placed[0]] = placed[1]
    return out, unused


def _place(key, value, target):
    if key in target:
        return key, value
    if key[-1] == "weight":
        kernel = key[:-1] + ("kernel",)
        if kernel in target and value.ndim == 2:
            return kernel, np.ascontiguousarray(value.T)
        if kernel in target and value.ndim == 4:
            return kernel, np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        if key[:-1] + ("scale",) in target:
            return key[:-1] + ("scale",), value
    return None


@dataclasses.dataclass(frozen=True)
class OwnFamily:
    """Everything `saejax.backbones.load` needs to know about an own-module family.

    Attributes:
        name: The family name (`Backbone.family`).
        model_types: the config.json `model_type` values this family loads.
        hub_ids: Hub ids `load` may fetch by name.
        vision_config: `(config.json dict, transformers) -> vision config object`.
        build: `(cfg, dtype, grid) -> OwnModel`.
        layout: `(cfg, grid) -> TokenLayout`.
        renames: Regex substitutions from PyTorch weight names to own keys (`convert_torch`).
        default_processing: `cfg -> ImageProcessing` for a directory without preprocessor_config.json.
        processing_from_hf: `(preprocessor_config dict, cfg) -> ImageProcessing`.
        interpolate: "always" (runs at any multiple of the patch size, like DINOv2) or
            "on_request" (only with `load(..., image_size=)`, as `interpolate_pos_encoding=True`).
        resize_square: `load(..., image_size=S)` resizes images straight to S x S (True) or
            resizes the short side and centre-crops (False), as the family's processor does.
    """

    name: str
    model_types: tuple[str, ...]
    hub_ids: tuple[str, ...]
    vision_config: Callable[[Mapping, Any], Any]
    build: Callable[..., OwnModel]
    layout: Callable[..., Any]
    renames: tuple[tuple[str, str], ...]
    default_processing: Callable[[Any], Any]
    processing_from_hf: Callable[[Mapping, Any], Any]
    interpolate: str
    resize_square: bool
