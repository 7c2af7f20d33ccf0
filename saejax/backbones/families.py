"""The registry of backbone families, and the one place a `Backbone` is constructed.

Every family is a `layers.Family` built from saejax's own Flax modules (`layers`), one file
each (clip, dinov2, vit, siglip, dinov3). Adding one is that file, one entry below, and one
golden fixture from the PyTorch model.
"""

from __future__ import annotations

import jax.numpy as jnp

from saejax.backbones import clip, dinov2, dinov3, siglip, vit
from saejax.backbones.base import Heads
from saejax.backbones.layers import Family
from saejax.backbones.model import Backbone

FAMILIES: dict[str, Family] = {f.name: f for f in (clip.CLIP, dinov2.DINOV2, dinov2.DINOV2_REGISTERS, vit.VIT,
                                                   siglip.SIGLIP, siglip.SIGLIP2_NAFLEX, dinov3.DINOV3)}


def get_family(name: str) -> Family:
    """The registered family called `name`; an unknown name is an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown family {name!r}; known families: {', '.join(FAMILIES)}") from None


def grid_of(family_name: str, cfg, processing) -> tuple[int, int]:
    """The patch grid a family's model runs at with this processing (square images only)."""
    size = processing.output_size
    if size[0] != size[1]:
        raise ValueError(f"the image processor yields non-square {size} images; saejax backbones need square inputs")
    image_size, patch = int(size[0]), int(cfg.patch_size)
    if image_size % patch:
        raise ValueError(f"the image processor yields {image_size} px images, not a multiple of the patch size {patch}")
    return image_size // patch, image_size // patch


def make_backbone(family_name, cfg, *, dtype, processing, heads: Heads = Heads(), text_config=None, load_info=None,
                  interpolate: bool = False) -> Backbone:
    """Builds a `Backbone` for an HF vision config (no weights involved). CLIP, ViT and SigLIP
    run at another size than their config's only with `interpolate=True` (PyTorch's
    `interpolate_pos_encoding=True`); DINOv2, DINOv3 and NaFlex always may, as in PyTorch."""
    fam = get_family(family_name)
    grid = grid_of(family_name, cfg, processing)
    image_size = grid[0] * int(cfg.patch_size)
    if fam.interpolate == "on_request" and image_size != int(cfg.image_size) and not interpolate:
        raise ValueError(f"the image processor yields {image_size} px images but the {family_name} model expects "
                         f"{cfg.image_size} px (config.image_size); pass image_size= to load() to interpolate its "
                         "position embeddings")
    return Backbone(family=family_name, d_model=int(cfg.hidden_size), n_layers=int(cfg.num_hidden_layers),
                    patch_size=int(cfg.patch_size), image_size=image_size, grid=grid, layout=fam.layout(cfg, grid),
                    n_classes=int(heads.n_classes), dtype=dtype, processing=processing, config=cfg,
                    load_info=load_info, text_config=text_config if heads.text else None, heads=heads,
                    _impl=fam.build(cfg, jnp.float32, grid, heads, text_config))
