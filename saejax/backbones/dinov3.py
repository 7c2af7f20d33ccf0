"""DINOv3 ViTs (`DINOv3ViTModel`) on saejax's own Flax modules.

`facebook/dinov3-vits16-pretrain-lvd1689m` through ViT-L and ViT-H+ (and the 7B). A Conv2d
patch embedding, a CLS token and (usually 4) register tokens, no learned positions: axial
rotary embeddings on the patch tokens (`layers.rope_2d`, normalised patch coordinates, so any
multiple of the patch size works with no interpolation), layer scale on both branches, and a
GELU MLP or, in the larger sizes, SwiGLU (`use_gated_mlp`).

Token layout: CLS at 0, registers 1 .. R, then the patches. `tokens` are the final layernorm
of every token (HF `last_hidden_state`); `pooled` is its CLS row (HF `pooler_output`).
The training-time position augmentations (`pos_embed_shift/jitter/rescale`) are off, as in
PyTorch `eval()`.

Preprocessing: the hub's processor is `DINOv3ViTImageProcessorFast` (torchvision, resize to
224 x 224, bilinear). `preprocess` resizes with PIL instead; measured against the fast
processor (transformers 4.57.6, torchvision 0.29.1) on noise and smooth images of 231 x 301,
300 x 187 and 500 x 375 px, pixels differ by at most 1 grey level (mean 0.3); images already
224 x 224 are identical.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from saejax.backbones._hf import config_class
from saejax.backbones.convert import NameTable
from saejax.backbones.layers import Block, Family, NormReadout, OwnModel, batch_rows, block_names, cls_layout, rope_2d
from saejax.backbones.preprocess import BILINEAR, IMAGENET_MEAN, IMAGENET_STD, ImageProcessing

NAMES = NameTable((
    ("embeddings.patch_embeddings", "embed.patch"),
    ("embeddings.cls_token", "embed.cls"),
    ("embeddings.register_tokens", "embed.registers"),
    *block_names("layer.{i}", ln1="norm1", attn="attention", q="q_proj", k="k_proj", v="v_proj", o="attention.o_proj",
                 ln2="norm2", up="mlp.up_proj", down="mlp.down_proj"),
    ("layer.{i}.mlp.gate_proj", "blocks.{i}.mlp.gate"),
    ("layer.{i}.layer_scale1.lambda1", "blocks.{i}.ls1.scale"),
    ("layer.{i}.layer_scale2.lambda1", "blocks.{i}.ls2.scale"),
    ("norm", "readout.norm"),
))


class Dinov3Embed(nn.Module):
    hidden: int
    patch: int
    n_registers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        patches = nn.Conv(self.hidden, (self.patch,) * 2, strides=(self.patch,) * 2, padding="VALID",
                          dtype=self.dtype, name="patch")(x)
        patches = patches.reshape(patches.shape[0], -1, self.hidden)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.hidden), jnp.float32)
        parts = [batch_rows(cls, patches)]
        if self.n_registers:
            reg = self.param("registers", nn.initializers.normal(0.02), (1, self.n_registers, self.hidden), jnp.float32)
            parts.append(batch_rows(reg, patches))
        return jnp.concatenate(parts + [patches], axis=1)


def _build(cfg, dtype, grid, heads, text_cfg):
    n_heads = int(cfg.num_attention_heads)
    block = Block(n_heads, int(cfg.intermediate_size), cfg.hidden_act, float(cfg.layer_norm_eps),
                  gated=bool(cfg.use_gated_mlp), layer_scale=True,
                  qkv_bias=(bool(cfg.query_bias), bool(cfg.key_bias), bool(cfg.value_bias)),
                  o_bias=bool(cfg.proj_bias), mlp_bias=bool(cfg.mlp_bias), dtype=dtype)
    embed = Dinov3Embed(int(cfg.hidden_size), int(cfg.patch_size), int(cfg.num_register_tokens), dtype=dtype)
    rope = rope_2d(tuple(grid), int(cfg.hidden_size) // n_heads, float(cfg.rope_theta))
    return OwnModel(embed, block, NormReadout(float(cfg.layer_norm_eps), dtype=dtype),
                    n_layers=int(cfg.num_hidden_layers), image_size=grid[0] * int(cfg.patch_size), rope=rope)


def _processing(cfg):
    # The hub's DINOv3ViTImageProcessorFast: resize to image_size x image_size, bilinear, ImageNet stats.
    s = int(cfg.image_size)
    return ImageProcessing(resize_to=(s, s), resample=BILINEAR, mean=IMAGENET_MEAN, std=IMAGENET_STD)


DINOV3 = Family(
    name="dinov3",
    model_types=("dinov3_vit",),
    hub_ids=tuple(f"facebook/dinov3-{size}-pretrain-lvd1689m" for size in
                  ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")),
    config_class="DINOv3ViTConfig",
    configs=lambda cfg_json: (config_class("DINOv3ViTConfig").from_dict(dict(cfg_json)), None),
    build=_build,
    layout=lambda cfg, grid: cls_layout(cfg, grid, int(cfg.num_register_tokens)),
    names=lambda cfg: NAMES,
    default_processing=_processing,
    processing_from_hf=lambda processor, cfg: ImageProcessing.from_hf(processor, square_size=True),
    interpolate="always",
    resize_square=True,
)
