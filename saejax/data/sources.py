"""Host-side image sources: random-access sequences of uint8 RGB examples (`len(source)`,
`source[i]`), which makes each a grain `RandomAccessDataSource` too.

- `ArraySource`: in-memory arrays.
- `ImageFolderSource`: a local folder of image files, read with PIL (class subfolders -> labels).
- `FileListSource`: lists of image (and mask) files, the base of `saejax.datasets`' readers.
- `TfdsSource`: a tensorflow-datasets split through its random-access `data_source` (ArrayRecord);
  TensorFlow is not needed.

Files are decoded by `saejax.data.images.read_image` and resized by `Resizing`; batches come
from `saejax.data.batching`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, NamedTuple, Sequence

import numpy as np

from saejax.data.images import (IMAGE_EXTENSIONS, Resizing, UnreadableImageError, _is_image, _pil,
                                _read_mask, _read_oriented, _rgb, find_images, match_mask, read_image)

__all__ = ["ArraySource", "Example", "FileListSource", "ImageFolderSource", "Source", "TfdsSource", "skipped_report"]


def _check_index(index, n: int) -> int:
    index = int(index)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for a source of {n} examples")
    return index % n


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


# --------------------------------------------------------------------------------------------
# Sources


class Source:
    """Base class of image sources: a random-access sequence of examples (`Example`).

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
                found = find_images(os.path.join(self.root, name))
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


def skipped_report(**sources: Source) -> dict[str, dict]:
    """`{name: {"count", "files"}}`: the images each source skipped as unreadable (for a JSON
    output next to the results; `skip_unreadable=True` on the sources)."""
    return {name: {"count": len(s.skipped), "files": [s.describe(i) + ": " + why for i, why in sorted(s.skipped.items())]}
            for name, s in sources.items()}
