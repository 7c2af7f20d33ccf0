"""What every backbone family shares: the token layout, the forward's output, where weights
came from, and the record a `transformers`-Flax family registers (`HfFamily`; the own-module
families use `layers.OwnFamily`). Both kinds are listed in `saejax.backbones.families`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saejax.backbones._interp import bicubic_matrix, resize_grid

Edit = Callable[[jax.Array], jax.Array]


class TokenLayout(NamedTuple):
    """Where each kind of token sits along the token axis T of a residual [B, T, D].

    Attributes:
        cls: Index of the CLS token (0), or None if the model has none.
        registers: `(start, stop)` of the register tokens (empty range if none).
        patches: `(start, stop)` of the patch tokens, row-major over `Backbone.grid`.
        n_tokens: T.
    """

    cls: int | None
    registers: tuple[int, int]
    patches: tuple[int, int]
    n_tokens: int

    @property
    def n_patches(self) -> int:
        return self.patches[1] - self.patches[0]

    @property
    def n_registers(self) -> int:
        return self.registers[1] - self.registers[0]


class ForwardOutput(NamedTuple):
    """What `Backbone.forward` returns (a pytree).

    Attributes:
        captured: `{i: [B, T, D]}`, the residual after block i for each requested i (before an
            edit at i is applied; edits at earlier blocks are reflected).
        tokens: [B, T, D] final tokens. DINOv2 / DINOv3 / ViT / SigLIP: after the final
            layernorm (HF `last_hidden_state`). CLIP: the residual after the last block, WITHOUT
            `post_layernorm` (HF `last_hidden_state`; HF applies `post_layernorm` to CLS only).
            None when `full=False`.
        pooled: [B, D] the model's pooled embedding (HF `pooler_output`). CLIP:
            `post_layernorm(CLS)`; DINOv2 / DINOv3 / ViT: final-layernorm CLS (ViT's optional
            tanh pooler is not applied); SigLIP: the attention-pooling head's output. None when
            `full=False`.
        logits: [B, n_classes] when the checkpoint has a classification head (ViT and DINOv2
            `*ForImageClassification`), else None.
    """

    captured: dict[int, jax.Array]
    tokens: jax.Array | None
    pooled: jax.Array | None
    logits: jax.Array | None


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """Where a backbone's weights came from (filled by `saejax.backbones.load`).

    Attributes:
        path: The local model directory (a hub snapshot for hub ids).
        weight_files: The weight files read (or that the cache was made from).
        cache_file: The converted-params cache file, or None (Flax msgpack, or caching off).
        from_cache: True if the params were read from `cache_file` instead of converted.
    """

    path: str
    weight_files: tuple[str, ...]
    cache_file: str | None
    from_cache: bool


class PositionGrid:
    """A checkpoint's square grid of patch position embeddings, resized to the model's grid by
    bicubic interpolation as PyTorch's `interpolate_pos_encoding` does (`F.interpolate` to the
    new size, `align_corners=False`; see _interp). The first position (CLS) is kept."""

    def __init__(self, cfg, grid, *, antialias=False):
        side = int(cfg.image_size) // int(cfg.patch_size)
        self.side = side
        self.matrices = None if tuple(grid) == (side, side) else (
            bicubic_matrix(side, grid[0], antialias=antialias).astype(np.float32),
            bicubic_matrix(side, grid[1], antialias=antialias).astype(np.float32))

    def __call__(self, pe):
        """[1, 1 + side**2, D] -> [1, 1 + rows * cols, D]."""
        if self.matrices is None:
            return pe
        return jnp.concatenate([pe[:, :1], resize_grid(pe[0, 1:], self.side, self.matrices)[None]], axis=1)


@dataclasses.dataclass(frozen=True)
class HfFamily:
    """A family whose blocks are `transformers`' own Flax modules (`clip`, `dinov2`, `vit`).

    Attributes:
        name: The family name (`Backbone.family`).
        root: The top-level params key of the vision tower (HF's module name).
        build: `(cfg, dtype, n_classes, grid) -> impl` with `embed(p, x)`, `block(p, h, i)` and
            `readout(p, h, layout) -> (tokens, pooled, logits)`.
        n_registers: `cfg -> int`: the number of register tokens between CLS and the patches.
        interpolate: "always" (any multiple of the patch size, like DINOv2) or "on_request"
            (only with `load(..., image_size=)`, as `interpolate_pos_encoding=True`).
    """

    name: str
    root: str
    build: Callable[..., Any]
    n_registers: Callable[[Any], int] = lambda cfg: 0
    interpolate: str = "on_request"

    def layout(self, cfg, grid) -> TokenLayout:
        n_reg, n_patches = self.n_registers(cfg), grid[0] * grid[1]
        return TokenLayout(cls=0, registers=(1, 1 + n_reg), patches=(1 + n_reg, 1 + n_reg + n_patches),
                           n_tokens=1 + n_reg + n_patches)
