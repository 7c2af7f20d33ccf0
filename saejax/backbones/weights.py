"""Backbone weights on disk, read without torch: which files a model directory has
(`find_weights`), PyTorch safetensors (one file or an index of shards, merged), Flax msgpack,
and JSON configs. Every reader names the file it could not read (`CheckpointError`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import read_header

SAFETENSORS, SAFETENSORS_INDEX, FLAX_MSGPACK = "model.safetensors", "model.safetensors.index.json", "flax_model.msgpack"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, FLAX_MSGPACK)


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
    if SAFETENSORS in names:
        return SAFETENSORS, [os.path.join(path, SAFETENSORS)]
    if SAFETENSORS_INDEX in names:
        index = read_json(os.path.join(path, SAFETENSORS_INDEX), what=SAFETENSORS_INDEX)
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if not shards or missing:
            raise FileNotFoundError(f"{path}/{SAFETENSORS_INDEX} lists shards that are missing: "
                                    f"{missing or '(empty weight_map)'}")
        return SAFETENSORS_INDEX, [os.path.join(path, s) for s in shards]
    if FLAX_MSGPACK in names:
        return FLAX_MSGPACK, [os.path.join(path, FLAX_MSGPACK)]
    hint = ""
    if names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
        hint = (" Found pytorch_model.bin: torch-free loading needs safetensors; convert it once with torch, e.g. "
                "Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")
    elif names & {"flax_model.msgpack.index.json"}:
        hint = " Sharded Flax msgpack checkpoints are not supported; save as safetensors."
    raise FileNotFoundError(f"no weights in {path!r}: looked for {SAFETENSORS}, {SAFETENSORS_INDEX} (+ shards "
                            f"model-0000x-of-0000y.safetensors) and {FLAX_MSGPACK}; found {sorted(names)}.{hint}")


def safetensors_shapes(files) -> dict[str, tuple]:
    """`{name: shape}` of every tensor in the files, read from the headers only (checked against
    each file's size, so a truncated or hostile file is refused before any data is read)."""
    return {name: info.shape for file in files for name, info in read_header(file).items()}


def read_safetensors(files, kind) -> dict[str, np.ndarray]:
    """Reads (and for shards, merges) PyTorch safetensors into float32 numpy arrays, without torch."""
    from safetensors import safe_open  # noqa: PLC0415

    state = {}
    for file in files:
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
    if kind == SAFETENSORS_INDEX:
        index = read_json(os.path.join(os.path.dirname(files[0]), SAFETENSORS_INDEX), what=SAFETENSORS_INDEX)
        lost = sorted(set(index["weight_map"]) - set(state))
        if lost:
            raise ValueError(f"shards are missing weights listed in {SAFETENSORS_INDEX}: {lost[:10]}")
    return state


def contiguous(x: np.ndarray) -> np.ndarray:
    # (np.ascontiguousarray would turn a 0-d array such as CLIP's logit_scale into shape (1,).)
    return x if x.flags.c_contiguous else np.array(x, order="C")


def as_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype.name in ("float16", "bfloat16", "float64"):
        return x.astype(np.float32)
    return x


def read_msgpack(file, root) -> dict[tuple, np.ndarray]:
    from flax import serialization  # noqa: PLC0415

    try:
        with open(file, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on truncated or corrupt bytes
        raise CheckpointError(f"{file}: unreadable Flax msgpack file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{file}: the msgpack holds a {type(tree).__name__}, not a params tree")
    if "params" in tree and isinstance(tree["params"], Mapping) and root not in tree:
        tree = tree["params"]
    if root not in tree and "embeddings" in tree:  # a base model (e.g. FlaxDinov2Model) saved without prefix
        tree = {root: {k: v for k, v in tree.items()}}
    return {k: as_float32(np.asarray(v)) for k, v in flatten_dict(tree).items()}
