"""Host-side image pipelines: sources of uint8 RGB images and a seeded, resumable batch iterator.

A *source* is a random-access sequence of examples (`len(source)`, `source[i]`), which makes it a
grain `RandomAccessDataSource` too. Three kinds:

- `ArraySource`: in-memory arrays.
- `ImageFolderSource`: a local folder of image files, read with PIL (class subfolders -> labels).
- `TfdsSource`: a tensorflow-datasets split through its random-access `data_source` (ArrayRecord);
  TensorFlow is not needed.

`batches` turns a source into an iterator of `Batch`es (numpy, on the host), in an order fixed
by a seed, resumable from any `Batch.position`, and split across processes for multi-host
training. Files are decoded ahead of the consumer by grain's reader threads (PIL and the
ArrayRecord reader release the GIL); the order and the positions are saejax's own, below.

>>> source = ImageFolderSource("/data/flowers", image_size=224)
>>> for batch in batches(source, 64, seed=0, epochs=1):
...     batch.images   # uint8 [64, 224, 224, 3]
...     batch.ids      # int64 [64]: indices into the source (source.paths[i])
...     batch.labels   # int64 [64]: indices into source.classes
...     batch.position # save it; batches(source, 64, seed=0, start=position) resumes after it

Order and resumption. The source is read in a stream of epochs; epoch `e` visits every example
once, in the order `permutation(len(source), seed=seed, epoch=e)` (or `0..N-1` without
shuffling). A position is a count of examples into that stream: `epoch = position // N`, offset
`position % N`. Each global batch takes the next `batch_size * process_count` examples of the
current epoch. With `drop_remainder=True` an epoch's last, incomplete global batch is dropped and
the position jumps to the start of the next epoch; without it the last batch is smaller.
Starting from the `position` of any batch yields exactly the batches that followed it. Because
positions count examples, a run can also be resumed with another batch size.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from typing import Any, Iterator, NamedTuple, Sequence

import grain
import numpy as np

__all__ = [
    "RESAMPLING",
    "ArraySource",
    "Batch",
    "Example",
    "FileListSource",
    "ImageFolderSource",
    "Resizing",
    "Source",
    "TfdsSource",
    "UnreadableImageError",
    "batches",
    "match_mask",
    "one_pass",
    "patch_mode_labels",
    "permutation",
    "read_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
_RESIZE_MODES = ("crop", "stretch")


class UnreadableImageError(OSError):
    """An image that cannot be read or decoded; the message names the file or record."""


class Example(NamedTuple):
    """One example of a source.

    Attributes:
        image: uint8 [H, W, 3] RGB.
        label: the class index, or None when the source has no labels.
        mask: [H, W] per-pixel labels, or None when the source has no masks.
    """

    image: np.ndarray
    label: Any = None
    mask: np.ndarray | None = None


class Batch(NamedTuple):
    """One process's share of a global batch (numpy arrays on the host).

    Attributes:
        images: uint8 [B, H, W, 3] RGB.
        ids: int64 [B] indices of the examples in the source.
        labels: [B] labels (int64 for folders and tfds), or None.
        masks: [B, H, W] per-pixel labels, or None.
        position: the stream position after this global batch (the same on every process):
            pass it as `batches(..., start=position)` to continue after this batch.
    """

    images: np.ndarray
    ids: np.ndarray
    labels: np.ndarray | None
    masks: np.ndarray | None
    position: int


# --------------------------------------------------------------------------------------------
# Sources


class Source:
    """Base class of image sources: a random-access sequence of `Example`s.

    Subclasses implement `__len__`, `_load(i)` and optionally `describe(i)`.

    Attributes:
        classes: class names (label `i` is `classes[i]`), or None.
        has_labels: whether examples carry labels.
        has_masks: whether examples carry per-pixel masks.
        skip_unreadable: whether `batches` skips unreadable images (else it raises).
        skipped: image id -> error message, for every image skipped so far.
        resizing: how images are brought to one size (`Resizing`), or None.
    """

    classes: tuple[str, ...] | None = None
    has_labels: bool = False
    has_masks: bool = False
    skip_unreadable: bool = False
    resizing: Resizing | None = None

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of every image, or None when images keep their own sizes."""
        return None if self.resizing is None else self.resizing.size

    def __init__(self) -> None:
        self.skipped: dict[int, str] = {}
        self._skip_lock = threading.Lock()

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> Example:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name for example `index` (a path, or dataset/split[index])."""
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, index: int) -> Example:
        """Example `index` (0 <= index < len).

        Raises:
            IndexError: index out of range.
            UnreadableImageError: the image cannot be read or decoded (names the file).
        """
        index = _check_index(index, len(self))
        return self._load(index)

    def _record_skip(self, index: int, error: Exception) -> None:
        with self._skip_lock:
            self.skipped[index] = str(error)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, labels={self.has_labels}, masks={self.has_masks})"


class ArraySource(Source):
    """Images held in memory.

    Args:
        images: uint8 [N, H, W, 3]; grayscale [N, H, W] or [N, H, W, 1] and RGBA [N, H, W, 4]
            are converted to RGB when read.
        labels: optional [N] labels (any dtype; kept as given).
        masks: optional [N, H, W] (or [N, H, W, 1]) per-pixel labels.
        classes: optional class names.

    Raises:
        ValueError: empty, non-uint8 or wrongly shaped images, or labels/masks that do not
            match the images.

    >>> source = ArraySource(np.zeros((10, 32, 32, 3), np.uint8), labels=np.arange(10) % 2)
    """

    def __init__(self, images, labels=None, masks=None, *, classes: Sequence[str] | None = None):
        super().__init__()
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got dtype {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))):
            raise ValueError("images must be [N, H, W, 3] (or [N, H, W], [N, H, W, 1], [N, H, W, 4]), "
                             f"got shape {images.shape}")
        if images.shape[0] == 0:
            raise ValueError("images is empty")
        if images.ndim == 3:
            images = images[..., None]
        n, h, w = images.shape[:3]
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape [N] = ({n},), got {labels.shape}")
        if masks is not None:
            masks = np.asarray(masks)
            if masks.ndim == 4 and masks.shape[-1] == 1:
                masks = masks[..., 0]
            if masks.shape != (n, h, w):
                raise ValueError(f"masks must have shape [N, H, W] = {(n, h, w)} to match images "
                                 f"{images.shape}, got {masks.shape}")
        self.images, self.labels, self.masks = images, labels, masks
        self.classes = tuple(classes) if classes is not None else None
        self.has_labels, self.has_masks = labels is not None, masks is not None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, index: int) -> Example:
        return Example(_rgb(self.images[index]),
                       None if self.labels is None else self.labels[index],
                       None if self.masks is None else self.masks[index])

    def _take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Vectorised read of many examples: (images [B, H, W, 3], labels, masks)."""
        return (_rgb(self.images[indices]),
                None if self.labels is None else self.labels[indices],
                None if self.masks is None else self.masks[indices])


