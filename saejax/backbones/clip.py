"""CLIP's vision tower (`clip`): `transformers`' `FlaxCLIPEncoderLayer` blocks, with the CLS
token, position embeddings (resized to the grid) and `pre_layrnorm` added here."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from saejax.backbones import _hf
from saejax.backbones.base import HfFamily, PositionGrid


class ClipVision:
    root = "vision_model"

    def __init__(self, cfg, dtype, n_classes, grid):
        m = _hf.flax_module("clip.modeling_flax_clip")
        self.patch_embedding = nn.Conv(cfg.hidden_size, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                                       padding="VALID", use_bias=False, dtype=dtype)
        self.positions = PositionGrid(cfg, grid)
        self.layer = m.FlaxCLIPEncoderLayer(cfg, dtype=dtype)
        self.norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype)

    def embed(self, p, x):
        # FlaxCLIPVisionEmbeddings, with the position embeddings resized to the grid.
        v = p[self.root]
        e = v["embeddings"]
        patches = self.patch_embedding.apply({"params": e["patch_embedding"]}, x)
        b, _, _, d = patches.shape
        cls = jnp.broadcast_to(e["class_embedding"].astype(patches.dtype), (b, 1, d))
        h = jnp.concatenate([cls, patches.reshape(b, -1, d)], axis=1)
        h = h + self.positions(e["position_embedding"]["embedding"][None]).astype(h.dtype)
        return self.norm.apply({"params": v["pre_layrnorm"]}, h)

    def block(self, p, h, i):
        return self.layer.apply({"params": p[self.root]["encoder"]["layers"][str(i)]}, h, None, deterministic=True)[0]

    def readout(self, p, h, layout):
        pooled = self.norm.apply({"params": p[self.root]["post_layernorm"]}, h[:, 0])
        return h, pooled, None


CLIP = HfFamily("clip", "vision_model", lambda cfg, dtype, n_classes, grid: ClipVision(cfg, dtype, n_classes, grid))
