"""SigLIP and SigLIP 2 vision towers on saejax's own Flax modules.

"siglip": `SiglipModel` / `SiglipVisionModel` checkpoints (`google/siglip-base-patch16-224`,
and the fixed-resolution SigLIP 2 checkpoints such as `google/siglip2-base-patch16-224`, which
`transformers` also loads as `SiglipModel`). A Conv2d patch embedding plus learned positions,
pre-norm blocks, `post_layernorm` on every token, and the attention-pooling head.

"siglip2": the NaFlex checkpoints (`google/siglip2-base-patch16-naflex`, `Siglip2Model`). The
same blocks and head, but patches are flattened (row, column, channel) and embedded by a
Linear layer, and the 16 x 16 learned position grid is always resized to the image's grid
(bilinear, antialiased). saejax runs NaFlex at one fixed square size (default: the largest
square its `max_num_patches` allows, 256 px for patch 16 and 256 patches); its processor's
aspect-preserving resize and padding are not used, so every token is a real patch.

Token layout: patches only. There is no CLS token (`tokens="cls"` is an error); `pooled` is
the attention-pooling head's output (HF `pooler_output`), and `tokens` are
`post_layernorm(residual)` (HF `last_hidden_state`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from saejax.backbones._hf import config_class
from saejax.backbones._interp import bicubic_matrix, bilinear_antialiased_matrix, positions_on_grid
from saejax.backbones.base import TokenLayout
from saejax.backbones.convert import NameTable
from saejax.backbones.layers import AttentionPool, Block, Family, OwnModel, block_names
from saejax.backbones.preprocess import BICUBIC, BILINEAR, HALF, ImageProcessing

NAMES = NameTable((
    ("embeddings.patch_embedding", "embed.patch"),  # a Conv2d, or NaFlex's Linear
    ("embeddings.position_embedding.weight", "embed.positions"),
    *block_names("encoder.layers.{i}", ln1="layer_norm1", attn="self_attn", q="q_proj", k="k_proj", v="v_proj",
                 o="self_attn.out_proj", ln2="layer_norm2", up="mlp.fc1", down="mlp.fc2"),
    ("post_layernorm", "readout.norm"),
    ("head.probe", "readout.head.probe"),
    ("head.attention.in_proj", ("readout.head.attn.q", "readout.head.attn.k", "readout.head.attn.v")),
    ("head.attention.out_proj", "readout.head.attn.o"),
    ("head.layernorm", "readout.head.ln"),
    ("head.mlp.fc1", "readout.head.mlp.up"),
    ("head.mlp.fc2", "readout.head.mlp.down"),
), prefix="vision_model.")


class FlatPatchEmbed(nn.Module):
    """NaFlex's patch embedding: a Linear layer (`kernel` [p * p * C, D], `bias`) on each patch
    flattened (row, column, channel). Computed as the stride-p convolution it equals (kernel
    reshaped to HWIO), which needs no reshape of the split batch (explicit sharding axes)."""

    hidden: int
    patch: int

    @nn.compact
    def __call__(self, x):
        p, c = self.patch, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p * p * c, self.hidden), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.hidden,), jnp.float32)
        y = jax.lax.conv_general_dilated(x, kernel.reshape(p, p, c, self.hidden).astype(x.dtype), (p, p), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(y.dtype)


class SiglipEmbed(nn.Module):
    """Patch embeddings plus learned positions on the model's grid. `naflex`: patches flattened
    (row, column, channel) into a Linear layer and the grid resized always (bilinear,
    antialiased), as SigLIP 2 NaFlex; else a Conv2d and HF's `interpolate_pos_encoding`
    (bicubic, no antialias)."""

    hidden: int
    patch: int
    n_positions: int
    grid: tuple[int, int]
    naflex: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, p = x.shape[0], self.patch
        if self.naflex:
            patches = FlatPatchEmbed(self.hidden, p, name="patch")(x)
            matrix = bilinear_antialiased_matrix
        else:
            patches = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch")(x)
            matrix = functools.partial(bicubic_matrix, antialias=False)
        patches = patches.reshape(b, -1, self.hidden)
        positions = self.param("positions", nn.initializers.normal(0.02), (self.n_positions, self.hidden), jnp.float32)
        return patches + positions_on_grid(positions, self.grid, matrix).astype(patches.dtype)[None]


class SiglipReadout(nn.Module):
    n_heads: int
    mlp_dim: int
    act: str
    eps: float
    use_head: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        tokens = nn.LayerNorm(self.eps, dtype=self.dtype, name="norm")(h)
        pooled = None
        if self.use_head:
            pooled = AttentionPool(self.n_heads, self.mlp_dim, self.act, self.eps, dtype=self.dtype,
                                   name="head")(tokens)
        return tokens, pooled, None


def _build(cfg, dtype, grid, heads, text_cfg, *, naflex):
    n_positions = int(cfg.num_patches) if naflex else (int(cfg.image_size) // int(cfg.patch_size)) ** 2
    if math.isqrt(n_positions) ** 2 != n_positions:
        raise ValueError(f"{n_positions} position embeddings do not form a square grid")
    embed = SiglipEmbed(int(cfg.hidden_size), int(cfg.patch_size), n_positions, tuple(grid), naflex, dtype=dtype)
    block = Block(int(cfg.num_attention_heads), int(cfg.intermediate_size), cfg.hidden_act, float(cfg.layer_norm_eps),
                  dtype=dtype)
    readout = SiglipReadout(int(cfg.num_attention_heads), int(cfg.intermediate_size), cfg.hidden_act,
                            float(cfg.layer_norm_eps), bool(getattr(cfg, "vision_use_head", True)), dtype=dtype)
    return OwnModel(embed, block, readout, n_layers=int(cfg.num_hidden_layers), image_size=grid[0] * int(cfg.patch_size))


def _layout(cfg, grid):
    n = grid[0] * grid[1]
    return TokenLayout(cls=None, registers=(0, 0), patches=(0, n), n_tokens=n)


def _configs(cfg_json, *, full, vision):
    if cfg_json.get("model_type", "").endswith("_vision_model"):
        return config_class(vision).from_dict(dict(cfg_json)), None
    return config_class(full).from_dict(dict(cfg_json)).vision_config, None


def _siglip_processing(cfg):
    s = int(cfg.image_size)
    return ImageProcessing(resize_to=(s, s), resample=BICUBIC, mean=HALF, std=HALF)


def naflex_image_size(cfg, max_num_patches: int | None = None) -> int:
    """The side of the largest square grid NaFlex allows: `isqrt(max_num_patches) * patch`."""
    n = int(max_num_patches or cfg.num_patches)
    return math.isqrt(n) * int(cfg.patch_size)


def _naflex_processing(cfg):
    s = naflex_image_size(cfg)
    return ImageProcessing(resize_to=(s, s), resample=BILINEAR, mean=HALF, std=HALF)


def _naflex_from_hf(processor, cfg):
    """The NaFlex processor's rescaling and normalisation, resizing to the largest square its
    `max_num_patches` allows."""
    base = ImageProcessing.from_hf({**processor, "do_resize": False}, square_size=True)
    s = naflex_image_size(cfg, processor.get("max_num_patches"))
    return dataclasses.replace(base, resize_to=(s, s), resample=int(processor.get("resample", BILINEAR)))


SIGLIP = Family(
    name="siglip",
    model_types=("siglip", "siglip_vision_model"),
    hub_ids=("google/siglip-base-patch16-224", "google/siglip-base-patch16-384", "google/siglip-large-patch16-384",
             "google/siglip-so400m-patch14-384", "google/siglip2-base-patch16-224", "google/siglip2-large-patch16-256",
             "google/siglip2-so400m-patch14-384"),
    config_class="SiglipVisionConfig",
    configs=functools.partial(_configs, full="SiglipConfig", vision="SiglipVisionConfig"),
    build=functools.partial(_build, naflex=False),
    layout=_layout,
    names=lambda cfg: NAMES,
    default_processing=_siglip_processing,
    processing_from_hf=lambda processor, cfg: ImageProcessing.from_hf(processor, square_size=True),
    interpolate="on_request",
    resize_square=True,
)

SIGLIP2_NAFLEX = Family(
    name="siglip2",
    model_types=("siglip2", "siglip2_vision_model"),
    hub_ids=("google/siglip2-base-patch16-naflex", "google/siglip2-so400m-patch16-naflex"),
    config_class="Siglip2VisionConfig",
    configs=functools.partial(_configs, full="Siglip2Config", vision="Siglip2VisionConfig"),
    build=functools.partial(_build, naflex=True),
    layout=_layout,
    names=lambda cfg: NAMES,
    default_processing=_naflex_processing,
    processing_from_hf=_naflex_from_hf,
    interpolate="always",
    resize_square=True,
)
