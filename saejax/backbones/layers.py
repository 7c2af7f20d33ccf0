"""saejax's own Flax ViT layers, and the `Family` record every backbone family registers.

Every family (CLIP, DINOv2, ViT, SigLIP, SigLIP 2, DINOv3) is built from these pieces and
shares one pre-norm `Block` (attention, then MLP, each with an optional layer scale), so a new
family is its embedding, its readout and a table of PyTorch weight names (`Family`,
`saejax.backbones.convert`).

Params are a plain tree, the same for every family:

    {"embed": {...}, "blocks": {"0": Block params, "1": ...}, "readout": {...}, "text": {...}?}

with Block params `ln1/{scale,bias}`, `attn/{q,k,v,o}/{kernel,bias}`, `ln2`,
`mlp/{up,gate?,down}/{kernel,bias}` and, with layer scale, `ls1/scale`, `ls2/scale`. The
readout holds the final norm and the checkpoint's heads (`classifier`, `pooler`, CLIP's
`projection`); `text` is CLIP's text tower (`saejax.backbones.text`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saejax.backbones.base import TokenLayout

Array = jax.Array


@contextlib.contextmanager
def low_precision_matmuls(dtype):
    """Inside this context, every Flax `nn.Dense` applied runs its matmul with inputs cast to
    `dtype` (e.g. bf16) and float32 accumulation and output (`preferred_element_type`).

    This is saejax's one mixed-precision policy for every backbone family: the modules
    themselves are built in float32, so LayerNorm, softmax,
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
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation for a config's `hidden_act`; an unknown name is an error that lists the known ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}") from None


