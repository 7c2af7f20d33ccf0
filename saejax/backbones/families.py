"""The registry of backbone families, and the one place a `Backbone` is constructed.

`transformers` Flax families (`HF_FAMILIES`: `base.HfFamily`, their blocks HF's Flax modules)
and saejax's own-module families (`OWN_FAMILIES`: `layers.OwnFamily`, built from
`saejax.backbones.layers`). Each family is one file (clip, dinov2, vit, siglip, dinov3).
Adding one is that file, one entry below, and one golden fixture from the PyTorch model.
"""

from __future__ import annotations

import jax.numpy as jnp

from saejax.backbones import clip, dinov2, dinov3, siglip, vit
from saejax.backbones.base import HfFamily
from saejax.backbones.layers import OwnFamily
from saejax.backbones.model import Backbone

HF_FAMILIES: dict[str, HfFamily] = {f.name: f for f in (clip.CLIP, dinov2.DINOV2, dinov2.DINOV2_REGISTERS, vit.VIT)}
OWN_FAMILIES: dict[str, OwnFamily] = {f.name: f for f in (siglip.SIGLIP, siglip.SIGLIP2_NAFLEX, dinov3.DINOV3)}
FAMILIES = tuple(HF_FAMILIES) + tuple(OWN_FAMILIES)


def make_backbone(family, cfg, *, dtype, n_classes, processing, load_info=None,
                  interpolate: bool = False) -> Backbone:
    """Builds a `Backbone` for an HF vision config (no weights involved). CLIP and ViT run at
    another size than their config's only with `interpolate=True` (PyTorch's
    `interpolate_pos_encoding=True`); DINOv2 families always interpolate, as in PyTorch."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
    own, hf = OWN_FAMILIES.get(family), HF_FAMILIES.get(family)
    patch = int(cfg.patch_size)
    size = processing.output_size
    if size[0] != size[1]:
        raise ValueError(f"the image processor yields non-square {size} images; saejax backbones need square inputs")
    image_size = int(size[0])
    on_request = (own or hf).interpolate == "on_request"
    if on_request and image_size != cfg.image_size and not interpolate:
        raise ValueError(f"the image processor yields {image_size} px images but the {family} model expects "
                         f"{cfg.image_size} px (config.image_size); pass image_size= to load() to interpolate its "
                         "position embeddings")
    if image_size % patch:
        raise ValueError(f"the image processor yields {image_size} px images, not a multiple of the patch size {patch}")
    grid = (image_size // patch, image_size // patch)
    if own is not None:
        return Backbone(family=family, d_model=int(cfg.hidden_size), n_layers=int(cfg.num_hidden_layers),
                        patch_size=patch, image_size=image_size, grid=grid, layout=own.layout(cfg, grid),
                        n_classes=int(n_classes), dtype=dtype, processing=processing, config=cfg,
                        load_info=load_info, _impl=own.build(cfg, jnp.float32, grid))
    return Backbone(family=family, d_model=int(cfg.hidden_size), n_layers=int(cfg.num_hidden_layers),
                    patch_size=patch, image_size=image_size, grid=grid, layout=hf.layout(cfg, grid),
                    n_classes=int(n_classes), dtype=dtype, processing=processing, config=cfg, load_info=load_info,
                    _impl=hf.build(cfg, jnp.float32, n_classes, grid))
