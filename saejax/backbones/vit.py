"""ViT (`vit`): `transformers`' `FlaxViTLayer` blocks, with the CLS token and position
embeddings (resized to the grid) added here; the optional classifier reads the final CLS."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from saejax.backbones import _hf
from saejax.backbones.base import HfFamily, PositionGrid


class Vit:
    root = "vit"

    def __init__(self, cfg, dtype, n_classes, grid):
        m = _hf.flax_module("vit.modeling_flax_vit")
        self.patch_embeddings = m.FlaxViTPatchEmbeddings(cfg, dtype=dtype)
        self.positions = PositionGrid(cfg, grid)
        self.layer = m.FlaxViTLayer(cfg, dtype=dtype)
        self.norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype)
        self.classifier = nn.Dense(n_classes, dtype=dtype) if n_classes else None

    def embed(self, p, x):
        # FlaxViTEmbeddings, with the position embeddings resized to the grid.
        e = p[self.root]["embeddings"]
        patches = self.patch_embeddings.apply({"params": e["patch_embeddings"]}, x)
        b, _, d = patches.shape
        h = jnp.concatenate([jnp.broadcast_to(e["cls_token"].astype(patches.dtype), (b, 1, d)), patches], axis=1)
        return h + self.positions(e["position_embeddings"]).astype(h.dtype)

    def block(self, p, h, i):
        return self.layer.apply({"params": p[self.root]["encoder"]["layer"][str(i)]}, h, deterministic=True)[0]

    def readout(self, p, h, layout):
        tokens = self.norm.apply({"params": p[self.root]["layernorm"]}, h)
        logits = None if self.classifier is None else self.classifier.apply({"params": p["classifier"]}, tokens[:, 0])
        return tokens, tokens[:, 0], logits


VIT = HfFamily("vit", "vit", lambda cfg, dtype, n_classes, grid: Vit(cfg, dtype, n_classes, grid))
