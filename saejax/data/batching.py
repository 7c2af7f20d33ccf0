"""Batches of a source: a seeded, resumable iterator split across processes, and the one pass an
evaluation makes.

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

import concurrent.futures
import functools
import itertools
import os
from typing import Iterator, NamedTuple

import grain
import numpy as np

from saejax.data.images import UnreadableImageError
from saejax.data.sources import ArraySource, Example, Source

__all__ = ["Batch", "batches", "one_pass", "permutation"]


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
    streaming = getattr(source, "streaming", False)  # (a stream has no length; see HfDatasetSource)
    n = None if streaming else len(source)
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
    if streaming:
        return _stream_batches(source, int(batch_size), seed=None if seed is None else int(seed), start=int(start),
                              shuffle=shuffle, drop_remainder=drop_remainder, process_index=int(process_index),
                              process_count=int(process_count), epochs=epochs, refill_skipped=bool(refill_skipped))
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


def _stream_batches(source, batch_size: int, *, seed, start, shuffle, drop_remainder, process_index, process_count,
                    epochs, refill_skipped) -> Iterator[Batch]:
    """`batches` of a streaming source (`HfDatasetSource(streaming=True)`: it has no length, and
    gives `stream(seed=, start=, shuffle=, epochs=)`, `(id, row, position after)` with
    `(None, None, next epoch's start)` at each epoch's end, and `example(row, id)`): the same
    `Batch`es and the same split of each global batch across processes as for a map-style source.
    Each process decodes its own rows, in threads."""
    global_batch = batch_size * process_count
    threads = getattr(source, "decode_threads", None) or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="saejax-stream-decode")
    try:
        pending, made = [], False
        for example_id, row, after in source.stream(seed=seed, start=start, shuffle=shuffle, epochs=epochs):
            if example_id is not None:
                pending.append((example_id, row))
                if len(pending) < global_batch:
                    continue
            elif not pending or drop_remainder:  # an epoch ended: its incomplete last batch
                if not made and drop_remainder:
                    raise ValueError(f"an epoch of {source!r} holds {len(pending)} examples, fewer than one global "
                                     f"batch (batch_size * process_count = {global_batch}): with drop_remainder=True "
                                     "no batch can be made")
                pending, made = [], False
                continue
            made = example_id is not None
            lo, hi = _process_rows(len(pending), global_batch, batch_size, process_index, process_count)
            rows = pending
            loaded = list(pool.map(lambda slot: _fetch_row(source, rows, slot, refill_skipped), range(lo, hi)))
            yield _assemble(source, loaded, after)
            pending = []
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _fetch_row(source, rows, slot: int, refill: bool) -> tuple[int, Example | None]:
    """Row `slot` of a streamed global batch as `(id, Example)`; an unreadable one, if the source
    skips them, is replaced by the next readable row of the batch (wrapping around; `refill`) or
    by None."""
    for t in range(len(rows) if refill else 1):
        example_id, row = rows[(slot + t) % len(rows)]
        if example_id in source.skipped:
            continue
        try:
            return example_id, source.example(row, example_id)
        except UnreadableImageError as e:
            if not source.skip_unreadable:
                raise
            source._record_skip(example_id, e)  # pylint: disable=protected-access
    if not refill:
        return rows[slot][0], None
    raise UnreadableImageError(f"no readable image in a batch of {source!r}: all {len(rows)} were skipped")


def process_share(source, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
    """This process's batches of one pass over the first `limit` examples of `source`, each
    read once (`one_pass` on a single process). On several processes, process i gets rows
    `[i * batch_size, (i + 1) * batch_size)` of every global batch, so the processes read
    disjoint shares that together are the pass; the last batches may be short or empty, and
    every process yields the same number of them (the last global batch may read a few images
    past `limit`, which it leaves out). For evaluations that reduce over images
    (the browser's statistics, semprobe's sums) and merge across processes afterwards."""
    import jax  # noqa: PLC0415

    count = jax.process_count()
    if count == 1:
        yield from one_pass(source, batch_size, limit=limit)
        return
    streaming = getattr(source, "streaming", False)
    n = limit if streaming else len(source) if limit is None else min(limit, len(source))
    if n is None:
        raise ValueError(f"{source!r} is a stream: a pass over it on several processes needs a limit")
    for k, batch in enumerate(batches(source, batch_size, shuffle=False, epochs=1, drop_remainder=False,
                                      process_index=jax.process_index(), process_count=count, refill_skipped=False)):
        if streaming:  # a stream's ids are not row numbers: count the global rows (full batches until its end)
            first_row = (k * count + jax.process_index()) * batch_size
            keep = first_row + np.arange(len(batch.ids)) < n
            done = (k + 1) * count * batch_size >= n
        else:
            keep, done = batch.ids < n, batch.position >= n
        if not keep.all():
            batch = batch._replace(images=batch.images[keep], ids=batch.ids[keep],
                                   labels=None if batch.labels is None else batch.labels[keep],
                                   masks=None if batch.masks is None else batch.masks[keep])
        yield batch
        if done:
            return


def gather_over_processes(ids: np.ndarray, *rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """`(ids, *rows)` of every process's examples (this process's alone on one), in id order:
    the per-example results of a `process_share` pass, put together. Each process may hold a
    different number of rows; ids must be non-negative."""
    import jax  # noqa: PLC0415

    ids = np.asarray(ids, np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        longest = max(1, int(np.max(multihost_utils.process_allgather(np.asarray(len(ids))))))
        padded = [np.full(longest, -1, np.int64)] + [np.zeros((longest, *r.shape[1:]), r.dtype) for r in rows]
        for target, local in zip(padded, (ids, *rows)):
            target[:len(ids)] = local
        every = [np.asarray(a).reshape(-1, *a.shape[2:]) for a in multihost_utils.process_allgather(tuple(padded))]
        keep = every[0] >= 0
        ids, rows = every[0][keep], tuple(a[keep] for a in every[1:])
    order = np.argsort(ids, kind="stable")
    return (ids[order], *(np.asarray(r)[order] for r in rows))
