"""saev's sharded activation files (protocol 2.1): write a harvest once, train many SAEs on it.

The layout::

    <root>/<HASH>/metadata.json    the data-generating config (HASH: the first 8 hex digits of the
                                   sha256 of its compact, key-sorted JSON, as saev names them)
    <root>/<HASH>/shards.json      [{"name": "acts000000.bin", "n_examples": S}, ...]
    <root>/<HASH>/acts%06d.bin     raw float32, C order, [examples, layers, tokens, d_model]
    <root>/<HASH>/labels.bin       uint8 [n_examples, patches_per_ex] patch labels (optional)
    <root>/<HASH>/checksums.json   {"algorithm": "crc32", "metadata": HASH, "shards": shards.json's
                                   list, "examples": {shard name: [crc32 of each example's bytes]},
                                   "written_by": the versions (saejax.provenance)}
                                   (saejax's addition; saev ignores it)

`ShardStream` checks metadata.json and shards.json against checksums.json when it opens the
folder, each example against its checksum the first time it reads from it, and
every row it reads for NaN or infinity (the only check saev's own folders get), so a corrupted
shard is an error naming the file, the example and its byte offset, not a silent NaN in
training.

Tokens are the CLS token (first, when `cls_token`) then the patches; patch labels are the mode
of each patch's pixels (`data.patch_mode_labels`). `metadata.json` uses the field names saev's
code writes (`content_tokens_per_example`, `max_tokens_per_shard`, `pixel_agg`); the reader also
accepts the protocol document's (`patches_per_ex`, `patches_per_shard`). So a user can train in
saejax on activations saev dumped, and saev reads what saejax writes (saev expects the folder at
`.../saev/shards/<HASH>`).

>>> shards_dir = write_shards("/data/shards", bb, bb_params, source, layers=(10,))
>>> batches = ShardStream(shards_dir, layers=(10,), batch_size=4096, seed=0)
>>> states = saejax.loop.fit(trainer, {10: states}, batches, steps=10_000)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from saejax import data
from saejax import sharding as shd
from saejax.checkpoint.staging import write_atomically
from saejax.core.normalization import Normalization
from saejax.provenance import check_written_by, written_by

__all__ = ["PROTOCOL", "ShardCorruptError", "ShardStream", "read_metadata", "write_shards"]

PROTOCOL = "2.1"


class ShardCorruptError(ValueError):
    """An activation shard whose bytes do not match its checksum or hold NaN / infinity."""


def _example_checksums(acts: np.ndarray) -> list[int]:
    return [zlib.crc32(np.ascontiguousarray(example).data) for example in acts]


def _hash(metadata: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()[:8]


def _patches(metadata: Mapping[str, Any]) -> int:
    return int(metadata.get("content_tokens_per_example", metadata.get("patches_per_ex")))


def write_shards(root: str | os.PathLike, bb, bb_params, source: data.Source, *, layers: Sequence[int],
                 cls_token: bool = True, patches_per_shard: int = 2_400_000, batch_size: int = 64,
                 family: str | None = None, ckpt: str = "", dataset: str = "") -> str:
    """Harvest every image of `source` at `layers` into protocol-2.1 shards under `root`.

    Returns:
        The shards directory `<root>/<HASH>` (reused as is when it is complete already).
    """
    layers = tuple(int(i) for i in layers)
    bb._check_layers(layers, "layers")  # pylint: disable=protected-access
    if cls_token and bb.layout.cls is None:
        raise ValueError(f"cls_token=True, but the {bb.family} backbone has no CLS token (patches only); "
                         "pass cls_token=False")
    patches = bb.layout.n_patches
    tokens = patches + (1 if cls_token else 0)
    metadata = {"family": family or bb.family, "ckpt": ckpt, "layers": list(layers),
                "content_tokens_per_example": patches, "cls_token": bool(cls_token), "d_model": bb.d_model,
                "n_examples": len(source), "max_tokens_per_shard": int(patches_per_shard),
                "data": base64.b64encode(json.dumps({"source": repr(source)}).encode()).decode("utf8"),
                "dataset": dataset, "pixel_agg": "majority", "dtype": "float32", "protocol": PROTOCOL}
    per_shard = patches_per_shard // (tokens * len(layers))
    if per_shard < 1:
        raise ValueError(f"patches_per_shard={patches_per_shard} holds less than one example ({tokens} tokens x "
                         f"{len(layers)} layers)")
    directory = os.path.join(os.fspath(root), _hash(metadata))
    if os.path.isfile(os.path.join(directory, "shards.json")):
        return directory
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, "metadata.json"), json.dumps(metadata, indent=2))
    start, stop = bb.layout.patches
    token_index = np.concatenate([[bb.layout.cls] if cls_token else [], np.arange(start, stop)]).astype(np.int64)

    @jax.jit
    def harvest(pixels):
        out = bb.forward(bb_params, pixels, capture=layers, full=False)
        return jnp.stack([out.captured[i][:, token_index] for i in layers], axis=1)  # [B, L, T, D]

    n = len(source)
    n_shards = math.ceil(n / per_shard)
    shards = [{"name": f"acts{i:06d}.bin", "n_examples": min(per_shard, n - i * per_shard)} for i in range(n_shards)]
    maps = [_allocated(os.path.join(directory, s["name"]), np.float32, (s["n_examples"], len(layers), tokens,
                                                                        bb.d_model)) for s in shards]
    labels = None
    if source.has_masks:
        labels = _allocated(os.path.join(directory, "labels.bin"), np.uint8, (n, patches))
    grid = bb.grid
    for batch in data.batches(source, batch_size, shuffle=False, drop_remainder=False, epochs=1):
        acts = np.asarray(harvest(jnp.asarray(bb.preprocess(batch.images))))
        for row, example in enumerate(batch.ids):
            maps[example // per_shard][example % per_shard] = acts[row]
        if labels is not None:
            size = batch.masks.shape[1] // grid[0]
            labels[batch.ids] = data.patch_mode_labels(batch.masks, size, ignore=None).reshape(len(batch.ids), -1)
    for m in maps + ([labels] if labels is not None else []):
        m.flush()
    checksums = {"algorithm": "crc32", "metadata": _hash(metadata), "shards": shards,
                 "examples": {s["name"]: _example_checksums(m) for s, m in zip(shards, maps)},
                 "written_by": written_by()}
    write_atomically(os.path.join(directory, "checksums.json"), json.dumps(checksums))
    # Written last: its presence means complete.
    write_atomically(os.path.join(directory, "shards.json"), json.dumps(shards, indent=2))
    return directory


def _allocated(path: str, dtype, shape) -> np.memmap:
    """A file's blocks reserved before it is mapped: a full disk is an OSError here, not a SIGBUS
    when a page of the map is written."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        with open(path, "wb") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
            else:  # macOS: a sparse file (a full disk then shows when the map is flushed)
                f.truncate(size)
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot reserve {size:,} bytes ({e.strerror}); the shards folder stays "
                               f"incomplete (no shards.json) and the next write_shards starts it again") from e
    return np.memmap(path, dtype, "r+", shape=shape)


