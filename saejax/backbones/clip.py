"""CLIP (`clip`): `CLIPVisionModel` and `CLIPModel` checkpoints (and open_clip's, see
`open_clip`) on saejax's own modules.

A Conv2d patch embedding without bias, a CLS vector, a learned position table resized to the
grid as PyTorch's `interpolate_pos_encoding=True` does (bicubic, no antialias), `pre_layrnorm`
(part of the embedding here: hook i is `hidden_states[i + 1]`, after it), pre-norm blocks, and
`post_layernorm` on the CLS row only: `tokens` are the residual after the last block (HF
`last_hidden_state`) and `pooled` is `post_layernorm(CLS)` (HF `pooler_output`). A checkpoint
with `visual_projection` keeps it at `params["readout"]["projection"]` (`text.clip_projection`;
not applied by the forward); a full `CLIPModel` also brings its text tower (`params["text"]`,
`saejax.backbones.text`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from saejax.backbones._hf import config_class
from saejax.backbones._interp import bicubic_matrix, positions_on_grid
from saejax.backbones.convert import NameTable
from saejax.backbones.layers import Block, Family, OwnModel, batch_rows, block_names, cls_layout
from saejax.backbones.preprocess import BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing
from saejax.backbones.text import TextTower


class ClipEmbed(nn.Module):
    hidden: int
    patch: int
    grid: tuple[int, int]
    n_positions: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        patches = nn.Conv(self.hidden, (self.patch,) * 2, strides=(self.patch,) * 2, padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch")(x)
        b, d = patches.shape[0], self.hidden
        cls = self.param("cls", nn.initializers.normal(0.02), (d,), jnp.float32)
        positions = self.param("positions", nn.initializers.normal(0.02), (self.n_positions, d), jnp.float32)
        grid_positions = positions_on_grid(positions[1:], self.grid,
                                           lambda n_in, n_out: bicubic_matrix(n_in, n_out, antialias=False))
        patches = patches.reshape(b, -1, d)
        h = jnp.concatenate([batch_rows(cls, patches), patches], axis=1)
        h = h + jnp.concatenate([positions[:1], grid_positions], axis=0).astype(h.dtype)[None]
        return nn.LayerNorm(self.eps, dtype=self.dtype, name="norm")(h)


class ClipReadout(nn.Module):
    eps: float
    projection: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        pooled = nn.LayerNorm(self.eps, dtype=self.dtype, name="norm")(h[:, 0])
        if self.projection and self.is_initializing():  # held for `text.clip_projection`, not applied here
            nn.Dense(self.projection, use_bias=False, dtype=self.dtype, name="projection")(pooled)
        return h, pooled, None


_BLOCK = dict(ln1="layer_norm1", attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o="self_attn.out_proj",
              ln2="layer_norm2", up="mlp.fc1", down="mlp.fc2")
NAMES = NameTable((
    ("embeddings.patch_embedding", "embed.patch"),
    ("embeddings.class_embedding", "embed.cls"),
    ("embeddings.position_embedding.weight", "embed.positions"),
    ("pre_layrnorm", "embed.norm"),
    *block_names("encoder.layers.{i}", **_BLOCK),
    ("post_layernorm", "readout.norm"),
), prefix="vision_model.", top_level=(
    ("visual_projection", "readout.projection"),
    ("text_model.embeddings.token_embedding.weight", "text.embed.tokens"),
    ("text_model.embeddings.position_embedding.weight", "text.embed.positions"),
    *block_names("text_model.encoder.layers.{i}", own_block="text.blocks.{i}", **_BLOCK),
    ("text_model.final_layer_norm", "text.norm"),
    ("text_projection", "text.projection"),
    ("logit_scale", "text.logit_scale"),
))


def _configs(cfg_json):
    if cfg_json.get("model_type") == "clip_vision_model":
        return config_class("CLIPVisionConfig").from_dict(dict(cfg_json)), None
    full = config_class("CLIPConfig").from_dict(dict(cfg_json))
    vision = full.vision_config
    vision.projection_dim = int(full.projection_dim)
    return vision, full.text_config


def _build(cfg, dtype, grid, heads, text_cfg):
    side = int(cfg.image_size) // int(cfg.patch_size)
    eps = float(cfg.layer_norm_eps)
    embed = ClipEmbed(int(cfg.hidden_size), int(cfg.patch_size), tuple(grid), 1 + side * side, eps, dtype=dtype)
    block = Block(int(cfg.num_attention_heads), int(cfg.intermediate_size), cfg.hidden_act, eps, dtype=dtype)
    text = None
    if heads.text:
        if text_cfg is None:
            raise ValueError("the weights hold a text tower but config.json has no text_config")
        text = TextTower(text_cfg, heads.projection)
    return OwnModel(embed, block, ClipReadout(eps, heads.projection, dtype=dtype), n_layers=int(cfg.num_hidden_layers),
                    image_size=grid[0] * int(cfg.patch_size), text=text)


def processing(image_size: int) -> ImageProcessing:
    """CLIP's processor: short side to `image_size` (bicubic), centre crop, OpenAI mean and std."""
    s = int(image_size)
    return ImageProcessing(resize_shortest=s, crop=(s, s), resample=BICUBIC, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


CLIP = Family(
    name="clip",
    model_types=("clip", "clip_vision_model"),
    hub_ids=("openai/clip-vit-base-patch16", "openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14",
             "openai/clip-vit-large-patch14-336"),
    config_class="CLIPVisionConfig",
    configs=_configs,
    build=_build,
    layout=lambda cfg, grid: cls_layout(cfg, grid),
    names=lambda cfg: NAMES,
    default_processing=lambda cfg: processing(int(cfg.image_size)),
    processing_from_hf=lambda processor, cfg: ImageProcessing.from_hf(processor, square_size=False),
    interpolate="on_request",
    resize_square=False,
)
