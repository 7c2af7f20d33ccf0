"""open_clip checkpoints (OpenAI CLIP as open_clip builds it, BioCLIP) mapped onto the CLIP family.

An open_clip ViT is the CLIP architecture under other names: `conv1` is the patch embedding,
`ln_pre` is CLIP's `pre_layrnorm`, each `resblock` is a CLIP encoder layer with its q, k, v
packed into one `in_proj_weight`, `ln_post` + `proj` are `post_layernorm` + `visual_projection`.
So a directory with `open_clip_config.json` and `open_clip_model.safetensors` (or
`open_clip_pytorch_model.bin`, read by the restricted unpickler that builds tensors only) loads
as a "clip" `Backbone`, with HF `CLIPVisionConfig` fields taken from `model_cfg.vision_cfg`:

    width -> hidden_size, layers -> num_hidden_layers, width / head_width (64) ->
    num_attention_heads, width * mlp_ratio (4) -> intermediate_size, image_size, patch_size,
    quick_gelu -> hidden_act "quick_gelu" (else "gelu": open_clip's nn.GELU is exact),
    embed_dim -> projection_dim.

`preprocess_cfg` gives the processor (`size`, `mean`, `std`, `interpolation`, `resize_mode`).
`pooled` is `ln_post(CLS)`; open_clip's `encode_image` is
`pooled @ saejax.backbones.clip_projection(params)`. Vision towers that are not this
architecture (ResNets, timm or HF towers, layer scale, attentional pooling, average pooling,
no `ln_pre`, ...) are refused with the config key that differs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from saejax.backbones import weights
from saejax.backbones.preprocess import BICUBIC, BILINEAR, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing
from saejax.checkpoint.errors import CheckpointError

CONFIG = "open_clip_config.json"
SAFETENSORS = "open_clip_model.safetensors"
PICKLE = "open_clip_pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, PICKLE)
# Hub repos in open_clip's layout that `load` fetches by name (OpenAI CLIP as open_clip builds it, BioCLIP).
HUB_IDS = ("timm/vit_base_patch16_clip_224.openai", "timm/vit_large_patch14_clip_224.openai", "imageomics/bioclip",
           "imageomics/bioclip-2")

# vision_cfg keys with the value the CLIP architecture needs (open_clip's defaults).
_MUST_BE = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pool_type": "tok",
            "final_ln_after_pool": False, "pos_embed_type": "learnable", "block_type": None, "qk_norm": False,
            "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
            "scale_fc": False, "input_patchnorm": False, "global_average_pool": False, "timm_model_name": None,
            "hf_model_name": None, "act_kwargs": None, "norm_kwargs": None}
_INTERPOLATION = {"bicubic": BICUBIC, "bilinear": BILINEAR}

_RENAMES = (
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.ln_([12])\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.", r"vision_model.encoder.layers.\1.self_attn."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"vision_model.encoder.layers.\1.mlp.fc1."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"vision_model.encoder.layers.\1.mlp.fc2."),
)


def is_open_clip(path: str) -> bool:
    """True for a directory in open_clip's hub layout: open_clip_config.json, and no
    `transformers` config.json (timm's hub repos add a config.json without a `model_type`)."""
    if not os.path.isfile(os.path.join(path, CONFIG)):
        return False
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            return "model_type" not in json.loads(f.read())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False  # an unreadable config.json: the transformers path names the file


def vision_config(config: Mapping, path: str) -> tuple[dict, int]:
    """`(CLIPVisionConfig fields, projection size)` from a parsed open_clip_config.json."""
    where = f"{path}/{CONFIG}"
    model = config.get("model_cfg")
    if not isinstance(model, Mapping) or not isinstance(model.get("vision_cfg"), Mapping):
        raise CheckpointError(f"{where}: no model_cfg.vision_cfg object")
    vision = model["vision_cfg"]
    if not isinstance(vision.get("layers"), int) or isinstance(vision.get("layers"), bool):
        raise ValueError(f"{where}: vision_cfg.layers is {vision.get('layers')!r}; only ViT towers (an int number of "
                         "layers) load, not ResNets")
    differs = {k: vision[k] for k, v in _MUST_BE.items() if k in vision and vision[k] != v and vision[k] not in ({}, 0)}
    if differs:
        raise ValueError(f"{where}: vision_cfg {differs} is not the CLIP ViT architecture saejax maps open_clip onto "
                         f"(it needs {({k: _MUST_BE[k] for k in differs})})")
    width, mlp_ratio = int(vision.get("width", 768)), float(vision.get("mlp_ratio", 4.0))
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise ValueError(f"{where}: vision_cfg width {width} is not a multiple of head_width {head_width}")
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if not (isinstance(size, int) and isinstance(patch, int)):
        raise ValueError(f"{where}: only square image_size and patch_size (ints) load; got {size!r}, {patch!r}")
    fields = dict(hidden_size=width, intermediate_size=int(width * mlp_ratio), num_hidden_layers=int(vision["layers"]),
                  num_attention_heads=width // head_width, image_size=size, patch_size=patch, layer_norm_eps=1e-5,
                  hidden_act="quick_gelu" if model.get("quick_gelu", False) else "gelu",
                  projection_dim=int(model.get("embed_dim", 512)))
    return fields, fields["projection_dim"]


def processing(config: Mapping, image_size: int, path: str) -> ImageProcessing:
    """open_clip's eval transform from `preprocess_cfg`: resize (short side, or squash), centre
    crop, ToTensor, Normalize; OpenAI CLIP statistics when absent."""
    pre = config.get("preprocess_cfg") or {}
    size = pre.get("size", image_size)
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int):
        raise ValueError(f"{path}/{CONFIG}: preprocess_cfg.size {size!r} is not square")
    resample = _INTERPOLATION.get(pre.get("interpolation", "bicubic"))
    if resample is None:
        raise ValueError(f"{path}/{CONFIG}: preprocess_cfg.interpolation {pre.get('interpolation')!r} is not one of "
                         f"{sorted(_INTERPOLATION)}")
    mean, std = tuple(pre.get("mean", OPENAI_CLIP_MEAN)), tuple(pre.get("std", OPENAI_CLIP_STD))
    mode = pre.get("resize_mode", "shortest")
    if mode == "shortest":
        return ImageProcessing(resize_shortest=size, crop=(size, size), resample=resample, mean=mean, std=std)
    if mode == "squash":
        return ImageProcessing(resize_to=(size, size), resample=resample, mean=mean, std=std)
    raise ValueError(f"{path}/{CONFIG}: preprocess_cfg.resize_mode {mode!r} is not supported ('shortest' or 'squash')")