def read_metadata(directory: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`(metadata, shards)` of a shards directory, checked against the protocol.

    Raises:
        FileNotFoundError: a missing `metadata.json`, `shards.json` or shard file (named).
        ValueError: another protocol or dtype, unreadable JSON, or shard files of the wrong size
            (named; `ShardCorruptError` for files that cannot be what saejax or saev wrote).
    """
    directory = os.fspath(directory)
    for name in ("metadata.json", "shards.json"):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"{os.path.join(directory, name)}: missing (an incomplete or older shards "
                                    f"directory?)")
    try:
        metadata = json.load(open(os.path.join(directory, "metadata.json")))
        shards = json.load(open(os.path.join(directory, "shards.json")))
        if str(metadata.get("protocol")) != PROTOCOL or metadata.get("dtype", "float32") != "float32":
            raise ValueError(f"{directory}: protocol {metadata.get('protocol')!r} dtype {metadata.get('dtype')!r}; "
                             f"this reader knows protocol {PROTOCOL} float32")
        tokens = _patches(metadata) + (1 if metadata["cls_token"] else 0)
        row_bytes = len(metadata["layers"]) * tokens * int(metadata["d_model"]) * 4
        listed = [(os.path.join(directory, str(shard["name"])), int(shard["n_examples"])) for shard in shards]
        total = int(metadata["n_examples"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        if str(e).startswith(directory):
            raise
        raise ShardCorruptError(f"{directory}: metadata.json or shards.json is not a protocol-{PROTOCOL} "
                                f"description ({type(e).__name__}: {e})") from e
    for path, n_examples in listed:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: listed in shards.json but missing")
        if n_examples < 1 or row_bytes < 1 or os.path.getsize(path) != n_examples * row_bytes:
            raise ShardCorruptError(f"{path}: {os.path.getsize(path)} bytes, expected {n_examples} examples x "
                                    f"{row_bytes} bytes")
    if sum(n for _, n in listed) != total:
        raise ShardCorruptError(f"{directory}: shards.json holds {sum(n for _, n in listed)} examples, "
                                f"metadata.json says {total}")
    return metadata, shards


def _read_checksums(directory, metadata, shards) -> list[list[int]] | None:
    """Per shard, its examples' checksums (None for a folder without checksums.json, e.g. saev's),
    once metadata.json and shards.json are found to be what was written with them."""
    path = os.path.join(os.fspath(directory), "checksums.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            table = json.load(f)
        if table.get("algorithm") != "crc32":
            raise ValueError(f"algorithm {table.get('algorithm')!r}, expected 'crc32'")
        checksums = [[int(c) for c in table["examples"][s["name"]]] for s in shards]
        written = (table["metadata"], table["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardCorruptError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    check_written_by(table.get("written_by"), path)
    if written != (_hash(metadata), shards):
        raise ShardCorruptError(f"{path}: metadata.json or shards.json differs from what was written with these "
                                f"checksums (damaged or edited since)")
    for s, c in zip(shards, checksums):
        if len(c) != s["n_examples"]:
            raise ShardCorruptError(f"{path}: {len(c)} checksums for {s['name']}, which holds {s['n_examples']} "
                                    f"examples")
    return checksums


class ShardStream:
    """A `saejax.loop.fit` stream of activation rows read from shards: `{layer: [batch_size, D]}`.

    Each epoch visits every (example, token) row of the chosen tokens once, in an order that is a
    pure function of `(seed, epoch)`: row `i` of the epoch is `(a * i + b) mod N` with `a` coprime
    to N, so no permutation of the (possibly billions of) rows is ever held in memory, and
    resuming from `position()` replays the same batches.

    Args:
        directory: a shards directory (`write_shards`, or saev's).
        layers: stored layers to read (one array per layer in each batch).
        batch_size: rows per batch.
        seed: the order seed.
        tokens: "patches" (the default), "cls" or "all".
        normalization: `{layer: Normalization}` applied to each batch, or None.
        mesh: batches are placed split over its `data` axis (default: every device).
        position: a `position()` dict to resume from.
    """

    def __init__(self, directory: str | os.PathLike, *, layers: Sequence[int], batch_size: int, seed: int = 0,
                 tokens: str = "patches", normalization: Mapping[int, Normalization] | None = None,
                 mesh: Mesh | None = None, position: Mapping[str, int] | None = None):
        self.metadata, shards = read_metadata(directory)
        stored = list(self.metadata["layers"])
        missing = [i for i in layers if i not in stored]
        if missing:
            raise ValueError(f"{directory}: layers {missing} are not stored; stored layers: {stored}")
        self.layers, self.layer_index = tuple(layers), [stored.index(i) for i in layers]
        cls = self.metadata["cls_token"]
        n_patches = _patches(self.metadata)
        patches = np.arange(1 if cls else 0, n_patches + (1 if cls else 0))
        if tokens == "patches":
            self.tokens = patches
        elif tokens == "cls" and cls:
            self.tokens = np.asarray([0])
        elif tokens == "all":
            self.tokens = np.arange(n_patches + (1 if cls else 0))
        else:
            raise ValueError(f"tokens must be 'patches', 'cls' (with a stored CLS token) or 'all', got {tokens!r}")
        t = n_patches + (1 if cls else 0)
        self.per_shard = shards[0]["n_examples"]
        self.paths = [os.path.join(os.fspath(directory), s["name"]) for s in shards]
        self.acts = [np.memmap(path, np.float32, "r", shape=(s["n_examples"], len(stored), t, self.metadata["d_model"]))
                     for path, s in zip(self.paths, shards)]
        self.checksums = _read_checksums(directory, self.metadata, shards)
        self.verified = [np.zeros(s["n_examples"], bool) for s in shards]
        self.rows = self.metadata["n_examples"] * len(self.tokens)
        if batch_size > self.rows:
            raise ValueError(f"batch_size={batch_size} is larger than the {self.rows} rows stored")
        self.batch_size, self.seed, self.normalization = int(batch_size), int(seed), normalization
        self.sharding = shd.batch_sharding(shd.make_mesh() if mesh is None else mesh, 2)
        self.step = int((position or {}).get("step", 0))

    def _order(self, epoch: int) -> tuple[int, int]:
        rng = np.random.default_rng([self.seed, epoch])
        while True:
            a = int(rng.integers(1, self.rows)) if self.rows > 1 else 1
            if math.gcd(a, self.rows) == 1:
                return a, int(rng.integers(0, self.rows))

    def rows_of(self, step: int) -> np.ndarray:
        """The global row indices (example * len(tokens) + token) of batch `step`."""
        per_epoch = self.rows // self.batch_size  # the incomplete tail of each epoch is dropped
        epoch, index = divmod(step, per_epoch)
        a, b = self._order(epoch)
        i = np.arange(index * self.batch_size, (index + 1) * self.batch_size, dtype=np.int64)
        return (a * i + b) % self.rows

    def read(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), len(layers), D] float32 rows, read shard by shard.

        Raises:
            ShardCorruptError: an example read for the first time does not match its checksum,
                or a row holds NaN or infinity (naming the file and the byte offset).
        """
        example, token = np.divmod(rows, len(self.tokens))
        shard, in_shard = np.divmod(example, self.per_shard)
        out = np.empty((len(rows), len(self.layers), self.metadata["d_model"]), np.float32)
        for s in np.unique(shard):
            s, pick = int(s), shard == s
            self._verify(s, np.unique(in_shard[pick]))
            # One (example, token) pair per row: [n, stored layers, D], then the chosen layers.
            out[pick] = self.acts[s][in_shard[pick], :, self.tokens[token[pick]]][:, self.layer_index]
            bad = ~np.isfinite(out[pick]).all(axis=2)  # [n, chosen layers]
            if bad.any():
                row, j = np.argwhere(bad)[0]
                i, t, stored = int(in_shard[pick][row]), int(self.tokens[token[pick][row]]), self.layer_index[j]
                _, layers, tokens, d = self.acts[s].shape
                raise ShardCorruptError(f"{self.paths[s]}: example {i} layer {self.layers[j]} token {t} holds NaN "
                                        f"or infinity (its row starts at byte {((i * layers + stored) * tokens + t) * d * 4})")
        return out

    def _verify(self, shard: int, examples: np.ndarray) -> None:
        if self.checksums is None:
            return
        acts, expected = self.acts[shard], self.checksums[shard]
        row_bytes = acts[0].nbytes
        for i in examples[~self.verified[shard][examples]]:
            if zlib.crc32(np.ascontiguousarray(acts[i]).data) != expected[i]:
                raise ShardCorruptError(f"{self.paths[shard]}: example {i} (bytes {i * row_bytes} to "
                                        f"{(i + 1) * row_bytes}) does not match its checksum in checksums.json: "
                                        f"the file changed after it was written")
            self.verified[shard][i] = True

    def __iter__(self):
        return self

    def __next__(self) -> dict[int, jax.Array]:
        rows = self.read(self.rows_of(self.step))
        self.step += 1
        batch = {}
        for j, layer in enumerate(self.layers):
            x = jax.device_put(rows[:, j], self.sharding)
            batch[layer] = x if self.normalization is None else self.normalization[layer].apply(x)
        return batch

    def position(self) -> dict[str, int]:
        return {"step": self.step}
