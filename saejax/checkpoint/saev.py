"""Import SAE checkpoints written by the reference package `saev` 0.1.0, without torch.

saev's `sae.pt` (`saev.nn.dump`) is one UTF-8 JSON line, the SAE config (`d_vit`,
`exp_factor`, `sparsity_coeff`, ...), followed by the bytes of `torch.save(state_dict)`: a
zip archive holding `<prefix>/data.pkl` (the pickled state dict), `<prefix>/byteorder` and
one raw member `<prefix>/data/<key>` per tensor storage. The state dict has the keys
`W_enc [D, F]`, `b_enc [F]`, `W_dec [F, D]`, `b_dec [D]`, the same layout as `SAEParams`.

The pickle is read by a restricted unpickler: it resolves only the few globals a state dict
needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and friends, the
`torch.*Storage` types) to local numpy implementations and refuses every other global, so
loading an untrusted file never runs its code.

>>> ae, params, info = import_saev("checkpoints/abcd1234/sae.pt")
>>> z = ae.encode(params, x)            # [N, D] -> [N, F]
>>> info["config"]["sparsity_coeff"]
0.0004
"""

from __future__ import annotations

import collections
import io
import json
import os
import math
import pickle
import sys
import zipfile
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import check_finite
from saejax.sae import SAE, SAEParams, relu

FORMAT = "saev-0.1.0"
FILENAME = "sae.pt"
_MAX_HEADER_BYTES = 1 << 20
_MAX_PICKLE_BYTES = 16 << 20

# torch's legacy storage classes, as named in the pickle, and their element types.
_FLOAT_STORAGES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
}
_OTHER_STORAGES = {
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _Refuse:
    """Base of the objects the unpickler hands out: a pickle cannot BUILD state into them."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refused to set state on {type(self).__name__}")


class _StorageType(_Refuse):
    """Stands for `torch.<name>` (e.g. `torch.FloatStorage`) inside the pickle."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype


class _Storage(_Refuse):
    """A storage record: a flat numpy array of its element type."""

    __slots__ = ("key", "array")

    def __init__(self, key: str, array: np.ndarray):
        self.key = key
        self.array = array


class _Tensor(_Refuse):
    """A rebuilt tensor: a contiguous numpy array (a copy, never a view of the file)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _Tensor:
    """Safe stand-in for `torch._utils._rebuild_tensor[_v2]`: strided view of a storage, copied."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage record")
    flat = storage.array
    if not (isinstance(storage_offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise pickle.UnpicklingError(f"storage {storage.key!r}: non-integer offset/size/stride")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise pickle.UnpicklingError(
            f"storage {storage.key!r}: bad offset {storage_offset}, size {size} or stride {stride}")
    if 0 in size:
        return _Tensor(np.zeros(size, flat.dtype))
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        raise pickle.UnpicklingError(f"storage {storage.key!r}: zero stride {stride} for size {size} (an expanded "
                                     f"tensor; a saved parameter is contiguous)")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise pickle.UnpicklingError(
            f"storage {storage.key!r} holds {flat.size} elements, but a tensor with offset "
            f"{storage_offset}, size {size} and stride {stride} reaches element {last}")
    if math.prod(size) > flat.size - storage_offset:
        raise pickle.UnpicklingError(f"storage {storage.key!r}: a tensor of size {size} needs more elements than the "
                                     f"{flat.size - storage_offset} its storage holds after offset {storage_offset}")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return _Tensor(np.array(view, copy=True, order="C"))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    """Safe stand-in for `torch._utils._rebuild_parameter`: the parameter's data."""
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in {**_FLOAT_STORAGES, **_OTHER_STORAGES}.items()},
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into numpy arrays; refuses every other global."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, max_elements: int):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}
        # Bounds from the config line (a few times what the SAE's tensors need; a storage may hold
        # a little more than its tensor): a hostile file cannot make us allocate more.
        self._max_elements, self._budget = 2 * max_elements + 1024, 4 * max_elements + 4096

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"refused pickle global {module}.{name} (a saev state dict only needs "
                                 "torch tensors, storages and OrderedDict)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"malformed storage record {pid!r:.200}")
        if key in self._storages:
            return self._storages[key]
        member = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"archive has no storage member {member!r}") from None
        if not 0 <= numel <= self._max_elements or numel > self._budget:
            raise pickle.UnpicklingError(f"storage {key!r} declares {numel} elements, more than an SAE of the config "
                                         f"line's d_vit and exp_factor can hold ({self._max_elements} per storage)")
        self._budget -= numel
        nbytes = numel * storage_type.dtype.itemsize
        if info.compress_type != zipfile.ZIP_STORED:
            raise pickle.UnpicklingError(f"storage member {member!r} is compressed; torch.save stores tensors "
                                         f"uncompressed")
        if info.file_size != nbytes:
            raise pickle.UnpicklingError(
                f"storage member {member!r} has {info.file_size} bytes, expected {nbytes} "
                f"({numel} x {storage_type.name})")
        with self._archive.open(member) as member_file:
            raw = member_file.read(nbytes)
        if len(raw) != nbytes:
            raise pickle.UnpicklingError(f"storage member {member!r} is truncated")
        dtype = storage_type.dtype
        if self._byteorder == sys.byteorder or dtype.itemsize == 1:
            array = np.frombuffer(raw, dtype=dtype, count=numel)
        else:  # swap through unsigned ints: also right for bfloat16, which has no byte order
            swapped = np.frombuffer(raw, dtype=np.dtype(f"u{dtype.itemsize}").newbyteorder(), count=numel)
            array = swapped.astype(f"u{dtype.itemsize}").view(dtype)
        storage = _Storage(key, array)
        self._storages[key] = storage
        return storage


