"""`Backbone`: one pure, jittable ViT forward with residual capture and residual edits.

For the `transformers` Flax families below, the transformer blocks, patch embeddings and norms are `transformers`' own Flax modules,
applied one block at a time to the matching parameter subtrees, so the numerics are HF's. The
CLS token and position embeddings are added here, so that the position grid can be
interpolated to other image sizes as PyTorch does (`_PositionGrid`). The params
pytree is the parameter tree of HF's Flax model class for the checkpoint (absent heads
omitted):

==================  ==========================================================================
family              params tree (top level)
==================  ==========================================================================
clip                `vision_model` (+ `visual_projection`, and for full CLIPModel checkpoints
                    `text_model`, `text_projection`, `logit_scale`: loaded, unused by forward)
dinov2              `dinov2` (+ `classifier` for Dinov2ForImageClassification)
dinov2_registers    `dinov2_with_registers` (DINOv2 tree + `embeddings/register_tokens`)
vit                 `vit` (+ `classifier` for ViTForImageClassification, `pooler` if saved)
siglip, siglip2,    `embed`, `blocks/<i>`, `readout`: saejax's own modules, one tree for every
dinov3              own family (`saejax.backbones.layers`); the same `Backbone` drives them
==================  ==========================================================================

Hook convention (stated once): hook `i` is the residual stream after transformer block `i`,
which is HF's `hidden_states[i + 1]` (`hidden_states[0]` is the embedding output; for CLIP it
is after `pre_layrnorm`).

Long because it holds the Backbone contract and the three `transformers`-Flax families; giving each family a file of its own is still open.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saejax.backbones import _hf
from saejax.backbones._interp import bicubic_matrix, resize_grid
from saejax.backbones.layers import low_precision_matmuls
from saejax.backbones.preprocess import ImageProcessing


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
            *ForImageClassification), else None.
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


class _PositionGrid:
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


class _Clip:
    root = "vision_model"

    def __init__(self, cfg, dtype, n_classes, grid):
        m = _hf.flax_module("clip.modeling_flax_clip")
        self.patch_embedding = nn.Conv(cfg.hidden_size, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                                       padding="VALID", use_bias=False, dtype=dtype)
        self.positions = _PositionGrid(cfg, grid)
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


class _Dinov2:
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
        self.positions = _PositionGrid(cfg, grid, antialias=antialias)

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


class _Vit:
    root = "vit"

    def __init__(self, cfg, dtype, n_classes, grid):
        m = _hf.flax_module("vit.modeling_flax_vit")
        self.patch_embeddings = m.FlaxViTPatchEmbeddings(cfg, dtype=dtype)
        self.positions = _PositionGrid(cfg, grid)
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


def make_backbone(family, cfg, *, dtype, n_classes, processing, load_info=None,
                  interpolate: bool = False) -> Backbone:
    """Builds a `Backbone` for an HF vision config (no weights involved). CLIP and ViT run at
    another size than their config's only with `interpolate=True` (PyTorch's
    `interpolate_pos_encoding=True`); DINOv2 families always interpolate, as in PyTorch."""
    from saejax.backbones.families import FAMILIES, OWN_FAMILIES  # noqa: PLC0415  (the family files import this module)

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
    own = OWN_FAMILIES.get(family)
    patch = int(cfg.patch_size)
    size = processing.output_size
    if size[0] != size[1]:
        raise ValueError(f"the image processor yields non-square {size} images; saejax backbones need square inputs")
    image_size = int(size[0])
    on_request = own.interpolate == "on_request" if own else family in ("clip", "vit")
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
    n_patches = grid[0] * grid[1]
    n_reg = int(getattr(cfg, "num_register_tokens", 0)) if family == "dinov2_registers" else 0
    layout = TokenLayout(cls=0, registers=(1, 1 + n_reg), patches=(1 + n_reg, 1 + n_reg + n_patches),
                         n_tokens=1 + n_reg + n_patches)
    if family == "clip":
        impl = _Clip(cfg, jnp.float32, n_classes, grid)
    elif family == "vit":
        impl = _Vit(cfg, jnp.float32, n_classes, grid)
    else:
        registers = family == "dinov2_registers"
        impl = _Dinov2(cfg, jnp.float32, n_classes, root="dinov2_with_registers" if registers else "dinov2",
                       n_registers=n_reg, antialias=registers, grid=grid)
    return Backbone(family=family, d_model=int(cfg.hidden_size), n_layers=int(cfg.num_hidden_layers),
                    patch_size=patch, image_size=image_size, grid=grid, layout=layout, n_classes=int(n_classes),
                    dtype=dtype, processing=processing, config=cfg, load_info=load_info, _impl=impl)
