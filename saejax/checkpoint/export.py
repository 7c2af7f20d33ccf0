"""Export saejax SAEs to the formats other tools load: saev's `sae.pt` and SAELens'
directory (`cfg.json` + `sae_weights.safetensors`); and read SAELens' directories back.

Both formats take raw activations: an SAE trained on normalised ones is exported with its
normalisation folded into the weights (`fold_normalization`, exact), so the other tool needs
nothing else.

>>> export_saev("/tmp/sae.pt", ae, params, normalization=norm)       # saev.nn.load("/tmp/sae.pt")
>>> export_saelens("/tmp/sae_dir", ae, params, normalization=norm)  # SAE.load_from_disk("/tmp/sae_dir")
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from saejax.core import sae as sae_module
from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import FLOAT_DTYPES, check_finite, read_header
from saejax.checkpoint.staging import staged_directory
from saejax.core.normalization import Normalization, fold_normalization
from saejax.core.sae import SAE, SAEParams

__all__ = ["export_saelens", "export_saev", "import_saelens", "torch_save_bytes"]

SAEV_SCHEMA = 5


def _raw_params(ae: SAE, params: SAEParams, normalization: Normalization | None) -> dict[str, np.ndarray]:
    ae.check_params(params, where="export")
    if normalization is not None:
        params = fold_normalization(params, normalization)
    return {name: np.asarray(getattr(params, name), np.float32)
            for name in ("w_enc", "b_enc", "w_dec", "b_dec", *ae.arch.extra_params)}


def export_saev(path: str | os.PathLike, ae: SAE, params: SAEParams, *,
                normalization: Normalization | None = None) -> str:
    """Write `ae` as saev's `sae.pt` (schema 5: a JSON header line, then `torch.save` bytes of
    the state dict), which `saev.nn.load` reads. saev encodes `x @ W_enc + b_enc`, so saejax's
    `b_dec @ W_enc` is taken out of `b_enc`.

    Raises:
        ValueError: an architecture saev has no equivalent for (JumpReLU), or a BatchTopK SAE
            whose per-latent thresholds differ (saev keeps one scalar).
    """
    p = _raw_params(ae, params, normalization)
    b_enc = (p["b_enc"].astype(np.float64) - p["b_dec"].astype(np.float64) @ p["w_enc"].astype(np.float64))
    state = {"W_enc": p["w_enc"], "b_enc": b_enc.astype(np.float32), "W_dec": p["w_dec"], "b_dec": p["b_dec"]}
    if ae.architecture == "relu":
        activation = {"cls": "Relu", "params": {"key": "relu"}}
    elif ae.architecture in ("topk", "batchtopk"):
        name, key = ("TopK", "top-k") if ae.architecture == "topk" else ("BatchTopK", "batch-top-k")
        activation = {"cls": name, "params": {"key": key, "top_k": int(ae.k)}}
        if ae.architecture == "batchtopk":
            if np.ptp(p["threshold"]) > 0:
                raise ValueError("saev's BatchTopK keeps one threshold; this SAE's per-latent thresholds differ")
            state["activation.threshold"] = np.asarray(p["threshold"][0], np.float32)
    else:
        raise ValueError(f"saev has no {ae.architecture} SAE; export relu, topk or batchtopk")
    header = {"schema": SAEV_SCHEMA, "cfg": {"d_model": ae.d_model, "d_sae": ae.d_sae, "activation": activation},
              "commit": "unknown", "lib": "saejax"}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        f.write(torch_save_bytes(state))
    os.replace(tmp, path)
    return path


class _Global:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle needs reduce functions callable; never called here
        raise TypeError("a marker for pickle, not a function")


class _StorageRef:
    def __init__(self, key: str, numel: int):
        self.pid = ("storage", _Global("torch", "FloatStorage"), key, "cpu", numel)


class _TensorRef:
    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self.args = (storage, 0, tuple(shape), strides, False, collections.OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: it lets us write torch's globals by name
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _StorageRef) else None

    def reducer_override(self, obj):
        return "global" if isinstance(obj, _Global) else NotImplemented

    def save_global(self, obj, name=None):
        if not isinstance(obj, _Global):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())


def torch_save_bytes(state: dict[str, np.ndarray], prefix: str = "archive") -> bytes:
    """The bytes `torch.save(state_dict)` writes for float32 tensors (zip, pickle protocol 2,
    one stored member per storage), made without torch."""
    members, tensors = {}, collections.OrderedDict()
    for i, (name, array) in enumerate(state.items()):
        array = np.array(array, "<f4", order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        members[f"{prefix}/data/{i}"] = array.tobytes()
        tensors[name] = _TensorRef(_StorageRef(str(i), array.size), array.shape)
    pickled = io.BytesIO()
    _TorchPickler(pickled, protocol=2).dump(tensors)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pickled.getvalue())
        archive.writestr(f"{prefix}/byteorder", "little")
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"{prefix}/version", "3\n")
    return out.getvalue()


SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
_SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                         "gated": "gated"}
# saejax's Gated SAE keeps the gate's bias in `b_enc`; SAELens calls it `b_gate` and has no `b_enc`.
_SAELENS_NAMES = {"gated": {"w_enc": "W_enc", "b_enc": "b_gate", "r_mag": "r_mag", "b_mag": "b_mag",
                            "w_dec": "W_dec", "b_dec": "b_dec"}}
_PLAIN_NAMES = {"w_enc": "W_enc", "b_enc": "b_enc", "w_dec": "W_dec", "b_dec": "b_dec", "threshold": "threshold"}


def export_saelens(directory: str | os.PathLike, ae: SAE, params: SAEParams, *,
                   normalization: Normalization | None = None, metadata: dict[str, Any] | None = None) -> str:
    """Write `ae` as an SAELens directory (`cfg.json` + `sae_weights.safetensors`, SAELens 6),
    which `sae_lens.SAE.load_from_disk` reads: "standard" for ReLU, "topk", "gated", and
    "jumprelu" for JumpReLU and for BatchTopK at inference (a per-latent threshold).
    `metadata` goes into the config's `metadata` (e.g. `{"model_name": ..., "hook_name": ...}`)."""
    p = _raw_params(ae, params, normalization)
    architecture = _SAELENS_ARCHITECTURE[ae.architecture]
    names = _SAELENS_NAMES.get(architecture, _PLAIN_NAMES)
    tensors = {names[ours]: value for ours, value in p.items()}
    cfg = {"architecture": architecture, "d_in": ae.d_model, "d_sae": ae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": dict(metadata or {}, saejax_architecture=ae.architecture, saejax_k=ae.k)}
    if architecture == "topk":
        cfg["k"] = int(ae.k)
    with staged_directory(directory) as staging:
        safetensors.numpy.save_file(tensors, os.path.join(staging, SAELENS_WEIGHTS))
        with open(os.path.join(staging, SAELENS_CFG), "w") as f:
            json.dump(cfg, f, indent=2)
    return os.path.abspath(os.fspath(directory))


def import_saelens(directory: str | os.PathLike) -> tuple[SAE, SAEParams, dict[str, Any]]:
    """Read an SAELens directory ("standard", "topk", "jumprelu" or "gated",
    `apply_b_dec_to_input` true, no activation normalisation) as a saejax SAE.

    Raises:
        CheckpointError: naming the file: a missing file, an architecture or option saejax does
            not reproduce, or tensors of the wrong names, shapes, dtypes or values.
    """
    directory = os.fspath(directory)
    cfg_path, weights_path = os.path.join(directory, SAELENS_CFG), os.path.join(directory, SAELENS_WEIGHTS)
    for required in (cfg_path, weights_path):
        if not os.path.isfile(required):
            raise CheckpointError(f"{required}: missing (an SAELens directory has {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.load(open(cfg_path))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not JSON: {e}") from e
    try:
        return _read_saelens(cfg, cfg_path, weights_path, directory)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged cfg.json or weights file, whatever it breaks
        raise CheckpointError(f"{cfg_path} / {SAELENS_WEIGHTS}: not an SAELens SAE ({type(e).__name__}: {e})") from e


def _read_saelens(cfg, cfg_path, weights_path, directory):
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    architecture = cfg.get("architecture", "standard")
    if architecture not in ("standard", "topk", "jumprelu", "gated"):
        raise CheckpointError(f"{cfg_path}: architecture {architecture!r} is not one saejax reads "
                              f"(standard, topk, jumprelu, gated)")
    if not cfg.get("apply_b_dec_to_input", True) or cfg.get("normalize_activations", "none") != "none":
        raise CheckpointError(f"{cfg_path}: apply_b_dec_to_input=false or normalize_activations="
                              f"{cfg.get('normalize_activations')!r} is not reproduced by saejax")
    d, f_ = int(cfg["d_in"]), int(cfg["d_sae"])
    names = dict(_SAELENS_NAMES.get(architecture, _PLAIN_NAMES))
    if architecture in ("standard", "topk"):
        del names["threshold"]
    shapes = {theirs: {"w_enc": (d, f_), "w_dec": (f_, d), "b_dec": (d,)}.get(ours, (f_,))
              for ours, theirs in names.items()}
    header = read_header(weights_path)
    for name, shape in shapes.items():
        if name not in header:
            raise CheckpointError(f"{weights_path}: missing tensor {name!r}")
        if header[name].dtype not in FLOAT_DTYPES or header[name].shape != shape:
            raise CheckpointError(f"{weights_path}: tensor {name!r} is {header[name].dtype} "
                                  f"{list(header[name].shape)}, expected a float {list(shape)}")
    tensors = safetensors.numpy.load_file(weights_path)
    for name in shapes:
        check_finite(weights_path, name, tensors[name])
    meta = cfg.get("metadata") or {}
    if architecture == "standard":
        ae = sae_module.relu(d, f_)
    elif architecture == "topk":
        ae = sae_module.topk(d, f_, k=int(cfg["k"]))
    elif meta.get("saejax_architecture") == "batchtopk":  # saejax's own export: a BatchTopK SAE at inference
        ae = sae_module.batchtopk(d, f_, k=int(meta["saejax_k"]))
    elif architecture == "gated":
        ae = sae_module.gated(d, f_)
    else:
        ae = sae_module.jumprelu(d, f_)
    params = SAEParams(**{ours: jnp.asarray(tensors[theirs], jnp.float32) for ours, theirs in names.items()})
    return ae, params, {"config": cfg, "source": directory, "format": "saelens"}