def batch_rows(tokens: Array, like: Array) -> Array:
    """`tokens` ([k, D] or [1, k, D]: a CLS token, registers) for every example of `like`
    [B, T, D]: [B, k, D], split over devices as `like`'s batch is (under explicit sharding axes
    the operands of a concatenate must agree, and a plain broadcast would be replicated)."""
    return jnp.zeros_like(like[:, :1]) + tokens.reshape(1, -1, like.shape[-1]).astype(like.dtype)


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
    patches; CLS and register tokens in front are left alone, as in DINOv3). `mask` (boolean,
    broadcastable to [B, heads, T, S]) keeps the keys where it is True (CLIP's text tower).
    """

    n_heads: int
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    o_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv: Array | None = None, rope=None, mask: Array | None = None) -> Array:
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
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
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
    def __call__(self, x: Array, rope=None, mask: Array | None = None) -> Array:
        q, k, v = self.qkv_bias
        a = Attention(self.n_heads, q, k, v, self.o_bias, dtype=self.dtype, name="attn")(
            nn.LayerNorm(self.eps, dtype=self.dtype, name="ln1")(x), rope=rope, mask=mask)
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
            batch_rows(probe, x), kv=x)
        h = h + Mlp(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(
            nn.LayerNorm(self.eps, dtype=self.dtype, name="ln")(h))
        return h[:, 0]


class NormReadout(nn.Module):
    """The final layernorm on every token and the checkpoint's heads: `pooled` is the CLS row,
    or the pooler's output when the checkpoint has one (ViT's `pooler`: a Dense and
    `pooler_act` on the CLS row, HF `pooler_output`); the classifier reads the CLS row (ViT) or
    the CLS row and the mean of the patches (DINOv2's `*ForImageClassification`).

    Attributes:
        eps: the layernorm's epsilon.
        n_classes: classifier outputs (0: no classifier).
        classify_patch_mean: the classifier reads `[CLS, mean(patches)]` (DINOv2) instead of CLS.
        patches: `(start, stop)` of the patch tokens.
        pooler: the pooler's output size (0: no pooler).
        pooler_act: the pooler's activation (an HF `hidden_act` name).
    """

    eps: float
    n_classes: int = 0
    classify_patch_mean: bool = False
    patches: tuple[int, int] = (1, 1)
    pooler: int = 0
    pooler_act: str = "tanh"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        tokens = nn.LayerNorm(self.eps, dtype=self.dtype, name="norm")(h)
        cls = tokens[:, 0]
        pooled = cls
        if self.pooler:
            pooled = activation(self.pooler_act)(nn.Dense(self.pooler, dtype=self.dtype, name="pooler")(cls))
        logits = None
        if self.n_classes:
            features = cls
            if self.classify_patch_mean:
                start, stop = self.patches
                features = jnp.concatenate([cls, tokens[:, start:stop].mean(axis=1)], axis=-1)
            logits = nn.Dense(self.n_classes, dtype=self.dtype, name="classifier")(features)
        return tokens, pooled, logits


# ---------------------------------------------------------------------- the forward pieces
class OwnModel:
    """`embed` / `block` / `readout` over a family's params (the contract `Backbone` drives).

    Args:
        embed: Flax module, pixels [B, S, S, 3] -> residual [B, T, D].
        block: the shared `Block`, applied to `params["blocks"][str(i)]`.
        readout: Flax module, residual [B, T, D] -> `(tokens, pooled, logits)`.
        n_layers: number of blocks.
        image_size: the input side S (for the parameter shapes).
        rope: static `(cos, sin)` for the patch tokens, or None.
        text: a text tower (`saejax.backbones.text.TextTower`) whose params sit under
            `params["text"]`, or None.
    """

    def __init__(self, embed: nn.Module, block: Block, readout: nn.Module, *, n_layers: int, image_size: int,
                 rope=None, text=None):
        self.embed_module, self.block_module, self.readout_module = embed, block, readout
        self.n_layers, self.image_size, self.rope, self.text = n_layers, image_size, rope, text

    def embed(self, p, x):
        return self.embed_module.apply({"params": p["embed"]}, x)

    def block(self, p, h, i):
        return self.block_module.apply({"params": p["blocks"][str(i)]}, h, self.rope)

    def readout(self, p, h, layout):
        return self.readout_module.apply({"params": p["readout"]}, h)

    def param_shapes(self) -> dict[tuple, tuple]:
        """Flat `{key: shape}` of every parameter, from `jax.eval_shape` (nothing is computed)."""
        key = jax.random.key(0)
        pixels = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
        embed = jax.eval_shape(self.embed_module.init, key, pixels)
        resid = jax.eval_shape(lambda p, x: self.embed_module.apply(p, x), embed, pixels)
        block = jax.eval_shape(self.block_module.init, key, resid, self.rope)
        readout = jax.eval_shape(self.readout_module.init, key, resid)
        shapes = prefixed_shapes(("embed",), embed)
        for i in range(self.n_layers):
            shapes.update(prefixed_shapes(("blocks", str(i)), block))
        shapes.update(prefixed_shapes(("readout",), readout))
        if self.text is not None:
            shapes.update({("text",) + k: v for k, v in self.text.param_shapes().items()})
        return shapes


def prefixed_shapes(prefix: tuple, variables) -> dict[tuple, tuple]:
    """`{prefix + key: shape}` of the `params` collection of `variables` (from `eval_shape`)."""
    from flax.traverse_util import flatten_dict  # noqa: PLC0415

    return {prefix + k: tuple(v.shape) for k, v in flatten_dict(variables["params"]).items()}


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything `saejax.backbones.load` needs to know about a backbone family.

    Attributes:
        name: The family name (`Backbone.family`).
        model_types: the config.json `model_type` values this family loads.
        hub_ids: Hub ids `load` may fetch by name.
        config_class: the `transformers` config class of the vision model (`create_random`).
        configs: `config.json dict -> (vision config, text config or None)`, `transformers` config
            objects (`_hf.config_class`).
        build: `(cfg, dtype, grid, heads, text_cfg) -> OwnModel`; `heads` is a `base.Heads`.
        layout: `(cfg, grid) -> TokenLayout`.
        names: `cfg -> convert.NameTable`, the PyTorch names of the weights of the model the
            config describes.
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
    config_class: str
    configs: Callable[[Mapping], tuple[Any, Any]]
    build: Callable[..., OwnModel]
    layout: Callable[..., Any]
    names: Callable[[Any], Any]
    default_processing: Callable[[Any], Any]
    processing_from_hf: Callable[[Mapping, Any], Any]
    interpolate: str
    resize_square: bool


def cls_layout(cfg, grid, n_registers: int = 0):
    """The token layout of a model with a CLS token, then `n_registers` registers, then the patches."""
    n = grid[0] * grid[1]
    return TokenLayout(cls=0, registers=(1, 1 + n_registers), patches=(1 + n_registers, 1 + n_registers + n),
                       n_tokens=1 + n_registers + n)


def block_names(torch_block: str, *, ln1: str, attn: str, q: str, k: str, v: str, o: str, ln2: str, up: str,
                down: str, own_block: str = "blocks.{i}") -> tuple[tuple[str, str], ...]:
    """The `(torch, own)` name pairs of one pre-norm block, for `convert.NameTable`."""
    t, b = torch_block, own_block
    return ((f"{t}.{ln1}", f"{b}.ln1"), (f"{t}.{attn}.{q}", f"{b}.attn.q"), (f"{t}.{attn}.{k}", f"{b}.attn.k"),
            (f"{t}.{attn}.{v}", f"{b}.attn.v"), (f"{t}.{o}", f"{b}.attn.o"), (f"{t}.{ln2}", f"{b}.ln2"),
            (f"{t}.{up}", f"{b}.mlp.up"), (f"{t}.{down}", f"{b}.mlp.down"))