class _OffsetFile(io.RawIOBase):
    """A read-only view of `f` starting at byte `start`: the zip archive after the JSON line."""

    def __init__(self, f, start: int):
        self._f = f
        self._start = start
        self._end = f.seek(0, os.SEEK_END)
        f.seek(start)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        if whence == os.SEEK_SET:
            pos = self._start + offset
        elif whence == os.SEEK_CUR:
            pos = self._f.tell() + offset
        else:
            pos = self._end + offset
        if pos < self._start:
            raise OSError("seek before the start of the archive")
        return self._f.seek(pos) - self._start

    def tell(self):
        return self._f.tell() - self._start

    def read(self, size=-1):
        return self._f.read(size)

    def readinto(self, buffer):
        return self._f.readinto(buffer)


def _read_header(path: str, f) -> dict[str, Any]:
    line = f.readline(_MAX_HEADER_BYTES)
    if not line:
        raise CheckpointError(f"{path}: empty file (expected a saev sae.pt: a JSON config line, then torch.save bytes)")
    if not line.endswith(b"\n"):
        raise CheckpointError(f"{path}: no newline-terminated JSON config line at the start of the file")
    try:
        config = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: first line is not a JSON config: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: first line is JSON but not an object: {type(config).__name__}")
    for key in ("d_vit", "exp_factor"):
        if key not in config:
            raise CheckpointError(f"{path}: config line has no {key!r}")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{path}: config {key!r} must be a positive integer, got {value!r}")
    return config


def _read_state_dict(path: str, f, start: int, max_elements: int) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(_OffsetFile(f, start))
    except Exception as e:  # BadZipFile, OSError, struct.error, ... on truncated or corrupt bytes
        raise CheckpointError(f"{path}: the bytes after the config line are not a readable torch.save zip "
                              f"archive (truncated or corrupt?): {e}") from e
    with archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one '<prefix>/data.pkl' in the torch archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder {byteorder!r} in the torch archive")
            if archive.getinfo(pickles[0]).file_size > _MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: {pickles[0]} is implausibly large for a state dict")
            data = archive.read(pickles[0])
            unpickler = _StateDictUnpickler(io.BytesIO(data), archive, prefix, byteorder, max_elements)
            obj = unpickler.load()
        except CheckpointError:
            raise
        except _RefusedGlobal as e:
            raise CheckpointError(f"{path}: unsafe checkpoint: {e}") from e
        except Exception as e:  # zipfile, zlib, pickle and our own validation errors alike
            raise CheckpointError(f"{path}: truncated or corrupt torch archive: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise CheckpointError(f"{path}: state dict entry {key!r:.100} is not a named tensor")
        state[key] = value.array
    return state


_SAEV_TO_SAEJAX = {"W_enc": "w_enc", "b_enc": "b_enc", "W_dec": "w_dec", "b_dec": "b_dec"}


def import_saev(path: str | os.PathLike) -> tuple[SAE, SAEParams, dict[str, Any]]:
    """Loads a saev 0.1.0 `sae.pt` as a saejax ReLU SAE, without torch and without running code.

    Args:
        path: the `sae.pt` file, or a directory that contains one.

    Returns:
        `(ae, params, info)`: `ae = saejax.sae.relu(d_model=d_vit, d_sae=d_vit * exp_factor)`;
        `params`, an `SAEParams` of float32 jax arrays (`w_enc = W_enc [D, F]`,
        `b_enc [F]`, `w_dec = W_dec [F, D]`, `b_dec [D]`, saev's own layout); `info`, a dict
        with `"config"` (saev's JSON config line), `"source"` (the file read) and
        `"format"` (`"saev-0.1.0"`). saev trained on raw (unnormalised) activations.

    Raises:
        CheckpointError: naming the file and the problem: missing or empty file, a first line
            that is not a JSON config with `d_vit` and `exp_factor`, a truncated or corrupt
            archive, a pickle that references any global beyond a state dict's (named),
            missing or unexpected keys (named), a shape mismatch (key, shape found, shape
            expected), or non-float tensors. Nothing is returned half-loaded.

    >>> ae, params, info = import_saev("sae.pt")
    >>> x_hat = ae(params, x)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (expected a saev {FILENAME})")
    try:
        with open(path, "rb") as f:
            config = _read_header(path, f)
            state = _read_state_dict(path, f, f.tell(), config["d_vit"] ** 2 * config["exp_factor"])
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e

    d, f_ = config["d_vit"], config["d_vit"] * config["exp_factor"]
    expected = {"W_enc": (d, f_), "b_enc": (f_,), "W_dec": (f_, d), "b_dec": (d,)}
    missing = [k for k in expected if k not in state]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise CheckpointError(f"{path}: state_dict is missing key{'s' if len(missing) > 1 else ''} {names} "
                              f"(found {sorted(state)})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: state_dict has unexpected keys {unexpected} (a saev 0.1.0 SAE has "
                              f"exactly {list(expected)})")
    for key, shape in expected.items():
        array = state[key]
        if array.dtype not in _FLOAT_STORAGES.values():
            raise CheckpointError(f"{path}: {key!r} has non-float dtype {array.dtype}")
        if array.shape != shape:
            raise CheckpointError(f"{path}: {key!r} has shape {array.shape}, expected {shape} "
                                  f"(d_vit={d}, exp_factor={config['exp_factor']})")
        check_finite(path, key, array)

    ae = relu(d_model=d, d_sae=f_)
    params = SAEParams(**{_SAEV_TO_SAEJAX[k]: jnp.asarray(state[k].astype(np.float32)) for k in expected})
    info = {"config": config, "source": path, "format": FORMAT}
    return ae, params, info