class ImageFolderSource(Source):
    """Image files in a local folder, decoded with PIL when read.

    Two layouts: `root/<class name>/**/<image>` (labels are indices into the sorted class
    names, `classes`), or a flat `root/<image>` folder (no labels). Files are found by extension
    (`IMAGE_EXTENSIONS`, any case) and sorted, so image id `i` is `paths[i]`; hidden files and
    folders are ignored. Every pixel format is made RGB by `read_image`'s policy (EXIF
    orientation applied, alpha dropped, 16-bit grey scaled).

    Images of different sizes only batch when `image_size` is given: each image is then resized
    with PIL at load time (`Resizing`), either `resize="crop"` (the short side to `short_side`,
    or just enough to cover `image_size`, aspect ratio kept, then the centre; the default) or
    `resize="stretch"` (plain resize to `image_size`), with PIL's antialiased `resample` filter.
    Any image size works, 1 x 1 px to tens of thousands a side. `bb.processing.source_resizing()`
    is a backbone's own geometry: with it, the source and `bb.preprocess` give exactly the pixels
    of the model's HF image processor.

    Args:
        root: the folder.
        image_size: None (keep each image's size), an int (square) or (height, width).
        resize: "crop" or "stretch", see above.
        short_side: with "crop": the short side after resizing (>= max(image_size)), or None.
        resample: "bicubic" (default), "bilinear", "lanczos", ... (a key of `RESAMPLING`).
        skip_unreadable: if False (default) an unreadable image raises `UnreadableImageError`
            naming the file; if True `batches` skips it (see `batches`) and records it in
            `skipped` (image id -> error).

    Attributes:
        paths: sorted image paths; image id `i` is `paths[i]`.
        labels: int64 [N] class indices, or None for a flat folder.
        classes: sorted class folder names, or None for a flat folder.

    Raises:
        FileNotFoundError: `root` is not a folder, or holds no images (or a class folder is
            empty).
        ValueError: image files next to class folders, or a bad `image_size`/`resize`.
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 resize: str = "crop", short_side: int | None = None, resample: str = "bicubic",
                 skip_unreadable: bool = False):
        super().__init__()
        self.root = os.fspath(root)
        self.resizing = Resizing.of(image_size, resize, short_side, resample)
        self.skip_unreadable = bool(skip_unreadable)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a folder")
        entries = sorted(e for e in os.listdir(self.root) if not e.startswith("."))
        class_dirs = [e for e in entries if os.path.isdir(os.path.join(self.root, e))]
        top_images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(self.root, e))]
        if class_dirs:
            if top_images:
                raise ValueError(f"{self.root!r} holds both class folders ({class_dirs[:3]}...) and image "
                                 f"files ({top_images[:3]}...); use one layout")
            paths, labels = [], []
            for label, name in enumerate(class_dirs):
                found = _find_images(os.path.join(self.root, name))
                if not found:
                    raise FileNotFoundError(f"class folder {os.path.join(self.root, name)!r} holds no "
                                            f"images (extensions {IMAGE_EXTENSIONS})")
                paths += found
                labels += [label] * len(found)
            self.classes = tuple(class_dirs)
            self.labels = np.asarray(labels, np.int64)
            self.has_labels = True
        else:
            paths = [os.path.join(self.root, e) for e in top_images]
            self.labels = None
            if not paths:
                raise FileNotFoundError(f"image folder {self.root!r} holds no images "
                                        f"(extensions {IMAGE_EXTENSIONS}) and no class folders")
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def _load(self, index: int) -> Example:
        image = read_image(self.paths[index])
        if self.resizing is not None:
            image = self.resizing.apply(image)
        return Example(image, None if self.labels is None else int(self.labels[index]), None)


class FileListSource(Source):
    """Images (and optionally per-pixel masks) read from lists of files: the base of data sets
    with their own layout (`saejax.datasets.cub`, `saejax.datasets.ade20k`).

    Args:
        paths: image files.
        labels: [N] integer labels, or None.
        mask_paths: a mask image per image (PNG of integer labels; palette and greyscale PNGs
            are read as their indices / values, a grey mask saved as RGB as its grey), or None.
        max_label: the largest valid mask value, or None: a mask with a larger one is
            unreadable (an `UnreadableImageError` naming it), never a label clamped downstream.
        classes: class names, or None.
        image_size, resize, short_side, resample: as in `ImageFolderSource` (e.g. "resize 256,
            crop 224": `image_size=224, short_side=256`).
        skip_unreadable: as in `ImageFolderSource`; a mask that cannot be read or does not fit
            its image counts as unreadable too.

    Masks are resized with the image's geometry (`Resizing.plan`) and nearest-neighbour
    sampling, so mask and image stay aligned pixel for pixel. A mask of the same picture at
    another resolution (aspect ratio within 2%) is first resized to its image; one of another
    shape is an error naming both files. When an image carries an EXIF orientation and its mask
    has the stored image's shape, the mask is turned with it (it was drawn on the stored pixels).
    """

    def __init__(self, paths: Sequence[str], *, labels=None, mask_paths: Sequence[str] | None = None,
                 max_label: int | None = None, classes: Sequence[str] | None = None, image_size: int | tuple[int, int] | None = None,
                 resize: str = "crop", short_side: int | None = None, resample: str = "bicubic",
                 skip_unreadable: bool = False):
        super().__init__()
        if not paths:
            raise ValueError("paths is empty")
        self.paths = [os.fspath(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        if self.labels is not None and self.labels.shape != (len(self.paths),):
            raise ValueError(f"labels must have shape ({len(self.paths)},), got {self.labels.shape}")
        self.mask_paths = None if mask_paths is None else [os.fspath(p) for p in mask_paths]
        if self.mask_paths is not None and len(self.mask_paths) != len(self.paths):
            raise ValueError(f"{len(self.mask_paths)} mask paths for {len(self.paths)} images")
        self.max_label = max_label
        self.classes = None if classes is None else tuple(classes)
        self.resizing = Resizing.of(image_size, resize, short_side, resample)
        self.skip_unreadable = bool(skip_unreadable)
        self.has_labels, self.has_masks = self.labels is not None, self.mask_paths is not None

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def _load(self, index: int) -> Example:
        image, transpose, stored_shape = _read_oriented(self.paths[index])
        mask = None
        if self.mask_paths is not None:
            mask = _read_mask(self.mask_paths[index])
            if self.max_label is not None and mask.size and int(mask.max()) > self.max_label:
                raise UnreadableImageError(f"mask {self.mask_paths[index]}: label {int(mask.max())} is out of "
                                           f"range 0..{self.max_label}")
            if transpose is not None and mask.shape == stored_shape:
                mask = np.asarray(_pil().Image.fromarray(mask.astype(np.int32), "I").transpose(transpose),
                                  mask.dtype)
            mask = match_mask(mask, image.shape[:2], f"{self.mask_paths[index]} (mask of {self.paths[index]})")
        if self.resizing is not None:
            image = self.resizing.apply(image)
            if mask is not None:
                mask = self.resizing.apply(mask, mask=True)
        return Example(image, None if self.labels is None else int(self.labels[index]), mask)


def patch_mode_labels(masks, patch_size: int, *, ignore: int | None = 0) -> np.ndarray:
    """Each patch's label: the most frequent pixel label in it, `ignore` dropped (ties to the
    smallest label; a patch with only ignored pixels gets `ignore`). saev's rule for patch labels.

    Args:
        masks: integer [N, H, W] pixel labels.
        patch_size: patch side in px (must divide H and W).
        ignore: a label that never wins (ADE20K's 0, "other"), or None.

    Returns:
        int64 [N, H // p, W // p].
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype.kind not in "iu":
        raise ValueError(f"masks must be integer [N, H, W], got {masks.dtype} {masks.shape}")
    n, h, w = masks.shape
    p = int(patch_size)
    if p < 1 or h % p or w % p:
        raise ValueError(f"patch_size {patch_size} must divide the mask size {(h, w)}")
    blocks = masks.reshape(n, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(n, h // p, w // p, p * p)
    values = np.unique(masks)
    if ignore is not None:
        values = values[values != ignore]
    if values.size == 0:
        return np.full((n, h // p, w // p), ignore, np.int64)
    counts = np.stack([np.count_nonzero(blocks == v, axis=-1) for v in values], axis=-1)
    best = values[np.argmax(counts, axis=-1)].astype(np.int64)  # argmax: the first (smallest) of ties
    return np.where(counts.max(axis=-1) > 0, best, -1 if ignore is None else ignore)


class TfdsSource(Source):
    """A tensorflow-datasets split read through its random-access `data_source` (no TensorFlow).

    The split must be prepared as ArrayRecord (`file_format="array_record"`). Preparing needs no
    TensorFlow when the builder yields images as files, bytes or PIL images; builders that yield
    numpy images need TensorFlow to encode them.

    Args:
        name_or_builder: a registered dataset name (`"oxford_iiit_pet:4.0.0"`) or a
            `tfds.core.DatasetBuilder`.
        split: a split, with slicing (`"train[:10%]"`).
        data_dir: where the prepared data lives (names only; a builder knows its own).
        image_key: feature holding the image ([H, W, C] uint8, C in 1, 3, 4; made RGB).
        label_key: feature holding the label, or None for no labels.
        mask_key: feature holding a per-pixel mask ([H, W] or [H, W, 1]), or None.
        image_size, resize, short_side, resample: as in `ImageFolderSource`. Masks are resized
            with the same geometry and nearest-neighbour sampling; a mask at another resolution
            of its image is brought to the image first (as in `FileListSource`).
        skip_unreadable: as in `ImageFolderSource`.
        download: let tfds download and prepare the dataset when it is missing (most builders
            need TensorFlow to prepare).

    Attributes:
        data_source: the underlying tfds data source.
        classes: the label feature's class names when it is a `ClassLabel`, else None.

    Raises:
        FileNotFoundError: the dataset is not prepared as ArrayRecord in `data_dir`.
        KeyError: a key is not a feature of the dataset (the message lists the features).
    """

    def __init__(self, name_or_builder, split: str, *, data_dir: str | os.PathLike | None = None,
                 image_key: str = "image", label_key: str | None = "label", mask_key: str | None = None,
                 image_size: int | tuple[int, int] | None = None, resize: str = "crop",
                 short_side: int | None = None, resample: str = "bicubic", skip_unreadable: bool = False,
                 download: bool = False):
        super().__init__()
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        self.resizing = Resizing.of(image_size, resize, short_side, resample)
        self.skip_unreadable = bool(skip_unreadable)
        self.split = split
        if isinstance(name_or_builder, str):
            self.name = name_or_builder
            data_dir = None if data_dir is None else os.fspath(data_dir)
            try:
                # tfds only defaults to ArrayRecord when data_dir is None: ask for it when preparing.
                self.data_source = tfds.data_source(
                    name_or_builder, split=split, data_dir=data_dir, download=download,
                    builder_kwargs={"file_format": "array_record"} if download else None)
            except NotImplementedError as e:  # what tfds raises for a missing/TFRecord dataset
                raise FileNotFoundError(
                    f"tfds dataset {name_or_builder!r} is not prepared as ArrayRecord in data_dir="
                    f"{data_dir!r}: prepare it with download_and_prepare(file_format='array_record') "
                    f"(builders that yield numpy images need TensorFlow for that) or pass "
                    f"download=True") from e
        elif hasattr(name_or_builder, "as_data_source"):
            if data_dir is not None:
                raise ValueError("data_dir is given by the builder; pass it to the builder instead")
            self.name = name_or_builder.name
            if download:
                name_or_builder.download_and_prepare(file_format="array_record")
            self.data_source = name_or_builder.as_data_source(split=split)
        else:
            raise TypeError(f"name_or_builder must be a dataset name or a tfds DatasetBuilder, got "
                            f"{type(name_or_builder).__name__}")
        features = self.data_source.dataset_info.features
        for role, key in (("image_key", image_key), ("label_key", label_key), ("mask_key", mask_key)):
            if key is not None and key not in features:
                hint = " (pass label_key=None for a dataset without labels)" if role == "label_key" else ""
                raise KeyError(f"{role}={key!r} is not a feature of {self.name!r}; features: "
                               f"{sorted(features.keys())}{hint}")
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.has_labels, self.has_masks = label_key is not None, mask_key is not None
        names = getattr(features[label_key], "names", None) if label_key is not None else None
        self.classes = tuple(names) if names else None

    def __len__(self) -> int:
        return len(self.data_source)

    def describe(self, index: int) -> str:
        return f"{self.name}/{self.split}[{index}]"

    def _load(self, index: int) -> Example:
        try:
            record = self.data_source[index]
        except Exception as e:  # decoding errors come from PIL/cv2/protobuf; name the record
            raise UnreadableImageError(f"cannot read {self.describe(index)}: {e}") from e
        image = np.asarray(record[self.image_key])
        image = _rgb(image[..., None] if image.ndim == 2 else image, what=self.describe(index))
        label = int(np.asarray(record[self.label_key])) if self.label_key is not None else None
        mask = None
        if self.mask_key is not None:
            mask = np.asarray(record[self.mask_key])
            if mask.ndim == 3 and mask.shape[-1] == 1:
                mask = mask[..., 0]
            if mask.ndim != 2:
                raise ValueError(f"mask {self.mask_key!r} of {self.describe(index)} must be [H, W] or "
                                 f"[H, W, 1], got {mask.shape}")
            mask = match_mask(mask, image.shape[:2], f"mask {self.mask_key!r} of {self.describe(index)}")
        if self.resizing is not None:
            image = self.resizing.apply(image)
            if mask is not None:
                mask = self.resizing.apply(mask, mask=True)
        return Example(image, label, mask)


# --------------------------------------------------------------------------------------------
# Iteration


def permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of `0..n-1` (int64 [n]) fixed by `(seed, epoch)`.

    Built from the raw output of numpy's PCG64 bit generator seeded with `SeedSequence([seed,
    epoch])`, which numpy keeps stable across versions, so a checkpointed position stays valid.
    """
    bits = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(n)
    return np.argsort(bits, kind="stable").astype(np.int64)


def batches(source: Source, batch_size: int, *, seed: int | None = None, start: int = 0,
            shuffle: bool = True, drop_remainder: bool = True, process_index: int = 0,
            process_count: int = 1, epochs: int | None = None, num_threads: int | None = None,
            prefetch: int = 2, refill_skipped: bool = True) -> Iterator[Batch]:
    """Iterate over `source` in seeded, resumable, per-process batches.

    Every process runs the same stream (see the module docstring): global batch `g` is the next
    `batch_size * process_count` examples of the epoch's order, and process `i` gets rows
    `[i * batch_size, (i + 1) * batch_size)` of it, so the processes' batches are disjoint and
    together make the single-process batch of size `batch_size * process_count`. An incomplete
    last global batch (`drop_remainder=False`) is split as evenly as possible; a process may then
    get fewer rows (or none) but every process yields the same number of batches. Multi-host
    `jit` needs equal shapes, so train with `drop_remainder=True`.

    Unreadable images raise `UnreadableImageError`, unless the source was made with
    `skip_unreadable=True`: then the image is recorded in `source.skipped` and its slot is
    filled by the next readable example of the epoch's order (wrapping around), so batches keep
    their size and stay deterministic; that example then appears twice in the epoch. With
    `refill_skipped=False` (a pass that evaluates every image once) the batch is smaller
    instead, and may be empty.

    Args:
        source: an `ArraySource`, `ImageFolderSource`, `TfdsSource` or other `Source`.
        batch_size: examples per batch on this process.
        seed: non-negative int fixing the order; required when `shuffle` is True.
        start: stream position to start from: 0, or the `position` of the last batch consumed.
        shuffle: visit each epoch in the order `permutation(N, seed=seed, epoch=e)`; else in
            index order.
        drop_remainder: drop each epoch's incomplete last global batch.
        process_index: this process's index, `jax.process_index()`.
        process_count: the number of processes, `jax.process_count()`.
        epochs: stop after this many epochs of the stream (counted from position 0, not from
            `start`); None: never stop.
        num_threads: grain threads decoding images (default: the CPUs this process may use).
        prefetch: batches decoded ahead of the consumer.
        refill_skipped: whether a skipped image's slot is filled by the next readable one (see
            above); else the batch goes without it.

    Returns:
        An iterator of `Batch`; arguments are checked when `batches` is called.

    Raises:
        ValueError: bad arguments, or a global batch larger than the source with
            `drop_remainder=True` (no batch could be made).

    >>> it = batches(ArraySource(images), 32, seed=0)
    >>> first = next(it)
    >>> resumed = batches(ArraySource(images), 32, seed=0, start=first.position)  # continues
    """
    n = len(source)
    if n == 0:
        raise ValueError("source is empty")
    for name, value in (("batch_size", batch_size), ("process_count", process_count)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int (a Batch.position), got {start!r}")
    if epochs is not None and (not isinstance(epochs, (int, np.integer)) or epochs < 0):
        raise ValueError(f"epochs must be a non-negative int or None, got {epochs!r}")
    if shuffle and (seed is None or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"shuffle=True needs seed= a non-negative int, got {seed!r}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    global_batch = batch_size * process_count
    if drop_remainder and global_batch > n:
        raise ValueError(f"global batch batch_size * process_count = {batch_size} * {process_count} = "
                         f"{global_batch} is larger than the source ({n} examples): with "
                         f"drop_remainder=True no batch can be made")
    return _iterate(source, n, int(batch_size), int(process_index), int(process_count),
                    None if seed is None else int(seed), int(start), shuffle, drop_remainder,
                    epochs, num_threads, prefetch, bool(refill_skipped))


def one_pass(source: Source, batch_size: int, *, limit: int | None = None) -> Iterator[Batch]:
    """Every image of `source` once, in index order, in batches of `batch_size` (the last one
    smaller), up to `limit` images: the pass an evaluation makes. With `skip_unreadable`, the
    unreadable images are left out (and named in `source.skipped`), never replaced."""
    seen = 0
    for batch in batches(source, batch_size, shuffle=False, drop_remainder=False, epochs=1, refill_skipped=False):
        if limit is not None and seen >= limit:
            return
        if not len(batch.ids):
            continue
        if limit is not None and seen + len(batch.ids) > limit:
            keep = limit - seen
            batch = batch._replace(images=batch.images[:keep], ids=batch.ids[:keep],
                                   labels=None if batch.labels is None else batch.labels[:keep],
                                   masks=None if batch.masks is None else batch.masks[:keep])
        seen += len(batch.ids)
        yield batch


def _plan(n: int, global_batch: int, start: int, drop_remainder: bool, epochs: int | None):
    """Yields (epoch, offset in epoch, examples taken, position after) for each global batch."""
    position = start
    while epochs is None or position < epochs * n:
        epoch, offset = divmod(position, n)
        take = min(global_batch, n - offset)
        if take < global_batch and drop_remainder:
            position = (epoch + 1) * n
            continue
        after = position + take
        if n - (offset + take) < (global_batch if drop_remainder else 1):
            after = (epoch + 1) * n  # the epoch is over: position = epochs completed * n
        yield epoch, offset, take, after
        position = after


def _process_rows(take: int, global_batch: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) rows of a global batch of `take` examples that belong to process `index`."""
    if take == global_batch:
        return index * batch_size, (index + 1) * batch_size
    sizes = [take // count + (1 if j < take % count else 0) for j in range(count)]
    lo = sum(sizes[:index])
    return lo, lo + sizes[index]


def _fetch(source: Source, order: np.ndarray, slot: int, refill: bool) -> tuple[int, Example | None]:
    """The example in `slot` of an epoch's order. An unreadable one, if the source skips them,
    is replaced by the next readable example (`refill`) or by None."""
    n = len(order)
    for t in range(n if refill else 1):
        index = int(order[(slot + t) % n])
        if index in source.skipped:
            continue
        try:
            return index, source[index]
        except UnreadableImageError as e:
            if not source.skip_unreadable:
                raise
            source._record_skip(index, e)  # pylint: disable=protected-access
    if not refill:
        return int(order[slot]), None
    raise UnreadableImageError(f"no readable image in {source!r}: all {n} were skipped")


def _assemble(source: Source, loaded: list[tuple[int, Example | None]], position: int) -> Batch:
    loaded = [(i, ex) for i, ex in loaded if ex is not None]
    if not loaded:  # this process's share of a small last batch
        h, w = getattr(source, "image_size", None) or (0, 0)
        return Batch(np.zeros((0, h, w, 3), np.uint8), np.zeros((0,), np.int64),
                     np.zeros((0,), np.int64) if source.has_labels else None,
                     np.zeros((0, h, w), np.uint8) if source.has_masks else None, position)
    ids = np.asarray([i for i, _ in loaded], np.int64)
    shapes = {ex.image.shape for _, ex in loaded}
    if len(shapes) > 1:
        (i0, e0), (i1, e1) = loaded[0], next((i, e) for i, e in loaded if e.image.shape != loaded[0][1].image.shape)
        raise ValueError(f"images of different sizes cannot be batched: {source.describe(i0)} is "
                         f"{e0.image.shape}, {source.describe(i1)} is {e1.image.shape}; give the source "
                         f"image_size=(H, W) to resize them")
    images = np.stack([ex.image for _, ex in loaded])
    labels = None
    if source.has_labels:
        labels = np.asarray([ex.label for _, ex in loaded])
        labels = labels.astype(np.int64) if labels.dtype.kind in "iub" else labels
    masks = np.stack([ex.mask for _, ex in loaded]) if source.has_masks else None
    return Batch(images, ids, labels, masks, position)


class _ProcessSlots:
    """This process's examples in reading order, as a random-access sequence of `(epoch, slot)`
    (slot: the index into the epoch's order), so that grain can read them with threads.

    Every epoch after the first one has the same layout, so two arrays describe the whole
    stream: the slots left in the starting epoch, and the slots of any full epoch.
    """

    def __init__(self, first_epoch: int, first: np.ndarray, full: np.ndarray, epochs: int | None):
        self.first_epoch, self.first, self.full = first_epoch, first, full
        full_epochs = (2**40 if epochs is None else max(0, epochs - first_epoch - 1)) if len(full) else 0
        self.length = len(first) + full_epochs * len(full)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[int, int]:
        if k < len(self.first):
            return self.first_epoch, int(self.first[k])
        epochs, k = divmod(k - len(self.first), len(self.full))
        return self.first_epoch + 1 + epochs, int(self.full[k])


def _iterate(source, n, batch_size, process_index, process_count, seed, start, shuffle,
             drop_remainder, epochs, num_threads, prefetch, refill_skipped) -> Iterator[Batch]:
    global_batch = batch_size * process_count

    @functools.lru_cache(maxsize=4)
    def order_of(epoch: int) -> np.ndarray:
        return permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n, dtype=np.int64)

    def plan(position):  # (epoch, this process's [lo, hi) slots, position after) per global batch
        for epoch, offset, take, after in _plan(n, global_batch, position, drop_remainder, epochs):
            lo, hi = _process_rows(take, global_batch, batch_size, process_index, process_count)
            yield epoch, offset + lo, offset + hi, after

    if isinstance(source, ArraySource):  # in memory: vectorised, nothing to decode
        for epoch, lo, hi, after in plan(start):
            ids = order_of(epoch)[lo:hi].copy()
            images, labels, masks = source._take(ids)  # pylint: disable=protected-access
            yield Batch(images, ids, labels, masks, after)
        return

    def slots_of_epoch(epoch, position):
        batches = itertools.takewhile(lambda b: b[0] == epoch, plan(position))
        return np.asarray([slot for _, lo, hi, _ in batches for slot in range(lo, hi)], np.int64)

    first_epoch = start // n
    slots = _ProcessSlots(first_epoch, slots_of_epoch(first_epoch, start),
                          slots_of_epoch(first_epoch + 1, (first_epoch + 1) * n), epochs)
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_threads = max(1, num_threads)
    # grain reads ahead with `num_threads` threads, in order; the batches are cut here by the plan.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, prefetch * batch_size, 1))
    examples = iter(grain.MapDataset.source(slots)
                    .map(lambda slot: _fetch(source, order_of(slot[0]), slot[1], refill_skipped))
                    .to_iter_dataset(read))
    for _, lo, hi, after in plan(start):
        yield _assemble(source, [next(examples) for _ in range(hi - lo)], after)


# --------------------------------------------------------------------------------------------
# Images


def _pil():
    try:
        import PIL.Image  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
    return PIL


def _check_index(index, n: int) -> int:
    index = int(index)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for a source of {n} examples")
    return index % n


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _find_images(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f) and not f.startswith(".")]
    return found


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as uint8 RGB [H, W, 3], by one policy for every pixel format.

    - Orientation: the EXIF orientation tag is applied (as `transformers.image_utils.load_image`
      does and as viewers show the photo; torchvision's `ImageFolder` ignores it).
    - RGB, L, 1-bit, P, CMYK, YCbCr: PIL's `convert("RGB")`, what the HF image processors
      (`convert_rgb`) and torchvision's loader do. Adobe CMYK JPEGs are decoded inverted by PIL as
      they should be; no ICC profile is applied.
    - LA, RGBA, PA, P with transparency: the alpha channel is dropped, not composited, as HF and
      torchvision do (the reference's activations come from such pixels).
    - 16 bits a channel: the high byte. PIL reads 16-bit RGB PNGs so; 16-bit grey (`I;16`, `I`)
      is scaled the same way here, where HF and torchvision clip it at 255 and turn most such
      images white.
    - Animated GIF / WebP / multi-page TIFF: the first frame.
    - Unreadable: a zero-byte, truncated or corrupt file, 32-bit float pixels (mode F), or a
      decompression bomb (PIL's limit) raises `UnreadableImageError` naming the file;
      `skip_unreadable=True` sources skip it and count it.

    Raises:
        UnreadableImageError: see above.
    """
    return _read_oriented(os.fspath(path))[0]


def _read_oriented(path: str) -> tuple[np.ndarray, int | None, tuple[int, int]]:
    """`(uint8 RGB [H, W, 3] upright, the EXIF transpose applied or None, the stored (H, W))`,
    or `UnreadableImageError` naming the file."""
    pil = _pil()
    try:
        with pil.Image.open(path) as image:
            image.load()
            transpose = _EXIF_TRANSPOSE.get(image.getexif().get(0x0112, 1))  # 0x0112: "Orientation"
            stored_shape = (image.height, image.width)
            image = _pil_rgb(image)
            return np.asarray(image if transpose is None else image.transpose(transpose)), transpose, stored_shape
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


# EXIF orientation -> the PIL transpose that shows the photo upright (as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def _read_mask(path: str) -> np.ndarray:
    """An integer [H, W] label image (palette PNGs give their indices; a grey mask saved as RGB,
    all three channels equal, gives one of them), or `UnreadableImageError`."""
    pil = _pil()
    try:
        with pil.Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                return np.asarray(image).astype(np.int64)
            if image.mode in ("L", "P", "1"):
                return np.asarray(image.convert("L") if image.mode == "1" else image)
            if image.mode == "LA":
                return np.asarray(image)[..., 0]
            if image.mode in ("RGB", "RGBA"):
                rgb = np.asarray(image)[..., :3]
                if (rgb == rgb[..., :1]).all():
                    return rgb[..., 0].copy()
            raise ValueError(f"mode {image.mode}: a mask must be a single-channel (L, P, I) image")
    except Exception as e:  # noqa: BLE001
        raise UnreadableImageError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e


def _pil_rgb(image):
    """`image` in RGB by the pixel-format policy of `read_image`."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: scale, do not clip
        wide = np.asarray(image, np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise ValueError(f"mode {image.mode} with values in [{wide.min()}, {wide.max()}]: not a 16-bit image")
        grey = (wide >> 8).astype(np.uint8)  # the high byte, as PIL reads 16-bit RGB PNGs
        return _pil().Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("mode F (32-bit float pixels) has no agreed mapping to 8-bit RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what convert("RGB") does too, without PIL's warning
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LA, RGBA, ...: PIL's conversion, alpha dropped


def _rgb(images: np.ndarray, what: str = "images") -> np.ndarray:
    """uint8 [..., H, W, 3] from [..., H, W, C] with C = 1 (grayscale), 3 (RGB) or 4 (RGBA)."""
    if images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {images.dtype}")
    if images.ndim < 3 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected [H, W, C] with C in (1, 3, 4), got shape {images.shape}")
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images[..., :3]


# --------------------------------------------------------------------------------------------
# Geometry: every image of a source to one size


RESAMPLING = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# Past this ratio of resized to output area (an aspect ratio beyond ~16:1), the plan resizes
# only the region it keeps, so a 1 x 600 image at 518 px never allocates a 518 x 310,800 one.
_MAX_RESIZED_AREA_RATIO = 16


class Resizing(NamedTuple):
    """How a source brings each image to one size, the way the HF image processors do.

    Attributes:
        size: (height, width) of every output image.
        mode: "crop": resize so the image covers `size` (the short side to `short_side`, or
            just enough), keeping its aspect ratio, then cut out the centre; "stretch": resize
            to `size`, aspect ratio not kept.
        short_side: with "crop": the short side's length after resizing (the "resize 256, crop
            224" of DINOv2); at least `max(size)`. None: just cover `size`.
        resample: the PIL filter, a key of `RESAMPLING` ("bicubic", "bilinear", ...).
    """

    size: tuple[int, int]
    mode: str = "crop"
    short_side: int | None = None
    resample: str = "bicubic"

    @classmethod
    def of(cls, image_size, mode: str = "crop", short_side: int | None = None,
           resample: str = "bicubic") -> Resizing | None:
        """Checked `Resizing`, or None when `image_size` is None (images keep their size)."""
        if mode not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {mode!r}")
        if resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {tuple(RESAMPLING)}, got {resample!r}")
        if image_size is None:
            if short_side is not None:
                raise ValueError("short_side needs image_size")
            return None
        if isinstance(image_size, (int, np.integer)):
            image_size = (image_size, image_size)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be None, a positive int or (height, width), got {image_size}")
        if short_side is not None:
            if mode != "crop":
                raise ValueError(f"short_side goes with resize='crop', not {mode!r}")
            if int(short_side) < max(image_size):
                raise ValueError(f"short_side={short_side} is shorter than image_size={image_size}: the crop "
                                 f"would not fit in the resized image")
            short_side = int(short_side)
        return cls(image_size, mode, short_side, resample)

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """`((resized_width, resized_height), (left, top))`: resize the whole width x height image
        to the first, then crop `size` at the second, which always lies inside it.

        Integer arithmetic throughout, and the HF processors' rules: the short side becomes
        `short_side` and the long one `int(short_side * long / short)`; the crop starts at
        `(resized - size) // 2`.
        """
        if width < 1 or height < 1:
            raise ValueError(f"an image of {width} x {height} px has no pixels")
        out_h, out_w = self.size
        if self.mode == "stretch":
            return (out_w, out_h), (0, 0)
        if self.short_side is not None:
            s = self.short_side
            new_w, new_h = (s, s * height // width) if width <= height else (s * width // height, s)
        elif out_w * height >= out_h * width:  # width is the binding side
            new_w, new_h = out_w, max(out_h, out_w * height // width)
        else:
            new_w, new_h = max(out_w, out_h * width // height), out_h
        return (new_w, new_h), ((new_w - out_w) // 2, (new_h - out_h) // 2)

    def apply(self, image: np.ndarray, *, mask: bool = False) -> np.ndarray:
        """`image` ([H, W] or [H, W, 3] uint8, or an integer [H, W] mask with `mask=True`,
        resampled nearest-neighbour) at `size`, by `plan`."""
        height, width = image.shape[:2]
        (new_w, new_h), (left, top) = self.plan(width, height)
        out_h, out_w = self.size
        if (new_w, new_h) == (width, height):
            return image[top:top + out_h, left:left + out_w]
        pil = _pil().Image
        resample = pil.NEAREST if mask else RESAMPLING[self.resample]
        wide = image.ndim == 2 and image.dtype != np.uint8  # labels > 255: resize as int32
        picture = pil.fromarray(image.astype(np.int32), "I") if wide else pil.fromarray(image)
        if new_w * new_h <= _MAX_RESIZED_AREA_RATIO * out_w * out_h:
            # Resize all, then crop: what the HF processors do, pixel for pixel.
            picture = picture.resize((new_w, new_h), resample)
            picture = picture.crop((left, top, left + out_w, top + out_h))
        else:  # the same region and filter scale, without the huge intermediate image
            # Products before divisions: the box is exact, hence inside [0, width] x [0, height].
            box = (left * width / new_w, top * height / new_h,
                   (left + out_w) * width / new_w, (top + out_h) * height / new_h)
            picture = picture.resize((out_w, out_h), resample, box=box)
        out = np.asarray(picture)
        return out.astype(image.dtype) if wide else out


def match_mask(mask: np.ndarray, image_shape: tuple[int, int], what: str) -> np.ndarray:
    """`mask` at the image's `(height, width)`: as it is, or resized (nearest) when it is the
    same picture at another resolution (aspect ratios within 2%, as a few CUB masks are).

    Raises:
        UnreadableImageError: a mask of another shape, naming `what` and both shapes.
    """
    if mask.shape == tuple(image_shape):
        return mask
    (mh, mw), (ih, iw) = mask.shape, image_shape
    if mh and mw and abs((mh / mw) / (ih / iw) - 1) <= 0.02:
        return Resizing.of((ih, iw), "stretch").apply(mask, mask=True)
    raise UnreadableImageError(f"{what}: the mask is {mh} x {mw} (h x w), its image {ih} x {iw}: not the "
                               f"same picture")
