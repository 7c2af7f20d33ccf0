"""Reading a safetensors file's header, and checking it, before reading any tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, plus `__metadata__`), then the
data. Checking names, dtypes, shapes and offsets against the file size first means a hostile or
broken file is refused before any large allocation.
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import numpy as np

from saejax.checkpoint.errors import CheckpointError

_MAX_HEADER_BYTES = 100 * 2**20
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """`{name: TensorInfo}` of a safetensors file, checked against the file's size.

    Raises:
        CheckpointError: naming the file: too short, a header that is not JSON, an unknown
            dtype, a bad shape, or data offsets outside the file or not matching the shape.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {list(shape)}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets {[begin, end]} outside the file's "
                                  f"{data_size} data bytes (truncated?)")
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, its shape {list(shape)} of "
                                  f"{dtype} needs {math.prod(shape) * ITEMSIZE[dtype]}")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    return tensors


def check_finite(path: str, name: str, array: np.ndarray) -> None:
    """Raise CheckpointError naming the file and tensor if `array` holds NaN or Inf."""
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise CheckpointError(f"{path}: tensor {name!r} holds {bad} NaN or Inf value(s)")
