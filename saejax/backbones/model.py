"""`Backbone`: one pure, jittable ViT forward with residual capture and residual edits.

Every family runs on saejax's own Flax modules (`saejax.backbones.layers`), applied one block
at a time to the matching parameter subtrees; their numerics are checked against the PyTorch
`transformers` models (golden fixtures). The params pytree is the same for every family:

==================  ==========================================================================
key                 holds
==================  ==========================================================================
`embed`             patch embedding, CLS / register tokens, positions (CLIP: + `pre_layrnorm`)
`blocks/<i>`        block i: `ln1`, `attn/{q,k,v,o}`, `ln2`, `mlp/{up,gate?,down}`, `ls1`, `ls2`
`readout`           the final norm and the checkpoint's heads: `classifier` (ViT, DINOv2),
                    `pooler` (ViT), `projection` (CLIP's visual_projection), `head` (SigLIP)
`text`              a full CLIPModel's text tower, `text_projection` and `logit_scale`
==================  ==========================================================================

Hook convention (stated once): hook `i` is the residual stream after transformer block `i`,
which is HF's `hidden_states[i + 1]` (`hidden_states[0]` is the embedding output; for CLIP it
is after `pre_layrnorm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saejax.backbones.base import Edit, ForwardOutput, Heads, LoadInfo, TokenLayout
from saejax.backbones.layers import low_precision_matmuls
from saejax.backbones.preprocess import ImageProcessing


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A vision transformer as pure functions of an explicit params pytree.

    Made by `saejax.backbones.load`. Hashable by identity, so it may be closed over or passed
    as a static argument to `jax.jit`.

    Attributes:
        family: one of `saejax.backbones.FAMILIES`.
        d_model: Residual width D.
        n_layers: Number of transformer blocks; valid hook indices are 0 .. n_layers - 1.
        patch_size: Patch side in pixels.
        image_size: Side S of the square input images `forward` expects ([B, S, S, 3]).
        grid: `(rows, cols)` of patches.
        layout: `TokenLayout` of the residual's token axis.
        n_classes: Classifier outputs (0 when the checkpoint has no head).
        dtype: The matmul dtype. float32, or e.g. bfloat16: every dense layer's matmul gets
            bf16 inputs and accumulates in float32 (`layers.low_precision_matmuls`); params,
            norms, softmax, the residual stream and the captured activations stay float32, as
            under PyTorch's `torch.autocast`.
        processing: The `ImageProcessing` that `preprocess` applies.
        config: The HF (vision) config object.
        load_info: Where the weights came from (`LoadInfo`), or None.
        text_config: A full CLIP checkpoint's text config (for `text.clip_text_embeddings`),
            else None.
        heads: The heads the checkpoint carries (`base.Heads`: classifier, pooler, CLIP's
            projection and text tower).
    """

    family: str
    d_model: int
    n_layers: int
    patch_size: int
    image_size: int
    grid: tuple[int, int]
    layout: TokenLayout
    n_classes: int
    dtype: Any
    processing: ImageProcessing
    config: Any = dataclasses.field(repr=False)
    load_info: LoadInfo | None = dataclasses.field(default=None, repr=False)
    _impl: Any = dataclasses.field(default=None, repr=False)
    text_config: Any = dataclasses.field(default=None, repr=False)
    heads: Heads = dataclasses.field(default=Heads(), repr=False)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images) -> np.ndarray:
        """Resizes, crops and normalises uint8 images exactly as the model's HF image processor.

        Args:
            images: uint8 numpy array [N, H, W, 3] (NHWC, any H, W), or a list of uint8
                [H, W, 3] arrays of different sizes.

        Returns:
            float32 numpy array [N, S, S, 3] with S = `image_size`.

        >>> x = bb.preprocess(np.zeros((2, 300, 400, 3), np.uint8))   # doctest: +SKIP
        >>> x.shape                                                    # doctest: +SKIP
        (2, 224, 224, 3)
        """
        return self.processing(images)

    # ------------------------------------------------------------------ pure pieces
    def embed(self, params, images: jax.Array) -> jax.Array:
        """Embeds images: the residual before block 0 (HF `hidden_states[0]`).

        Args:
            params: The params pytree from `load`.
            images: float [B, S, S, 3] from `preprocess`.

        Returns:
            [B, T, D] residual.
        """
        self._check_images(images)
        with self._matmuls():
            return self._impl.embed(params, images)

    def run_blocks(self, params, resid: jax.Array, start: int, stop: int) -> jax.Array:
        """Runs blocks `start, ..., stop - 1` on a residual.

        `run_blocks(p, embed(p, x), 0, i + 1)` is the residual at hook i; continuing an edited
        residual at hook i is `run_blocks(p, edited, i + 1, n_layers)`.

        Args:
            params: The params pytree from `load`.
            resid: [B, T, D] residual entering block `start`.
            start: First block to run, 0 <= start <= stop.
            stop: One past the last block to run, <= n_layers.

        Returns:
            [B, T, D] residual after block `stop - 1` (`resid` itself if start == stop).
        """
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.n_layers):
            raise ValueError(f"run_blocks needs 0 <= start <= stop <= n_layers={self.n_layers}; "
                             f"got start={start!r}, stop={stop!r}")
        self._check_resid(resid, "run_blocks")
        with self._matmuls():
            for i in range(start, stop):
                resid = self._impl.block(params, resid, i)
        return resid

    def readout(self, params, resid: jax.Array):
        """Final norm, pooling and head applied to the residual after the last block.

        Args:
            params: The params pytree from `load`.
            resid: [B, T, D] residual after block n_layers - 1.

        Returns:
            `(tokens [B, T, D], pooled [B, D], logits [B, n_classes] or None)`, defined as in
            `ForwardOutput`.
        """
        self._check_resid(resid, "readout")
        with self._matmuls():
            return self._impl.readout(params, resid, self.layout)

    def finish(self, params, resid: jax.Array, layer: int):
        """The model's outputs from the residual after block `layer` (edited or not): the
        blocks after it, then the readout. The one continuation of a forward pass that the
        analyses (`Site.finish`, attribution, fidelity's splice) use.

        Args:
            params: The params pytree from `load`.
            resid: [B, T, D] residual after block `layer`.
            layer: a hook index, 0 .. n_layers - 1.

        Returns:
            `(tokens [B, T, D], pooled [B, D], logits [B, n_classes] or None)`, as `readout`.
        """
        (layer,) = self._check_layers((layer,), "finish")
        return self.readout(params, self.run_blocks(params, resid, layer + 1, self.n_layers))

    def forward(self, params, images: jax.Array, *, capture=(), edits: Mapping[int, Edit] | None = None,
                full: bool = True) -> ForwardOutput:
        """The model's forward pass with residual capture and residual edits.

        Pure and jittable; `capture`, `edits` and `full` are static Python values (close over
        them, e.g. `jax.jit(functools.partial(bb.forward, capture=(10,)))`).

        Args:
            params: The params pytree from `load`.
            images: float [B, S, S, 3] (NHWC), the output of `preprocess`.
            capture: Block indices i (or one int) whose output residual [B, T, D] to return.
            edits: `{i: fn}`; `fn` maps the residual after block i, [B, T, D] -> [B, T, D], and
                its result REPLACES that residual: later blocks and the outputs see the edit.
                `captured[i]` holds the residual before the edit at i.
            full: If False, stop after block `max(capture)`: later blocks are not computed and
                `tokens`, `pooled`, `logits` are None.

        Returns:
            `ForwardOutput(captured, tokens, pooled, logits)`.

        Raises:
            ValueError: A hook index outside 0 .. n_layers - 1, an edit that is not callable or
                returns a different shape, an edit after the last computed block with
                `full=False`, or images of the wrong shape / layout.

        >>> out = bb.forward(params, x, capture=(10,), edits={10: lambda r: r * 0.5})  # doctest: +SKIP
        >>> out.captured[10].shape                                                      # doctest: +SKIP
        (8, 197, 768)
        """
        capture = self._check_layers((capture,) if isinstance(capture, (int, np.integer)) else capture, "capture")
        edits = dict(edits or {})
        self._check_layers(tuple(edits), "edits")
        for i, fn in edits.items():
            if not callable(fn):
                raise ValueError(f"edits[{i}] must be a callable [B, T, D] -> [B, T, D]; got {type(fn).__name__}")
        if full:
            stop = self.n_layers
        else:
            if not capture:
                raise ValueError("full=False needs at least one capture index (nothing would be computed)")
            stop = max(capture) + 1
            late = sorted(i for i in edits if i >= stop)
            if late:
                raise ValueError(f"edits at blocks {late} come after the last captured block {stop - 1} "
                                 "with full=False, so they would have no effect")
        wanted = set(capture)
        h = self.embed(params, images)
        captured = {}
        for i in range(stop):
            h = self.run_blocks(params, h, i, i + 1)
            if i in wanted:
                captured[i] = h
            if i in edits:  # (outside the low-precision context: an edit runs as its author wrote it)
                edited = edits[i](h)
                if getattr(edited, "shape", None) != h.shape:
                    raise ValueError(f"edits[{i}] returned shape {getattr(edited, 'shape', None)}; "
                                     f"expected the residual's shape {h.shape} [B, T, D]")
                h = edited.astype(h.dtype)
        if not full:
            return ForwardOutput(captured, None, None, None)
        tokens, pooled, logits = self.readout(params, h)
        return ForwardOutput(captured, tokens, pooled, logits)

    # ------------------------------------------------------------------ checks
    def _matmuls(self):
        if jnp.dtype(self.dtype) == jnp.float32:
            return contextlib.nullcontext()
        return low_precision_matmuls(self.dtype)

    def _check_layers(self, layers, what):
        layers = tuple(layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.n_layers:
                raise ValueError(f"{what}: block index {i!r} out of range; valid hook indices are 0 .. "
                                 f"{self.n_layers - 1} (n_layers={self.n_layers}; hook i = residual after block i)")
        return tuple(int(i) for i in layers)

    def _check_images(self, images):
        shape = tuple(getattr(images, "shape", ()))
        s = self.image_size
        expected = f"[B, {s}, {s}, 3] (NHWC float, from bb.preprocess)"
        if len(shape) == 4 and shape[1] == 3 and shape[2:] == (s, s):
            raise ValueError(f"images look channels-first (NCHW) with shape {shape}; expected {expected}: "
                             "transpose with images.transpose(0, 2, 3, 1)")
        if len(shape) != 4 or shape[1:] != (s, s, 3):
            raise ValueError(f"images have shape {shape}; {self.family} backbone expects {expected}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images have dtype {images.dtype}; expected floats from bb.preprocess "
                             "(run bb.preprocess on uint8 images first)")

    def _check_resid(self, resid, what):
        shape = tuple(getattr(resid, "shape", ()))
        if len(shape) != 3 or shape[1:] != (self.layout.n_tokens, self.d_model):
            raise ValueError(f"{what}: residual has shape {shape}; expected "
                             f"[B, {self.layout.n_tokens}, {self.d_model}] [B, T, D]")
