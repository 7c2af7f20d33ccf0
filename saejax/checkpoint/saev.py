"""Import SAE checkpoints written by the reference package `saev`, every format, without torch.

saev's `sae.pt` (`saev.nn.dump`) is one UTF-8 JSON line followed by the bytes of
`torch.save(state_dict)`: a zip archive holding `<prefix>/data.pkl` (the pickled state dict),
`<prefix>/byteorder` and one raw member `<prefix>/data/<key>` per tensor storage. The state dict
has `W_enc [D, F]`, `b_enc [F]`, `W_dec [F, D]`, `b_dec [D]` (the layout of `SAEParams`) and,
for BatchTopK, the scalar `activation.threshold`.

The JSON line comes in these eras (`info["schema"]`):

- 0.1.0, no schema: the config itself (`d_vit`, `exp_factor`, ...); a ReLU SAE that encodes
  `relu((x - b_dec) @ W_enc + b_enc)`, like saejax.
- schema 1: `{"schema": 1, "cls": "Relu"|"TopK"|"BatchTopK", "cfg": {..., "top_k"}}`, or
  `{"schema": 1, "cls": "SparseAutoencoderConfig", "cfg": {..., "activation": {"cls", "params"}}}`.
- schemas 2 to 5: `{"schema": N, "cfg": {"d_model", "d_sae", "activation": {"cls": "Relu"|"TopK"|
  "BatchTopK", "params": {"top_k", ...}}, ...}, "commit", "lib"}` (Matryoshka prefixes only
  change the training loss, so they need nothing here).

Files with a schema were written by saev's later forward, `h = x @ W_enc + b_enc`, with no
`- b_dec` before encoding. saejax's encoder subtracts `b_dec`, so these files are imported with
`b_enc + b_dec @ W_enc` as `b_enc`: the same codes (`info["forward"]` says which was used;
`forward=` overrides it). BatchTopK's scalar threshold becomes the per-latent threshold of
`saejax.sae.batchtopk` (saev uses ReLU while it is still 0, which a threshold of 0 is).
saejax's TopK keeps `relu` of the k largest values, saev's keeps them as they are: the same
codes whenever the k largest pre-activations are positive.

The pickle is read by a restricted unpickler: it resolves only the few globals a state dict
needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and friends, the
`torch.*Storage` types) to local numpy implementations and refuses every other global, so
loading an untrusted file never runs its code.

>>> ae, params, info = import_saev("checkpoints/abcd1234/sae.pt")
>>> z = ae.encode(params, x)            # [N, D] -> [N, F]
>>> info["config"]["sparsity_coeff"]
0.0004

Long because it reads every era of saev's files (0.1.0, schemas 1 to 5) through one restricted unpickler, and the eras share its bounds checks.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import sys
import zipfile
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import check_finite
from saejax.checkpoint.staging import sha256_of
from saejax.core import sae as sae_module
from saejax.core.sae import SAE, SAEParams, relu

FORMAT = "saev-0.1.0"  # the header-less era; files with a schema report "saev-schema-<N>"
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

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, max_elements: int,
                 bound: str = "an SAE of the config line's d_vit and exp_factor can hold"):
        super().__init__(file)
        self._bound = bound
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
            raise pickle.UnpicklingError(f"storage {key!r} declares {numel} elements, more than {self._bound} "
                                         f"({self._max_elements} per storage)")
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
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: first line is not a JSON config: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: first line is JSON but not an object: {type(header).__name__}")
    return header


def _positive_int(path, where, key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {where} {key!r} must be a positive integer, got {value!r}")
    return value


def _describe(path: str, header: dict[str, Any]) -> dict[str, Any]:
    """`{d_model, d_sae, activation ("relu"|"topk"|"batchtopk"), k, schema}` from any era's header."""
    schema = header.get("schema")
    if schema is None:  # 0.1.0
        for key in ("d_vit", "exp_factor"):
            if key not in header:
                raise CheckpointError(f"{path}: config line has no {key!r}")
            _positive_int(path, "config", key, header[key])
        return {"d_model": header["d_vit"], "d_sae": header["d_vit"] * header["exp_factor"], "activation": "relu",
                "k": None, "schema": None}
    if schema not in (1, 2, 3, 4, 5):
        raise CheckpointError(f"{path}: unknown saev checkpoint schema {schema!r} (known: none, 1 to 5)")
    cfg = header.get("cfg")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: schema {schema} header has no 'cfg' object")
    d_model = _positive_int(path, "cfg", "d_model", cfg.get("d_model", cfg.get("d_vit")))
    d_sae = cfg.get("d_sae")
    if d_sae is None and "exp_factor" in cfg:
        d_sae = d_model * _positive_int(path, "cfg", "exp_factor", cfg["exp_factor"])
    d_sae = _positive_int(path, "cfg", "d_sae", d_sae)
    cls = header.get("cls", "SparseAutoencoderConfig")
    if schema == 1 and cls in ("Relu", "TopK", "BatchTopK"):  # schema 1, first form
        name, params = cls, {"top_k": cfg.get("top_k", 32)}
    else:
        activation = cfg.get("activation")
        if not (isinstance(activation, dict) and isinstance(activation.get("cls"), str)):
            raise CheckpointError(f"{path}: schema {schema} cfg has no activation {{'cls', 'params'}}")
        name, params = activation["cls"], dict(activation.get("params") or {})
    kinds = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}
    if name not in kinds:
        raise CheckpointError(f"{path}: unknown activation {name!r} (known: {', '.join(kinds)})")
    k = None if name == "Relu" else _positive_int(path, "activation", "top_k", params.get("top_k", 32))
    return {"d_model": d_model, "d_sae": d_sae, "activation": kinds[name], "k": k, "schema": schema}


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (e.g. open_clip's `open_clip_pytorch_model.bin`) as numpy
    arrays, without torch and without running code: the same restricted unpickler as
    `import_saev`, which builds tensors, storages and OrderedDicts only.

    Raises:
        CheckpointError: naming the file: not a torch zip archive, truncated or corrupt, a pickle
            that references anything but tensors, or an entry that is not a named tensor.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        # No storage can hold more elements than the file has bytes.
        return _read_state_dict(path, f, 0, max(os.path.getsize(path) // 4, 1), what="it is",
                                bound="a file of this size can hold")


def _read_state_dict(path: str, f, start: int, max_elements: int, what: str = "the bytes after the config line are",
                     **bound) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(_OffsetFile(f, start))
    except Exception as e:  # BadZipFile, OSError, struct.error, ... on truncated or corrupt bytes
        raise CheckpointError(f"{path}: {what} not a readable torch.save zip "
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
            unpickler = _StateDictUnpickler(io.BytesIO(data), archive, prefix, byteorder, max_elements, **bound)
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


def import_saev(path: str | os.PathLike, *, forward: str = "auto",
                sha256: str | None = None) -> tuple[SAE, SAEParams, dict[str, Any]]:
    """Loads a saev `sae.pt` of any era as a saejax SAE, without torch and without running code.

    Args:
        path: the `sae.pt` file, or a directory that contains one.
        forward: how the file's SAE encodes: "auto" (by era, see the module docstring),
            "subtract_b_dec" (`(x - b_dec) @ W_enc + b_enc`, 0.1.0) or "no_b_dec"
            (`x @ W_enc + b_enc`, saev with a schema).
        sha256: the file's expected SHA-256 (e.g. from a `manifest.jsonl`), checked first.

    Returns:
        `(ae, params, info)`: a saejax `relu`, `topk(k)` or `batchtopk(k)` SAE of d_model x
        d_sae; float32 `SAEParams`; `info` with `"config"` (saev's JSON line), `"source"`,
        `"format"`, `"schema"` and `"forward"`. saev's SAEs read raw activations unless their
        publisher says otherwise (see `load_pretrained`).

    Raises:
        CheckpointError: naming the file and the problem: missing or empty file, an unknown
            schema or activation, a truncated or corrupt archive, a pickle that references
            any global beyond a state dict's (named), missing or unexpected keys (named), a
            shape mismatch (key, shape found, shape expected), non-float or non-finite
            tensors, or a SHA-256 mismatch. Nothing is returned half-loaded.

    >>> ae, params, info = import_saev("sae.pt")
    >>> x_hat = ae(params, x)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (expected a saev {FILENAME})")
    if forward not in ("auto", "subtract_b_dec", "no_b_dec"):
        raise ValueError(f"forward must be 'auto', 'subtract_b_dec' or 'no_b_dec', got {forward!r}")
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256:
            raise CheckpointError(f"{path}: SHA-256 {digest} does not match the expected {sha256}")
    try:
        with open(path, "rb") as f:
            header = _read_header(path, f)
            described = _describe(path, header)
            d, f_ = described["d_model"], described["d_sae"]
            state = _read_state_dict(path, f, f.tell(), d * f_)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e

    expected = {"W_enc": (d, f_), "b_enc": (f_,), "W_dec": (f_, d), "b_dec": (d,)}
    if described["activation"] == "batchtopk":
        expected["activation.threshold"] = ()
    missing = [k for k in expected if k not in state]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise CheckpointError(f"{path}: state_dict is missing key{'s' if len(missing) > 1 else ''} {names} "
                              f"(found {sorted(state)})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: state_dict has unexpected keys {unexpected} (a {described['activation']} "
                              f"saev SAE has exactly {list(expected)})")
    for key, shape in expected.items():
        array = state[key]
        if array.dtype not in _FLOAT_STORAGES.values():
            raise CheckpointError(f"{path}: {key!r} has non-float dtype {array.dtype}")
        if array.shape != shape:
            raise CheckpointError(f"{path}: {key!r} has shape {array.shape}, expected {shape} "
                                  f"(d_model={d}, d_sae={f_})")
        check_finite(path, key, array)

    arrays = {k: state[k].astype(np.float32) for k in expected}
    if forward == "auto":
        forward = "subtract_b_dec" if described["schema"] is None else "no_b_dec"
    b_enc = arrays["b_enc"]
    if forward == "no_b_dec":  # saejax subtracts b_dec before encoding: fold it into the bias
        b_enc = (b_enc + arrays["b_dec"].astype(np.float64) @ arrays["W_enc"].astype(np.float64)).astype(np.float32)
    kind, k = described["activation"], described["k"]
    try:
        ae = relu(d_model=d, d_sae=f_) if kind == "relu" else getattr(sae_module, kind)(d, f_, k=k)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its header describes an SAE that cannot be built: {e}") from e
    threshold = None
    if kind == "batchtopk":
        threshold = jnp.full((f_,), float(arrays["activation.threshold"]), jnp.float32)
    params = SAEParams(w_enc=jnp.asarray(arrays["W_enc"]), b_enc=jnp.asarray(b_enc), w_dec=jnp.asarray(arrays["W_dec"]),
                       b_dec=jnp.asarray(arrays["b_dec"]), threshold=threshold)
    schema = described["schema"]
    info = {"config": header, "source": path, "format": FORMAT if schema is None else f"saev-schema-{schema}",
            "schema": schema, "forward": forward}
    return ae, params, info


def find_saev_checkpoint(root: str | os.PathLike, *, layer: int, run_id: str | None = None,
                         l0: float | None = None) -> tuple[str, dict[str, Any]]:
    """Pick a checkpoint in a saev repository laid out as `layer_XX/<run>/sae.pt` with a
    `manifest.jsonl` (one `{"run_id", "layer", "l0", "mse", "sha256", "path"}` per line; the
    DINOv3 repositories): by `run_id`, by the L0 closest to `l0`, or else the lowest MSE.

    Returns:
        `(path, entry)`; load it with `import_saev(path, sha256=entry["sha256"])`.

    Raises:
        CheckpointError: no manifest, no checkpoint of that layer (the layers there are named),
            or an unknown run id.
    """
    root = os.fspath(root)
    manifest = os.path.join(root, "manifest.jsonl")
    if not os.path.isfile(manifest):
        raise CheckpointError(f"{manifest}: missing (a saev repository with layer_XX/<run>/sae.pt lists them there)")
    try:
        with open(manifest) as fh:
            entries = [json.loads(line) for line in fh if line.strip()]
    except ValueError as e:
        raise CheckpointError(f"{manifest}: not JSON lines: {e}") from e
    candidates = [e for e in entries if e.get("layer") == layer]
    if not candidates:
        raise CheckpointError(f"{manifest}: no checkpoint of layer {layer}; layers: "
                              f"{sorted({e.get('layer') for e in entries})}")
    if run_id is not None:
        chosen = [e for e in candidates if e.get("run_id") == run_id]
        if not chosen:
            raise CheckpointError(f"{manifest}: no run {run_id!r} at layer {layer}; runs: "
                                  f"{[e.get('run_id') for e in candidates]}")
        entry = chosen[0]
    elif l0 is not None:
        entry = min(candidates, key=lambda e: abs(float(e["l0"]) - l0))
    else:
        entry = min(candidates, key=lambda e: float(e["mse"]))
    return os.path.join(root, entry["path"]), entry
