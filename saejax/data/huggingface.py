"""Hugging Face `datasets` as an image source: `HfDatasetSource`.

>>> source = HfDatasetSource("ILSVRC/imagenet-1k", split="train", image_size=224)   # as saev reads it
>>> source = HfDatasetSource("/data/flowers_saved", split="validation")            # Dataset.save_to_disk
>>> source = HfDatasetSource("/data/shards/*.parquet", label_column=None)          # parquet files
>>> batch = next(saejax.data.batches(source, 64, seed=0))

Image ids are the dataset's own row indices (`source[i]` is `dataset[i]`), which is how saev
names ImageNet images: its pretrained SAEs, exemplars and browsers line up with saejax's.
Images are decoded by the one `read_image` policy (the column is read undecoded, as bytes or
paths, so `datasets` never decodes them its own way) and resized by `Resizing`.

Streaming (`streaming=True`, for data sets too large to download) reads the data set's shards
(its files) one after the other. The stream is epochs of shards; the shuffle of epoch `e` is
the shard order `permutation(n_shards, seed=seed, epoch=e)` (`saejax.data.permutation`), and
the examples of a shard keep their order, so mixing beyond a shard comes from the activation
stream's shuffle buffer (`buffer_tokens`), or from the map-style mode's full shuffle. A
position is `(epoch * n_shards + slot) * STRIDE + offset`: the slot in the epoch's shard order
and the examples read from that shard, so a resumed stream opens that shard and skips `offset`
examples of it, never the shards before. A streamed example's id is `shard * STRIDE + offset`.
Every process reads the whole stream and decodes its own rows of each global batch (the same
rows as `batches` gives a map-style source).
"""

from __future__ import annotations

import glob
import io
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from saejax.data.batching import permutation
from saejax.data.images import Resizing, UnreadableImageError, _pil, _pil_rgb, _read_oriented, _rgb
from saejax.data.sources import Example, Source

__all__ = ["STRIDE", "HfDatasetSource"]

# Streaming positions and ids: room for 2**40 examples per shard.
STRIDE = 2 ** 40
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


def _datasets():
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise ImportError("HfDatasetSource reads Hugging Face data sets with the `datasets` package, which is not "
                          "installed: pip install 'saejax[hf]'") from None
    return datasets


class HfDatasetSource(Source):
    """A split of a Hugging Face data set: a hub name, a `Dataset.save_to_disk` folder, or parquet files.

    Args:
        path: a hub name (`"ILSVRC/imagenet-1k"`) or a local data set folder (`load_dataset`),
            a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, parquet
            files (a file, a glob pattern or a list), or a `datasets.Dataset` /
            `IterableDataset` already made.
        split: the split (map-style hub and folder data sets also take slices, `"train[:10%]"`).
        image_column: the column of images (an `Image` feature, encoded bytes or file paths).
        label_column: the column of labels (a `ClassLabel` gives `classes`), or None.
        name: the data set's configuration name, if it has several.
        streaming: read the data set as a stream of shards (see the module docstring).
        image_size, resize, short_side, resample: as in `ImageFolderSource`.
        skip_unreadable: as in `ImageFolderSource`: `batches` skips an image that cannot be
            decoded and counts it in `skipped`, instead of stopping.
        cache_dir, revision: passed to `datasets.load_dataset`.
        decode_threads: threads decoding a streamed batch (default: the CPUs this process may use).

    Attributes:
        dataset: the `datasets.Dataset` (or `IterableDataset` when streaming).
        classes: the label column's class names when it is a `ClassLabel`, else None.
        n_shards: shards of the stream (streaming only).

    Raises:
        ImportError: `datasets` is not installed (the message names the extra).
        ValueError: a split the data set does not have (the message names the ones it has).
        KeyError: a column the data set does not have (the message names the ones it has).
        OSError: a hub data set that could not be fetched (no network, unknown name).
    """

    def __init__(self, path, split: str = "train", *, image_column: str = "image", label_column: str | None = "label",
                 name: str | None = None, streaming: bool = False, image_size: int | tuple[int, int] | None = None,
                 resize: str = "crop", short_side: int | None = None, resample: str = "bicubic",
                 skip_unreadable: bool = False, cache_dir: str | os.PathLike | None = None,
                 revision: str | None = None, decode_threads: int | None = None):
        super().__init__()
        datasets = _datasets()
        self.resizing = Resizing.of(image_size, resize, short_side, resample)
        self.skip_unreadable = bool(skip_unreadable)
        self.split, self.streaming, self.decode_threads = split, bool(streaming), decode_threads
        self.path = _name(path)
        dataset = _open(datasets, path, split, name, self.streaming, cache_dir, revision)
        columns = _columns(dataset)
        for role, column in (("image_column", image_column), ("label_column", label_column)):
            if column is not None and column not in columns:
                hint = " (pass label_column=None for a data set without labels)" if role == "label_column" else ""
                raise KeyError(f"{role}={column!r} is not a column of {self.path!r} split {split!r}; columns: "
                               f"{sorted(columns)}{hint}")
        features = dataset.features or {}
        if isinstance(features.get(image_column), datasets.Image):  # bytes and paths, decoded by read_image
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        dataset = dataset.select_columns([c for c in (image_column, label_column) if c is not None])
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.has_labels = label_column is not None
        names = getattr(features.get(label_column), "names", None) if label_column is not None else None
        self.classes = tuple(names) if names else None
        if self.streaming:
            self.n_shards = int(getattr(dataset, "num_shards", None) or dataset.n_shards)

    # ------------------------------------------------------------------ map-style
    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"a streaming source has no length: {self!r} is read as a stream by saejax.data.batches")
        return len(self.dataset)

    @property
    def labels(self) -> np.ndarray | None:
        """Every example's label, int64 [N] (read once), or None without a label column."""
        if self.label_column is None:
            return None
        if getattr(self, "_labels", None) is None:
            if self.streaming:
                raise TypeError(f"a streaming source has no label array: {self!r}")
            self._labels = np.asarray(self.dataset[self.label_column], np.int64)
        return self._labels

    def describe(self, index: int) -> str:
        if self.streaming:
            return f"{self.path}/{self.split} shard {index // STRIDE} [{index % STRIDE}]"
        return f"{self.path}/{self.split}[{index}]"

    def _load(self, index: int) -> Example:
        return self.example(self.dataset[index], index)

    def example(self, row, index: int) -> Example:
        """The `Example` of a data set row (a dict of its columns) whose id is `index`."""
        image = decode_image(row[self.image_column], self.describe(index))
        if self.resizing is not None:
            image = self.resizing.apply(image)
        label = None if self.label_column is None else row[self.label_column]
        return Example(image, None if label is None else int(label), None)

    def __repr__(self) -> str:
        size = "streaming" if self.streaming else f"n={len(self)}"
        return f"HfDatasetSource({self.path!r}, split={self.split!r}, {size}, labels={self.has_labels})"

    # ------------------------------------------------------------------ streaming
    def shard(self, k: int):
        """Shard `k` of the stream, as an `IterableDataset`."""
        from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

        return split_dataset_by_node(self.dataset, rank=k, world_size=self.n_shards)

    def stream(self, *, seed: int | None, start: int = 0, shuffle: bool = True,
               epochs: int | None = None) -> Iterator[tuple[int, Any, int]]:
        """`(id, row, position after it)` of every example from position `start` on; after the
        last example of each epoch, `(None, None, the next epoch's start)`."""
        n = self.n_shards
        position, offset = divmod(start, STRIDE)
        epoch, slot = divmod(position, n)
        while epochs is None or epoch < epochs:
            order = permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
            for s in range(slot, n):
                k = int(order[s])
                rows = itertools.islice(iter(self.shard(k)), offset, None)
                for j, row in enumerate(rows, start=offset):
                    yield k * STRIDE + j, row, (epoch * n + s) * STRIDE + j + 1
                offset = 0
            epoch, slot = epoch + 1, 0
            yield None, None, epoch * n * STRIDE


