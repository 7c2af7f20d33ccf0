"""`save`: a `Backbone` and its params as an ordinary HF checkpoint directory.

`config.json` (the `transformers` config; a full CLIPConfig when the backbone has CLIP's text
tower), `preprocessor_config.json` (`bb.processing`) and `model.safetensors` under the
PyTorch model's weight names (`convert.to_torch`). `saejax.backbones.load` reads it back to the
same params, and so do `transformers`' PyTorch classes (`ViTForImageClassification
.from_pretrained(directory)`, ...).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from saejax.backbones import _hf
from saejax.backbones.convert import to_torch
from saejax.backbones.families import get_family
from saejax.backbones.weights import SAFETENSORS


def save(directory, bb, params) -> str:
    """Writes `bb` and `params` into `directory` (created if needed; files there are replaced).

    Args:
        directory: where to write.
        bb: the `Backbone` (its config, processing and heads describe the files).
        params: its params pytree (`load`'s, or trained in saejax).

    Returns:
        The directory, as a string.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    directory = os.fspath(directory)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_dict(jax.device_get(params)).items()}
    state = to_torch(flat, get_family(bb.family).names(bb.config))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(_config_json(bb), f, indent=2)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(bb.processing.to_hf(), f, indent=2)
    save_file(state, os.path.join(directory, SAFETENSORS))
    return directory


def _config_json(bb) -> dict:
    if bb.text_config is None:
        return bb.config.to_dict()
    with _hf.quiet():  # the vision tower, its text tower and the projection's size, as CLIPModel's config
        full = _hf.config_class("CLIPConfig")(text_config=bb.text_config.to_dict(), vision_config=bb.config.to_dict(),
                                              projection_dim=int(bb.heads.projection))
    return full.to_dict()
