"""The shapes world: procedurally generated images with per-pixel ground truth for every concept.

Each image (default 40 x 40 px) holds one to three objects on a textured grey background. An
object has a shape (`SHAPES`: circle, square, triangle, cross), a colour (`COLOURS`: red, green,
blue, yellow; each object's RGB is jittered a little around its colour), a size and a position.
Objects never overlap (their bounding boxes keep at least one pixel apart), so every pixel
belongs to exactly one object or to the background. Backgrounds (`TEXTURES`: noise, stripes,
checker, gradient) are nearly grey (grey levels 45 to 205 plus a tint of at most 6 levels per
channel), so the saturated object colours stay distinct from them.

Ground truth:

- `pixel_labels` uint8 [N, H, W]: 0 for background, `1 + class` for a pixel of an object of
  class `class = shape * len(COLOURS) + colour` (names: `PIXEL_CLASSES`). These are the
  per-pixel masks `saejax.data` carries (`Batch.masks`).
- Concepts (`CONCEPTS`): the four shapes, the four colours and "background".
  `concept_masks(pixel_labels)` gives bool [N, H, W, C] (`PIXEL_CONCEPTS[pixel_labels]`);
  `ShapesWorld.concepts` the image-level multi-hot bool [N, C].
- `patch_concepts(pixel_labels, patch_size)`: bool [N, gh, gw, C], a concept is present in a
  patch when it covers at least half of the patch's pixels; `patch_labels` gives each patch's
  majority pixel class (for probes).

Factors (`FACTORS`): four per-pixel partitions of the image, each a family of classes whose
class 0 is what the family does not describe (`factor_labels`): colour (background + 4),
shape (background + 4), size (background, small, large: the largest object is "large", the
others "small") and the background's texture (object + 4 textures). Size and texture are
independent of colour and shape. `FACTOR_CONCEPTS` (15 names: `CONCEPTS`, `SIZES`, `TEXTURES`)
are their classes other than 0, plus "background"; `factor_patch_concepts` and
`factor_patch_labels` give them per patch.

An object's size is the side of the square with the same area (so a triangle's bounding box
is sqrt(2) times its size): objects of equal size cover (nearly) equal numbers of pixels,
whatever their shape. The classification task (`labels`, names `CLASSES`): the shape and
colour of the largest object, 16 classes. The largest object is unambiguous: its size is drawn
from `target_sizes` (default 14..16 px at 40 px), the others' from `distractor_sizes`
(8..10 px), so it covers about 1.8 times the area of any other or more.

Everything is a deterministic function of the seed, and generation is vectorised numpy
(10,000 images at 40 px in about 1.5 s on one CPU core). Images are drawn in fixed chunks of
`CHUNK` images, each from its own seed, so the first `m` images of `generate(n, seed=s)` are
`generate(m, seed=s)` for any `n >= m`.

>>> train = source("train", 10_000, seed=0)       # a saejax.data.ArraySource
>>> batch = next(saejax.data.batches(train, 64, seed=0))
>>> batch.images, batch.labels, batch.masks        # uint8 [64, 40, 40, 3], int64 [64], uint8 [64, 40, 40]
>>> patch_concepts(batch.masks, 8)                 # bool [64, 5, 5, 9]: the ViT's 5 x 5 patch grid
>>> train.world.concepts[batch.ids]                # bool [64, 9] image-level labels

Long because the world's generator, its factors and its concept labels are one definition that must stay consistent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from saejax import data

__all__ = [
    "BACKGROUND",
    "CHUNK",
    "CLASSES",
    "COLOURS",
    "COLOUR_JITTER",
    "COLOUR_RGB",
    "CONCEPTS",
    "FACTORS",
    "FACTOR_CONCEPTS",
    "FILL",
    "MAX_OBJECTS",
    "PIXEL_CLASSES",
    "PIXEL_CONCEPTS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEXTURES",
    "ShapesSource",
    "ShapesWorld",
    "class_fractions",
    "concept_masks",
    "concept_factor",
    "factor_labels",
    "factor_patch_concepts",
    "factor_patch_fractions",
    "factor_patch_labels",
    "generate",
    "patch_concepts",
    "patch_fractions",
    "patch_labels",
    "source",
]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
# Base RGB of each colour; each object's RGB is this plus a uniform jitter in [-COLOUR_JITTER, COLOUR_JITTER].
COLOUR_RGB = np.array([[215, 40, 40], [40, 170, 55], [45, 85, 225], [225, 200, 40]], np.int32)
COLOUR_JITTER = 20
# Fraction of its bounding box each shape covers; a shape of size a has a box of side a / sqrt(fill).
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
TEXTURES = ("noise", "stripes", "checker", "gradient")
BACKGROUND = "background"
CONCEPTS = SHAPES + COLOURS + (BACKGROUND,)
# Task class `shape * len(COLOURS) + colour`, e.g. 0 = "red circle", 5 = "green square".
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
# Pixel label 0 = background, 1 + class for an object pixel.
PIXEL_CLASSES = (BACKGROUND,) + CLASSES
SIZES = ("small", "large")
# Per-pixel partitions; class 0 of each is what the family does not describe.
FACTORS = {"colour": (BACKGROUND,) + COLOURS, "shape": (BACKGROUND,) + SHAPES, "size": (BACKGROUND,) + SIZES,
           "texture": ("object",) + TEXTURES}
FACTOR_CONCEPTS = CONCEPTS + SIZES + TEXTURES
MAX_OBJECTS = 3
SPLITS = ("train", "validation", "test")
CHUNK = 1024


def _pixel_concept_table() -> np.ndarray:
    table = np.zeros((len(PIXEL_CLASSES), len(CONCEPTS)), bool)
    table[0, CONCEPTS.index(BACKGROUND)] = True
    for cls in range(len(CLASSES)):
        shape, colour = divmod(cls, len(COLOURS))
        table[1 + cls, shape] = True
        table[1 + cls, len(SHAPES) + colour] = True
    return table


# bool [len(PIXEL_CLASSES), len(CONCEPTS)]: which concepts a pixel label stands for.
PIXEL_CONCEPTS = _pixel_concept_table()
PIXEL_CONCEPTS.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class ShapesWorld:
    """A generated set of images and their ground truth (numpy arrays on the host).

    Object slots: slot 0 holds the largest object (the task's target); slots `k >= n_objects`
    are empty and hold -1 in the integer tables.

    Attributes:
        images: uint8 [N, H, W, 3] RGB.
        labels: int64 [N] task class of the largest object, `shape * len(COLOURS) + colour`.
        pixel_labels: uint8 [N, H, W]; 0 = background, `1 + class` for object pixels.
        object_ids: int8 [N, H, W]; 0 = background, `k + 1` for pixels of the object in slot k.
        n_objects: int64 [N], 1 to `MAX_OBJECTS`.
        shapes: int64 [N, MAX_OBJECTS] index into `SHAPES`, or -1.
        colours: int64 [N, MAX_OBJECTS] index into `COLOURS`, or -1.
        rgb: uint8 [N, MAX_OBJECTS, 3] each object's exact RGB (0 for empty slots).
        sizes: int64 [N, MAX_OBJECTS] each object's size (side of the square of equal area) in
            px, or -1.
        box_sizes: int64 [N, MAX_OBJECTS] side of each object's square bounding box in px,
            `round(size / sqrt(FILL[shape]))`, or -1.
        boxes: int64 [N, MAX_OBJECTS, 2] `(top, left)` pixel of each bounding box, or -1.
        areas: int64 [N, MAX_OBJECTS] pixels each object covers (0 for empty slots).
        textures: int64 [N] index into `TEXTURES` of each background.
        concepts: bool [N, len(CONCEPTS)] image-level multi-hot: concept c appears in the image.
        seed: the seed it was generated from.
    """

    images: np.ndarray
    labels: np.ndarray
    pixel_labels: np.ndarray
    object_ids: np.ndarray
    n_objects: np.ndarray
    shapes: np.ndarray
    colours: np.ndarray
    rgb: np.ndarray
    sizes: np.ndarray
    box_sizes: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    textures: np.ndarray
    concepts: np.ndarray
    seed: int | tuple[int, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def concept_masks(self, indices=None) -> np.ndarray:
        """bool [N, H, W, len(CONCEPTS)] per-pixel concept masks (of `indices` if given)."""
        labels = self.pixel_labels if indices is None else self.pixel_labels[indices]
        return concept_masks(labels)


class ShapesSource(data.ArraySource):
    """A `saejax.data.ArraySource` over a `ShapesWorld`.

    Examples carry the image, the task label (`classes` = `CLASSES`) and the pixel-label mask
    ([H, W] uint8, see `PIXEL_CLASSES`); `concept_masks(batch.masks)` and
    `patch_concepts(batch.masks, p)` turn a batch's masks into concept masks, and
    `source.world` holds the full ground truth (index it with `batch.ids`).

    Attributes:
        world: the `ShapesWorld`.
        split: the split name, or None.
        concepts: `CONCEPTS`.
    """

    concepts = CONCEPTS

    def __init__(self, world: ShapesWorld, split: str | None = None):
        super().__init__(world.images, world.labels, world.pixel_labels, classes=CLASSES)
        self.world, self.split = world, split

    def describe(self, index: int) -> str:
        return f"shapes/{self.split or 'custom'}[{index}]"


def source(split: str, n: int, *, seed: int = 0, image_size: int = 40, **kwargs) -> ShapesSource:
    """A split of the shapes world as a data source.

    Splits are disjoint streams: split `s` is `generate(n, seed=(seed, SPLITS.index(s)))`.

    Args:
        split: "train", "validation" or "test".
        n: number of images.
        seed: non-negative int; the same seed gives the same images.
        image_size: side of the square images in px.
        **kwargs: passed to `generate` (`target_sizes`, `distractor_sizes`, `max_objects`,
            `textures`, `contrast`).

    Returns:
        A `ShapesSource` (an `ArraySource`: labels = task classes, masks = pixel labels).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return ShapesSource(generate(n, seed=(int(seed), SPLITS.index(split)), image_size=image_size, **kwargs), split)


def generate(n: int, *, seed: int | Sequence[int], image_size: int = 40,
             target_sizes: tuple[int, int] | None = None, distractor_sizes: tuple[int, int] | None = None,
             max_objects: int = MAX_OBJECTS, textures: Sequence[str] = TEXTURES,
             contrast: tuple[float, float] = (30.0, 60.0), tries: int = 64) -> ShapesWorld:
    """Generates `n` images of the shapes world.

    Each image gets 1..max_objects objects (uniform). The first is the target: its size (the
    side of the square of equal area) is uniform in `target_sizes`; the others' in
    `distractor_sizes` (inclusive ranges, px), so the target is strictly the largest. Positions
    are uniform over the placements that keep the objects' bounding boxes in the image and at
    least 1 px apart: `tries` random placements are drawn per image and the first valid one is
    kept; when none is valid the image drops objects from the last until one is (about 6% of
    three-object images at the defaults become two-object images).

    Args:
        n: number of images (> 0).
        seed: non-negative int or sequence of them.
        image_size: side S of the square images, >= 16 px.
        target_sizes: `(lo, hi)` size of the target in px; default `(round(.34 S), round(.41 S))`
            (14..16 at S = 40).
        distractor_sizes: `(lo, hi)` size of the other objects; default
            `(round(.19 S), round(.25 S))` (8..10 at S = 40). Must stay below `target_sizes`.
        max_objects: 1 to `MAX_OBJECTS`.
        textures: the background textures to draw from (uniformly), a subset of `TEXTURES`.
        contrast: `(lo, hi)` range of the difference between a background's two grey tones
            (stripes, checker, gradient); the noise texture's standard deviation is a third of it.
        tries: placements drawn per image.

    Returns:
        A `ShapesWorld`.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    s = image_size
    target_sizes = tuple(target_sizes or (round(0.34 * s), round(0.41 * s)))
    distractor_sizes = tuple(distractor_sizes or (round(0.19 * s), round(0.25 * s)))
    if not (4 <= distractor_sizes[0] <= distractor_sizes[1] < target_sizes[0] <= target_sizes[1] <= 0.45 * s):
        raise ValueError(f"need 4 <= distractor_sizes (lo, hi) < target_sizes (lo, hi) <= 0.45 image_size; got "
                         f"distractor_sizes={distractor_sizes}, target_sizes={target_sizes}, image_size={s}")
    allowed = np.asarray([TEXTURES.index(t) for t in textures]) if all(t in TEXTURES for t in textures) else None
    if allowed is None or len(allowed) == 0:
        raise ValueError(f"textures must be a non-empty subset of {TEXTURES}, got {textures!r}")
    if not 0 <= contrast[0] <= contrast[1] <= 140:
        raise ValueError(f"contrast must be (lo, hi) with 0 <= lo <= hi <= 140, got {contrast!r}")
    entropy = tuple(int(v) for v in np.atleast_1d(seed))
    if any(v < 0 for v in entropy):
        raise ValueError(f"seed must be non-negative, got {seed!r}")
    parts = []
    for c, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(c,)))
        parts.append(_chunk(rng, CHUNK, s, target_sizes, distractor_sizes, max_objects, allowed, contrast, tries,
                            n - start))
    fields = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
    return ShapesWorld(**fields, seed=entropy[0] if len(entropy) == 1 else entropy)


# --------------------------------------------------------------------------------------------
# Ground truth helpers


def concept_masks(pixel_labels) -> np.ndarray:
    """Per-pixel concept masks from pixel labels.

    Args:
        pixel_labels: integer [..., H, W] (values index `PIXEL_CLASSES`), e.g. `Batch.masks`.

    Returns:
        bool [..., H, W, len(CONCEPTS)]: `PIXEL_CONCEPTS[pixel_labels]`.
    """
    return PIXEL_CONCEPTS[_check_labels(pixel_labels)]


def patch_concepts(pixel_labels, patch_size: int, *, min_fraction: float = 0.5) -> np.ndarray:
    """Patch-level concept presence: concept c is present in a patch when it covers at least
    `min_fraction` of the patch's pixels.

    Patches tile the image row-major from the top-left, as a ViT's patch tokens do, so entry
    `[n, i, j]` is the patch token at row i, column j of the backbone's grid.

    Args:
        pixel_labels: integer [N, H, W] pixel labels, H and W multiples of `patch_size`.
        patch_size: patch side in px.
        min_fraction: coverage threshold in (0, 1]; 0.5 by default.

    Returns:
        bool [N, H // p, W // p, len(CONCEPTS)].
    """
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    fractions = patch_fractions(pixel_labels, patch_size) @ PIXEL_CONCEPTS.astype(np.float32)
    return fractions >= min_fraction - 1e-6


def patch_fractions(pixel_labels, patch_size: int) -> np.ndarray:
    """float32 [N, gh, gw, len(PIXEL_CLASSES)]: the fraction of each patch's pixels in each pixel class."""
    labels = _check_labels(pixel_labels)
    if labels.ndim != 3:
        raise ValueError(f"pixel_labels must be [N, H, W], got shape {labels.shape}")
    return class_fractions(labels, patch_size, len(PIXEL_CLASSES))


def concept_factor(concept: str) -> tuple[str, int]:
    """`(family, class)` of a name in `FACTOR_CONCEPTS`: which factor it belongs to and its class
    there ("background" is colour class 0)."""
    for family, classes in FACTORS.items():
        if concept in classes[1:]:
            return family, classes.index(concept)
    if concept == BACKGROUND:
        return "colour", 0
    raise ValueError(f"unknown concept {concept!r}; expected one of {FACTOR_CONCEPTS}")


def factor_labels(world: ShapesWorld, indices=None) -> dict[str, np.ndarray]:
    """Per-pixel class of each factor: `{family: uint8 [N, H, W]}`, indexing `FACTORS[family]`
    (of `indices` if given)."""
    pick = (lambda a: a) if indices is None else (lambda a: a[indices])
    pixels, ids, textures = pick(world.pixel_labels).astype(np.int64), pick(world.object_ids), pick(world.textures)
    obj = pixels > 0
    return {"colour": np.where(obj, 1 + (pixels - 1) % len(COLOURS), 0).astype(np.uint8),
            "shape": np.where(obj, 1 + (pixels - 1) // len(COLOURS), 0).astype(np.uint8),
            # Slot 0 holds the largest object (object id 1).
            "size": np.where(ids == 1, 2, np.where(ids > 1, 1, 0)).astype(np.uint8),
            "texture": np.where(obj, 0, 1 + textures[:, None, None]).astype(np.uint8)}


def factor_patch_labels(world: ShapesWorld, patch_size: int, indices=None) -> dict[str, np.ndarray]:
    """Each patch's majority class per factor: `{family: int64 [N, gh, gw]}` (ties go to the
    lower class), the targets of the factorised ViT's per-patch heads and of the probes."""
    return {family: np.argmax(class_fractions(labels, patch_size, len(FACTORS[family])), axis=-1)
            for family, labels in factor_labels(world, indices).items()}


def factor_patch_fractions(world: ShapesWorld, patch_size: int, indices=None) -> np.ndarray:
    """float32 [N, gh, gw, len(FACTOR_CONCEPTS)]: the share of each patch's pixels that each
    concept covers."""
    fractions = {family: class_fractions(labels, patch_size, len(FACTORS[family]))
                 for family, labels in factor_labels(world, indices).items()}
    return np.stack([fractions[family][..., k] for family, k in map(concept_factor, FACTOR_CONCEPTS)], axis=-1)


def factor_patch_concepts(world: ShapesWorld, patch_size: int, indices=None, *,
                          min_fraction: float = 0.5) -> np.ndarray:
    """bool [N, gh, gw, len(FACTOR_CONCEPTS)]: a concept is present in a patch when its class
    covers at least `min_fraction` of the patch's pixels."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    return factor_patch_fractions(world, patch_size, indices) >= min_fraction - 1e-6


def class_fractions(labels, patch_size: int, n_classes: int) -> np.ndarray:
    """float32 [N, gh, gw, n_classes]: the fraction of each patch's pixels in each class of
    integer labels [N, H, W] (values in `[0, n_classes)`)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [N, H, W], got shape {labels.shape}")
    n, h, w = labels.shape
    p = int(patch_size)
    if p < 1 or h % p or w % p:
        raise ValueError(f"patch_size {patch_size} must divide the image size {(h, w)}")
    gh, gw = h // p, w // p
    blocks = labels.reshape(n, gh, p, gw, p).transpose(0, 1, 3, 2, 4).reshape(n, gh, gw, p * p)
    counts = np.zeros((n, gh, gw, n_classes), np.float32)
    for value in np.unique(labels):
        counts[..., value] = np.count_nonzero(blocks == value, axis=-1)
    return counts / (p * p)


def patch_labels(pixel_labels, patch_size: int) -> np.ndarray:
    """Each patch's majority pixel class, for training per-patch probes.

    Args:
        pixel_labels: integer [N, H, W] pixel labels.
        patch_size: patch side in px.

    Returns:
        int64 [N, H // p, W // p] index into `PIXEL_CLASSES` (0 = background) of the class
        covering the most pixels of the patch; ties go to the lower index (background first).
        The patch's shape is `(label - 1) // len(COLOURS)` and colour `(label - 1) % len(COLOURS)`
        when label > 0.
    """
    return np.argmax(patch_fractions(pixel_labels, patch_size), axis=-1).astype(np.int64)


def _check_labels(pixel_labels) -> np.ndarray:
    labels = np.asarray(pixel_labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"pixel_labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(PIXEL_CLASSES)):
        raise ValueError(f"pixel_labels must be in [0, {len(PIXEL_CLASSES)}), got values "
                         f"{labels.min()}..{labels.max()}")
    return labels


# --------------------------------------------------------------------------------------------
# Rendering


def _chunk(rng, b, s, target_sizes, distractor_sizes, max_objects, allowed, contrast, tries, keep):
    """Draws CHUNK images' parameters from `rng` (always all b of them, for the prefix property)
    and renders the first `keep`."""
    k_max = MAX_OBJECTS
    # ---- objects
    n_objects = rng.integers(1, max_objects + 1, size=b)
    shapes = rng.integers(0, len(SHAPES), size=(b, k_max))
    colours = rng.integers(0, len(COLOURS), size=(b, k_max))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=(b, k_max, 3))
    sizes = np.concatenate([rng.integers(target_sizes[0], target_sizes[1] + 1, size=(b, 1)),
                            rng.integers(distractor_sizes[0], distractor_sizes[1] + 1, size=(b, k_max - 1))], axis=1)
    fill = np.asarray([FILL[name] for name in SHAPES])
    box_sizes = np.minimum(np.rint(sizes / np.sqrt(fill[shapes])).astype(np.int64), s)
    u = rng.random((b, tries, k_max, 2))
    # ---- background
    textures = allowed[rng.integers(0, len(allowed), size=b)]
    tone_a = rng.uniform(55, 195, size=b)
    difference = rng.uniform(contrast[0], contrast[1], size=b)
    tone_b = np.clip(tone_a + rng.choice([-1, 1], size=b) * difference, 55, 195)
    tint = rng.uniform(-6, 6, size=(b, 3))
    angle = rng.choice(np.deg2rad([0, 45, 90, 135]), size=b)
    period = rng.uniform(4, 10, size=b)
    phase = rng.random(size=b)
    cell = rng.integers(2, 7, size=b)
    offset = rng.integers(0, 6, size=(b, 2))
    noise = (rng.standard_normal(size=(b, s, s)) * (difference / 3)[:, None, None]).astype(np.float32)

    present = np.arange(k_max)[None] < n_objects[:, None]  # [b, K]
    # Placement: top-left corners for every try; valid when all present pairs are >= 1 px apart.
    span = (s - box_sizes + 1)[:, None, :, None]  # [b, 1, K, 1]
    corner = np.floor(u * span).astype(np.int64)  # [b, T, K, 2] (top, left)
    lo, hi = corner, corner + box_sizes[:, None, :, None]  # [b, T, K, 2]
    apart = (hi[:, :, :, None] + 1 <= lo[:, :, None, :]) | (hi[:, :, None, :] + 1 <= lo[:, :, :, None])  # [b,T,K,K,2]
    separated = apart.any(-1) | np.eye(k_max, dtype=bool)  # [b, T, K, K]; either axis separates the boxes
    # Keep as many of the drawn objects as fit: the first try where slots 0..m-1 are pairwise
    # apart, for the largest m <= n_objects that has one.
    keep_m = np.ones(b, np.int64)
    chosen = np.zeros(b, np.int64)
    for m in range(k_max, 1, -1):
        ok = separated[:, :, :m, :m].all(axis=(-1, -2))  # [b, T]
        found = ok.any(axis=1) & (n_objects >= m) & (keep_m == 1)
        chosen = np.where(found, np.argmax(ok, axis=1), chosen)
        keep_m = np.where(found, m, keep_m)
    present &= np.arange(k_max)[None] < keep_m[:, None]
    boxes = corner[np.arange(b), chosen]  # [b, K, 2]
    n_objects = present.sum(1)

    rgb = np.clip(COLOUR_RGB[colours] + jitter, 0, 255).astype(np.uint8)
    rgb[~present] = 0
    shapes = np.where(present, shapes, -1)
    colours = np.where(present, colours, -1)
    sizes = np.where(present, sizes, -1)
    box_sizes = np.where(present, box_sizes, -1)
    boxes = np.where(present[..., None], boxes, -1)

    sl = slice(0, keep)
    images, pixel_labels, object_ids = _render(
        s, textures[sl], tone_a[sl], tone_b[sl], tint[sl], angle[sl], period[sl], phase[sl], cell[sl], offset[sl],
        noise[sl], present[sl], shapes[sl], colours[sl], rgb[sl], box_sizes[sl], boxes[sl])
    m = images.shape[0]
    concepts = np.zeros((m, len(CONCEPTS)), bool)
    for k in range(k_max):
        rows = np.nonzero(present[sl, k])[0]
        concepts[rows, shapes[rows, k]] = True
        concepts[rows, len(SHAPES) + colours[rows, k]] = True
    concepts[:, CONCEPTS.index(BACKGROUND)] = (pixel_labels == 0).any(axis=(1, 2))
    return dict(images=images, labels=(shapes[sl, 0] * len(COLOURS) + colours[sl, 0]).astype(np.int64),
                pixel_labels=pixel_labels, object_ids=object_ids, n_objects=n_objects[sl].astype(np.int64),
                shapes=shapes[sl].astype(np.int64), colours=colours[sl].astype(np.int64), rgb=rgb[sl],
                sizes=sizes[sl].astype(np.int64), box_sizes=box_sizes[sl].astype(np.int64),
                boxes=boxes[sl].astype(np.int64),
                areas=np.stack([(object_ids == k + 1).sum(axis=(1, 2)) for k in range(k_max)], 1).astype(np.int64),
                textures=textures[sl].astype(np.int64), concepts=concepts)


def _render(s, textures, tone_a, tone_b, tint, angle, period, phase, cell, offset, noise, present, shapes, colours,
            rgb, sizes, boxes):
    b = textures.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    yy, xx = yy[None] + 0.5, xx[None] + 0.5  # pixel centres, [1, S, S]

    def col(v, rows):
        return np.asarray(v[rows], np.float32)[:, None, None]

    # Each texture is computed only for the images that use it.
    grey = np.empty((b, s, s), np.float32)
    for kind, name in enumerate(TEXTURES):
        r = np.nonzero(textures == kind)[0]
        if not len(r):
            continue
        a, bb = col(tone_a, r), col(tone_b, r)
        if name == "noise":  # tone a plus grey per-pixel noise
            grey[r] = a + noise[r]
        elif name == "stripes":  # two tones alternating along a direction
            t = (xx * col(np.cos(angle), r) + yy * col(np.sin(angle), r)) / col(period, r) + col(phase, r)
            grey[r] = np.where((t - np.floor(t)) < 0.5, a, bb)
        elif name == "checker":  # square cells of two tones
            cx = np.floor((xx + col(offset[:, 1], r)) / col(cell, r))
            cy = np.floor((yy + col(offset[:, 0], r)) / col(cell, r))
            grey[r] = np.where((cx + cy) % 2 == 0, a, bb)
        else:  # gradient: a linear ramp from tone a to tone b along a direction
            proj = (xx - s / 2) * col(np.cos(angle), r) + (yy - s / 2) * col(np.sin(angle), r)
            grey[r] = a + (bb - a) * np.clip(proj / s + 0.5, 0, 1)
    grey = np.clip(grey, 45, 205)
    images = np.clip(np.rint(grey[..., None] + tint[:, None, None, :].astype(np.float32)), 0, 255).astype(np.uint8)

    pixel_labels = np.zeros((b, s, s), np.uint8)
    object_ids = np.zeros((b, s, s), np.int8)
    for k in range(MAX_OBJECTS):
        for j, name in enumerate(SHAPES):
            r = np.nonzero(present[:, k] & (shapes[:, k] == j))[0]
            if not len(r):
                continue
            size = col(sizes[:, k], r)
            u = (xx - col(boxes[:, k, 1], r)) / size  # local coordinates in the box, (0, 1) inside
            v = (yy - col(boxes[:, k, 0], r)) / size
            mask = (u > 0) & (u < 1) & (v > 0) & (v < 1)
            du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
            if name == "circle":
                mask &= du * du + dv * dv <= 0.25
            elif name == "triangle":  # apex up
                mask &= du <= v / 2
            elif name == "cross":  # arms a third of the side thick
                mask &= (du <= 1 / 6) | (dv <= 1 / 6)
            # square: the whole box
            images[r] = np.where(mask[..., None], rgb[r, k][:, None, None, :], images[r])
            pixel_labels[r] = np.where(mask, (1 + j * len(COLOURS) + colours[r, k])[:, None, None], pixel_labels[r])
            object_ids[r] = np.where(mask, np.int8(k + 1), object_ids[r])
    return images, pixel_labels, object_ids