def decode_image(value, what: str) -> np.ndarray:
    """An image cell of a data set as uint8 RGB [H, W, 3], by `read_image`'s policy: an undecoded
    `Image` cell (`{"bytes", "path"}`), encoded bytes, a file path, a PIL image or an array."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise UnreadableImageError(f"cannot read image {what}: the cell holds neither bytes nor a path")
        value = data if data is not None else path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _read_oriented(io.BytesIO(value), what)[0]
    if isinstance(value, (str, os.PathLike)):
        return _read_oriented(os.fspath(value), f"{what} ({os.fspath(value)})")[0]
    if isinstance(value, _pil().Image.Image):
        return np.asarray(_pil_rgb(value))
    if isinstance(value, (np.ndarray, list)):
        array = np.asarray(value)
        return _rgb(array[..., None] if array.ndim == 2 else array, what=what)
    raise UnreadableImageError(f"cannot read image {what}: a {type(value).__name__} is not an image")


# ---------------------------------------------------------------------- opening
def _name(path) -> str:
    """What `describe` calls the data set: its path or hub name, the parquet files' folder, or
    the name of a `Dataset` object's data set."""
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    if isinstance(path, (list, tuple)) and path:
        return os.path.commonpath([os.path.abspath(os.fspath(p)) for p in path])
    info = getattr(path, "info", None)
    return getattr(info, "dataset_name", None) or type(path).__name__


def _open(datasets, path, split, name, streaming, cache_dir, revision):
    if isinstance(path, (datasets.Dataset, datasets.IterableDataset)):
        return path
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    local = isinstance(path, str) and os.path.isdir(os.path.expanduser(path))
    if local and any(os.path.isfile(os.path.join(os.path.expanduser(path), m)) for m in _SAVED_MARKERS):
        saved = datasets.load_from_disk(os.path.expanduser(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"{path!r} has no split {split!r}; splits: {sorted(saved)}")
            saved = saved[split]
        return saved.to_iterable_dataset(num_shards=max(1, len(saved.cache_files))) if streaming else saved
    files = _parquet_files(path)
    try:
        if files is not None:
            return datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming,
                                         cache_dir=cache_dir)
        return datasets.load_dataset(path, name, split=split, streaming=streaming, cache_dir=cache_dir,
                                     revision=revision)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ValueError(f"{path!r} has no split {split!r}: {e}") from e
        raise
    except Exception as e:  # noqa: BLE001  (no network, an unknown name: many types)
        raise OSError(f"could not open the Hugging Face data set {path!r} ({type(e).__name__}: {str(e)[:300]}). "
                      "Without network access, pass a folder written by Dataset.save_to_disk, a local data set "
                      "folder or parquet files instead.") from e


def _parquet_files(path) -> list[str] | None:
    """The parquet files `path` names (a file, a glob pattern, a list), or None if it names none."""
    if isinstance(path, (list, tuple)):
        files = [os.fspath(p) for p in path]
    elif isinstance(path, str) and path.endswith(".parquet"):
        files = sorted(glob.glob(os.path.expanduser(path))) if glob.has_magic(path) else [os.path.expanduser(path)]
        if not files:
            raise FileNotFoundError(f"no parquet files match {path!r}")
    else:
        return None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"parquet files not found: {missing[:5]}")
    return files


def _columns(dataset) -> Sequence[str]:
    columns = dataset.column_names
    if columns is None:  # a stream whose features are unknown until read
        columns = list(next(iter(dataset)))
    return columns
