"""Backbone weights on disk, read without torch: which files a model directory has
(`find_weights`), and the weights under their PyTorch names (`read_state`): safetensors (one
file or an index of shards, merged), `pytorch_model.bin` (one file or shards; read by a
restricted unpickler that builds tensors only), or an old `transformers` Flax msgpack. JSON
configs too. Every reader names the file it could not read (`CheckpointError`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import read_header

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
# In order of preference.
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX, FLAX_MSGPACK)
_INDEXES = {SAFETENSORS_INDEX: SAFETENSORS, PYTORCH_BIN_INDEX: PYTORCH_BIN}


def read_json(file, *, what):
    """The JSON object in `file` (a `what`, for the errors)."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {what} in {os.path.dirname(file)!r}: a model directory needs config.json "
                                f"(from save_pretrained) and weights ({', '.join(WEIGHT_FILES)})")
    try:
        with open(file, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable {what}: {type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: {what} holds a JSON {type(value).__name__}, not an object")
    return value


def find_weights(path: str) -> tuple[str, list[str]]:
    """Returns `(kind, files)`: kind is one of WEIGHT_FILES; files are the paths to read."""
    names = set(os.listdir(path))
    for kind in WEIGHT_FILES:
        if kind not in names:
            continue
        if kind not in _INDEXES:
            return kind, [os.path.join(path, kind)]
        index = read_json(os.path.join(path, kind), what=kind)
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if not shards or missing:
            raise FileNotFoundError(f"{path}/{kind} lists shards that are missing: {missing or '(empty weight_map)'}")
        return kind, [os.path.join(path, s) for s in shards]
    hint = " Sharded Flax msgpack checkpoints are not supported; save as safetensors." \
        if "flax_model.msgpack.index.json" in names else ""
    raise FileNotFoundError(f"no weights in {path!r}: looked for {', '.join(WEIGHT_FILES)} (+ the shards an index "
                            f"lists); found {sorted(names)}.{hint}")


def read_state(kind: str, files) -> dict[str, np.ndarray]:
    """The weights of `files` (as `find_weights` gives them) under their PyTorch names, as
    numpy arrays (float16 / bfloat16 / float64 read as float32); shards merged."""
    from saejax.backbones.convert import flax_to_torch  # noqa: PLC0415

    if kind == FLAX_MSGPACK:
        return flax_to_torch(read_msgpack(files[0]))
    state = read_safetensors(files) if _INDEXES.get(kind, kind) == SAFETENSORS else _read_torch_bins(files)
    if kind in _INDEXES:
        index = read_json(os.path.join(os.path.dirname(files[0]), kind), what=kind)
        lost = sorted(set(index["weight_map"]) - set(state))
        if lost:
            raise ValueError(f"shards are missing weights listed in {kind}: {lost[:10]}")
    return state


def _read_torch_bins(files) -> dict[str, np.ndarray]:
    from saejax.checkpoint.saev import read_torch_state_dict  # noqa: PLC0415

    state = {}
    for file in files:
        for k, v in read_torch_state_dict(file).items():
            if k in state:
                raise ValueError(f"weight {k!r} appears in more than one shard ({file})")
            state[k] = as_float32(v)
    return state


def read_safetensors(files) -> dict[str, np.ndarray]:
    """Reads (and for shards, merges) PyTorch safetensors into float32 numpy arrays, without torch.
    Each file's header is checked against its size first (`read_header`), so a truncated or
    hostile file is refused before any data is read."""
    from safetensors import safe_open  # noqa: PLC0415

    state = {}
    for file in files:
        read_header(file)
        try:
            with safe_open(file, framework="numpy") as f:
                for k in f.keys():
                    if k in state:
                        raise ValueError(f"weight {k!r} appears in more than one shard ({file})")
                    state[k] = as_float32(f.get_tensor(k))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{file}: unreadable safetensors file: {type(e).__name__}: {e}") from e
    return state


def contiguous(x: np.ndarray) -> np.ndarray:
    # (np.ascontiguousarray would turn a 0-d array such as CLIP's logit_scale into shape (1,).)
    return x if x.flags.c_contiguous else np.array(x, order="C")


def as_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype.name in ("float16", "bfloat16", "float64"):
        return x.astype(np.float32)
    return x


def read_msgpack(file) -> dict[tuple, np.ndarray]:
    """A `transformers` Flax msgpack file as flat params (`{("vit", "embeddings", ...): array}`)."""
    from flax import serialization  # noqa: PLC0415

    try:
        with open(file, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on truncated or corrupt bytes
        raise CheckpointError(f"{file}: unreadable Flax msgpack file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{file}: the msgpack holds a {type(tree).__name__}, not a params tree")
    if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    return {k: as_float32(np.asarray(v)) for k, v in flatten_dict(tree).items()}