def find_weights(path: str) -> list[str]:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise FileNotFoundError(f"no open_clip weights in {path!r}: looked for {', '.join(WEIGHT_FILES)}; found "
                            f"{sorted(os.listdir(path))}")


def read_state(file: str) -> dict[str, np.ndarray]:
    """The visual tower's weights under HF CLIPVisionModel + visual_projection names (numpy, no torch)."""
    if file.endswith(".bin"):
        from saejax.checkpoint.saev import read_torch_state_dict  # noqa: PLC0415

        raw = read_torch_state_dict(file)
    else:
        raw = weights.read_safetensors([file])
    state = {}
    for name, value in raw.items():
        if name == "visual.proj":  # [width, embed] used as x @ proj; a torch Linear weight is [out, in]
            state["visual_projection.weight"] = np.ascontiguousarray(value.T)
            continue
        renamed = name
        for pattern, replacement in _RENAMES:
            renamed = re.sub(pattern, replacement, renamed)
        if renamed == name:
            continue  # the text tower, logit_scale, ...
        if renamed.endswith(("in_proj_weight", "in_proj_bias")):
            stem, leaf = renamed.rsplit(".", 1)
            for part, piece in zip("qkv", np.split(value, 3, axis=0), strict=True):
                state[f"{stem}.{part}_proj.{'weight' if leaf == 'in_proj_weight' else 'bias'}"] = piece
        else:
            state[renamed] = value
    return {k: weights.as_float32(v) for k, v in state.items()}
