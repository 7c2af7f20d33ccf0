"""Running the shapes world through a pretrained backbone: at what size, and at which block.

The shapes world is drawn at any size, so a backbone sees it at the resolution that gives the
world's patch grid: `grid` patches a side, e.g. 112 px = 8 x 8 patches of 14 px for DINOv2,
128 px for a 16 px-patch CLIP (`saejax.backbones.load(..., image_size=)` interpolates the
position embeddings).

>>> load_size, world_size = image_sizes("path/to/dinov2-small", grid=8)   # (112, 112)
>>> bb, params = saejax.backbones.load("path/to/dinov2-small", image_size=load_size)
>>> world = shapes.source("validation", 1_000, image_size=world_size)
"""

from __future__ import annotations

from saejax import backbones

__all__ = ["default_layer", "image_sizes"]


def image_sizes(name_or_dir, grid: int) -> tuple[int | None, int]:
    """`(image_size to pass to backbones.load, or None when it is the model's own; world image
    size)`."""
    bb, _ = backbones.load(name_or_dir)
    size = grid * bb.patch_size
    return (None if size == bb.image_size else size), size


def default_layer(n_layers: int) -> int:
    """The block two thirds of the way up: 2 of 4 (the shapes ViT's, the paper's "second to
    last" of a small model), 7 of 12 (where DINOv2 ViT-S/14 was measured on the world)."""
    return max(0, round(2 * n_layers / 3) - 1)
