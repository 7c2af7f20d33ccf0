"""DINOv2 and DINOv2 with registers (`dinov2`, `dinov2_registers`): `transformers`'
`FlaxDinov2Layer` blocks; the position grid always interpolates, as PyTorch's does (registers'
one antialiased)."""

from __future__ import annotations

import copy

import flax.linen as nn
import jax.numpy as jnp

from saejax.backbones import _hf
from saejax.backbones.base import HfFamily, PositionGrid


class Dinov2:
    def __init__(self, cfg, dtype, n_classes, *, root, n_registers, antialias, grid):
        m = _hf.flax_module("dinov2.modeling_flax_dinov2")
        # The Flax DINOv2 LayerScale multiplies by `config.layerscale_value` twice (on top of the
        # learned lambda); PyTorch uses only the learned lambda. Build with 1.0 to match PyTorch.
        cfg = copy.deepcopy(cfg)
        cfg.layerscale_value = 1.0
        self.root, self.n_registers, self.dtype = root, n_registers, dtype
        self.patch_embeddings = m.FlaxDinov2PatchEmbeddings(cfg, dtype=dtype)
        self.layer = m.FlaxDinov2Layer(cfg, dtype=dtype)
        self.norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype)
        self.classifier = nn.Dense(n_classes, dtype=dtype) if n_classes else None
        self.positions = PositionGrid(cfg, grid, antialias=antialias)

    def embed(self, p, x):
        e = p[self.root]["embeddings"]
        patches = self.patch_embeddings.apply({"params": e["patch_embeddings"]}, x.astype(self.dtype))
        b, _, d = patches.shape
        cls = jnp.broadcast_to(e["cls_token"].astype(patches.dtype), (b, 1, d))
        h = jnp.concatenate([cls, patches], axis=1)
        h = h + self.positions(e["position_embeddings"]).astype(h.dtype)
        if self.n_registers:
            reg = jnp.broadcast_to(e["register_tokens"].astype(h.dtype), (b, self.n_registers, d))
            h = jnp.concatenate([h[:, :1], reg, h[:, 1:]], axis=1)
        return h

    def block(self, p, h, i):
        return self.layer.apply({"params": p[self.root]["encoder"]["layer"][str(i)]}, h, deterministic=True)[0]

    def readout(self, p, h, layout):
        tokens = self.norm.apply({"params": p[self.root]["layernorm"]}, h)
        pooled = tokens[:, 0]
        logits = None
        if self.classifier is not None:
            start, stop = layout.patches
            features = jnp.concatenate([pooled, tokens[:, start:stop].mean(axis=1)], axis=-1)
            logits = self.classifier.apply({"params": p["classifier"]}, features)
        return tokens, pooled, logits


DINOV2 = HfFamily("dinov2", "dinov2", lambda cfg, dtype, n_classes, grid: Dinov2(
    cfg, dtype, n_classes, root="dinov2", n_registers=0, antialias=False, grid=grid), interpolate="always")
DINOV2_REGISTERS = HfFamily(
    "dinov2_registers", "dinov2_with_registers", lambda cfg, dtype, n_classes, grid: Dinov2(
        cfg, dtype, n_classes, root="dinov2_with_registers", n_registers=int(cfg.num_register_tokens), antialias=True,
        grid=grid),
    n_registers=lambda cfg: int(getattr(cfg, "num_register_tokens", 0)), interpolate="always")
