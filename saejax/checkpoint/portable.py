"""The portable SAE file: a directory with `sae.safetensors` and `config.json`.

`config.json` holds the format tag, the architecture (`SAE.to_config()`), whether
normalisation statistics are present, the SHA-256 of `sae.safetensors`, a checksum of the
fields that decide what loads (`CHECKED_FIELDS`), and free-form training provenance (`info`,
free to edit). `load_sae` checks both sums, so a damaged file is an error, not a silently
different SAE; version-1 files, written before the sums, are read without them. The tensors are
`w_enc [D, F]`, `b_enc [F]`, `w_dec [F, D]`, `b_dec [D]`, the architecture's own [F] params
(`threshold` for JumpReLU and BatchTopK, `r_mag` and `b_mag` for Gated), and, when
the SAE was trained on normalised activations, `norm_mean [D]` and `norm_scalar []`. Any
safetensors reader (torch, numpy, JAX) can open it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import FLOAT_DTYPES, check_finite, read_header
from saejax.checkpoint.staging import sha256_of, staged_directory
from saejax.core.normalization import Normalization
from saejax.core.sae import SAE, SAEParams
from saejax.provenance import check_written_by, written_by

FORMAT = "saejax-sae"
FORMAT_VERSION = 2  # 2: tensors_sha256 and checksum
CHECKED_FIELDS = ("format", "version", "sae", "normalized_inputs", "normalization_clip", "tensors_sha256")
CONFIG_FILE = "config.json"
TENSORS_FILE = "sae.safetensors"
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SAEParams))


def save_sae(path: str | os.PathLike, ae: SAE, params: SAEParams, *, normalization: Normalization | None = None,
             info: dict[str, Any] | None = None) -> str:
    """Write `params` of `ae` (one SAE, not a stacked sweep) to the directory `path`.

    The directory is written beside its final place and renamed into it, so a crash never
    leaves a half-written SAE; an existing SAE at `path` is replaced.

    Args:
        path: target directory.
        ae: the architecture.
        params: its parameters.
        normalization: statistics the SAE's inputs were normalised with, if any.
        info: JSON-serialisable provenance (backbone, layer, tokens, steps, metrics...).

    Returns:
        The directory written.
    """
    ae.check_params(params, where=f"save_sae({os.fspath(path)})")
    tensors = {name: np.asarray(getattr(params, name), np.float32)
               for name in _PARAM_FIELDS if getattr(params, name) is not None}
    if normalization is not None:
        tensors["norm_mean"] = np.asarray(normalization.mean, np.float32)
        tensors["norm_scalar"] = np.asarray(normalization.scalar, np.float32)
    config = {"format": FORMAT, "version": FORMAT_VERSION, "sae": ae.to_config(),
              "normalized_inputs": normalization is not None, "info": info or {}, "written_by": written_by()}
    if normalization is not None and normalization.clip is not None:
        config["normalization_clip"] = [float(v) for v in normalization.clip]

    path = os.path.abspath(os.fspath(path))
    with staged_directory(path) as staging:
        safetensors.numpy.save_file(tensors, os.path.join(staging, TENSORS_FILE))
        config["tensors_sha256"] = sha256_of(os.path.join(staging, TENSORS_FILE))
        config["checksum"] = _config_checksum(config)
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
    return path


def load_sae(path: str | os.PathLike) -> tuple[SAE, SAEParams, dict[str, Any]]:
    """Read an SAE written by `save_sae`.

    Returns:
        `(ae, params, info)`; `info` holds the saved provenance plus `"normalization"`: a
        `Normalization` or None, and `"source"`: the directory.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = os.path.abspath(os.fspath(path))
    config_path, tensors_path = os.path.join(path, CONFIG_FILE), os.path.join(path, TENSORS_FILE)
    for required in (config_path, tensors_path):
        if not os.path.isfile(required):
            raise CheckpointError(f"{required}: missing (expected a saejax SAE directory with "
                                  f"{CONFIG_FILE} and {TENSORS_FILE})")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or "sae" not in config:
        raise CheckpointError(f"{config_path}: not a saejax SAE config (expected format {FORMAT!r} and an 'sae' entry)")
    if not isinstance(config.get("version", 1), int) or config.get("version", 1) >= 2:
        if config.get("checksum") != _config_checksum(config):
            raise CheckpointError(f"{config_path}: its checksum does not match its {', '.join(CHECKED_FIELDS)} "
                                  f"fields: the file was damaged or edited after it was written")
    check_written_by(config.get("written_by"), config_path)
    try:
        ae = SAE.from_config(config["sae"])
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{config_path}: bad SAE description: {type(e).__name__}: {e}") from e
    needed = ["w_enc", "b_enc", "w_dec", "b_dec", *ae.arch.extra_params]
    if config.get("normalized_inputs"):
        needed += ["norm_mean", "norm_scalar"]
    d, f_ = ae.d_model, ae.d_sae
    shapes = {"w_enc": (d, f_), "b_enc": (f_,), "w_dec": (f_, d), "b_dec": (d,),
              **{name: (f_,) for name in ae.arch.extra_params}, "norm_mean": (d,), "norm_scalar": ()}
    header = read_header(tensors_path)  # names, dtypes and shapes are checked before any data is read
    missing = [name for name in needed if name not in header]
    if missing:
        raise CheckpointError(f"{tensors_path}: missing tensor(s) {missing}")
    unexpected = sorted(set(header) - set(shapes))
    if unexpected:
        raise CheckpointError(f"{tensors_path}: unexpected tensor(s) {unexpected}")
    for name in [n for n in shapes if n in header]:
        entry = header[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{tensors_path}: tensor {name!r} has dtype {entry.dtype}, expected a float type")
        if entry.shape != shapes[name]:
            raise CheckpointError(f"{tensors_path}: tensor {name!r} has shape {list(entry.shape)}, expected "
                                  f"{list(shapes[name])} for {config_path} (d_model={d}, d_sae={f_})")
    expected_sha = config.get("tensors_sha256")
    if expected_sha is not None and sha256_of(tensors_path) != expected_sha:
        raise CheckpointError(f"{tensors_path}: its SHA-256 does not match the one in {config_path}: the file was "
                              f"damaged or replaced after it was written")
    try:
        tensors = safetensors.numpy.load_file(tensors_path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{tensors_path}: unreadable safetensors file: {e}") from e
    for name in header:
        tensors[name] = tensors[name].astype(np.float32)
        check_finite(tensors_path, name, tensors[name])
    params = SAEParams(**{name: jnp.asarray(tensors[name]) for name in _PARAM_FIELDS if name in tensors})
    try:
        ae.check_params(params, where=tensors_path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e

    normalization = None
    if config.get("normalized_inputs"):
        if not float(tensors["norm_scalar"]) > 0:
            raise CheckpointError(f"{tensors_path}: tensor 'norm_scalar' is {float(tensors['norm_scalar'])}, "
                                  f"a normalisation scalar must be positive")
        clip = config.get("normalization_clip")
        normalization = Normalization(jnp.asarray(tensors["norm_mean"]), jnp.asarray(tensors["norm_scalar"]),
                                      None if clip is None else (float(clip[0]), float(clip[1])))
    info = dict(config.get("info", {}), normalization=normalization, source=path)
    return ae, params, info


def _config_checksum(config: dict[str, Any]) -> str:
    checked = {key: config.get(key) for key in CHECKED_FIELDS}
    return hashlib.sha256(json.dumps(checked, sort_keys=True).encode()).hexdigest()
