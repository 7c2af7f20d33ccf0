"""What every backbone family shares: the token layout, the forward's output, where weights
came from, and the heads a checkpoint carries. (The record each family registers is
`layers.Family`; the registry is `saejax.backbones.families`.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax

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


@dataclasses.dataclass(frozen=True)
class Heads:
    """The heads a checkpoint carries besides the vision tower (read from its weight names).

    Attributes:
        n_classes: classifier outputs (ViT and DINOv2 `*ForImageClassification`), 0 for none.
        pooler: ViT's pooler output size (`ViTModel` with its pooler), 0 for none.
        projection: CLIP's `visual_projection` output size, 0 for none.
        text: the checkpoint holds CLIP's text tower (a full `CLIPModel`).
    """

    n_classes: int = 0
    pooler: int = 0
    projection: int = 0
    text: bool = False
