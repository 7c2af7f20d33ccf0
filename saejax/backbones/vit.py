"""ViT (`vit`): `ViTModel` and `ViTForImageClassification` checkpoints on saejax's own modules.

A Conv2d patch embedding, a CLS token and learned positions (resized to the grid as PyTorch's
`interpolate_pos_encoding=True` does: bicubic, no antialias), pre-norm blocks, the final
layernorm on every token, and the checkpoint's heads: the classifier on the CLS row, and the
optional pooler (`ViTModel`'s `pooler`: Dense + `pooler_act`), whose output is `pooled` (HF
`pooler_output`); without a pooler `pooled` is the final-layernorm CLS row.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from saejax.backbones._hf import config_class
from saejax.backbones._interp import bicubic_matrix, positions_on_grid
from saejax.backbones.convert import NameTable
from saejax.backbones.layers import Block, Family, NormReadout, OwnModel, batch_rows, block_names, cls_layout
from saejax.backbones.preprocess import BILINEAR, HALF, ImageProcessing


class ClsEmbed(nn.Module):
    """ViT's and DINOv2's embedding: Conv2d patches, a CLS token [1, 1, D], learned positions
    [1, 1 + side**2, D] on the model's grid (bicubic; `antialias` as DINOv2 with registers), then
    `n_registers` register tokens [1, R, D] inserted after CLS (positions are not added to them)."""

    hidden: int
    patch: int
    grid: tuple[int, int]
    n_positions: int
    n_registers: int = 0
    antialias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        patches = nn.Conv(self.hidden, (self.patch,) * 2, strides=(self.patch,) * 2, padding="VALID",
                          dtype=self.dtype, name="patch")(x)
        b, d = patches.shape[0], self.hidden
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
        positions = self.param("positions", nn.initializers.normal(0.02), (1, self.n_positions, d), jnp.float32)
        grid_positions = positions_on_grid(positions[0, 1:], self.grid,
                                           lambda n_in, n_out: bicubic_matrix(n_in, n_out, antialias=self.antialias))
        patches = patches.reshape(b, -1, d)
        h = jnp.concatenate([batch_rows(cls, patches), patches], axis=1)
        h = h + jnp.concatenate([positions[:, :1], grid_positions[None]], axis=1).astype(h.dtype)
        if self.n_registers:
            registers = self.param("registers", nn.initializers.normal(0.02), (1, self.n_registers, d), jnp.float32)
            h = jnp.concatenate([h[:, :1], batch_rows(registers, h), h[:, 1:]], axis=1)
        return h


NAMES = NameTable((
    ("embeddings.patch_embeddings.projection", "embed.patch"),
    ("embeddings.cls_token", "embed.cls"),
    ("embeddings.position_embeddings", "embed.positions"),
    *block_names("encoder.layer.{i}", ln1="layernorm_before", attn="attention.attention", q="query", k="key",
                 v="value", o="attention.output.dense", ln2="layernorm_after", up="intermediate.dense",
                 down="output.dense"),
    ("layernorm", "readout.norm"),
    ("pooler.dense", "readout.pooler"),
), prefix="vit.", top_level=(("classifier", "readout.classifier"),))


def _build(cfg, dtype, grid, heads, text_cfg):
    side = int(cfg.image_size) // int(cfg.patch_size)
    embed = ClsEmbed(int(cfg.hidden_size), int(cfg.patch_size), tuple(grid), 1 + side * side, dtype=dtype)
    qkv = bool(getattr(cfg, "qkv_bias", True))
    block = Block(int(cfg.num_attention_heads), int(cfg.intermediate_size), cfg.hidden_act, float(cfg.layer_norm_eps),
                  qkv_bias=(qkv, qkv, qkv), dtype=dtype)
    readout = NormReadout(float(cfg.layer_norm_eps), n_classes=heads.n_classes, pooler=heads.pooler,
                          pooler_act=getattr(cfg, "pooler_act", "tanh"), dtype=dtype)
    return OwnModel(embed, block, readout, n_layers=int(cfg.num_hidden_layers), image_size=grid[0] * int(cfg.patch_size))


def _processing(cfg):
    s = int(cfg.image_size)
    return ImageProcessing(resize_to=(s, s), resample=BILINEAR, mean=HALF, std=HALF)


VIT = Family(
    name="vit",
    model_types=("vit",),
    hub_ids=("google/vit-base-patch16-224", "google/vit-large-patch16-224", "google/vit-base-patch16-224-in21k"),
    config_class="ViTConfig",
    configs=lambda cfg_json: (config_class("ViTConfig").from_dict(dict(cfg_json)), None),
    build=_build,
    layout=lambda cfg, grid: cls_layout(cfg, grid),
    names=lambda cfg: NAMES,
    default_processing=_processing,
    processing_from_hf=lambda processor, cfg: ImageProcessing.from_hf(processor, square_size=True),
    interpolate="on_request",
    resize_square=True,
)
