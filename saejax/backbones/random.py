"""Tiny randomly initialised backbones, written as ordinary HF checkpoint directories.

For smoke runs and tests that need a backbone but no hub: the directory holds `config.json`,
`preprocessor_config.json` and the weights (`flax_model.msgpack` for the `transformers` Flax
families; for saejax's own families, `model.safetensors` under saejax's own parameter keys,
which `load` reads as it reads PyTorch names), and `load` reads it like any checkpoint.

>>> path = create_random("clip", "/tmp/tiny-clip", hidden_size=32, num_hidden_layers=3,
...                      num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
>>> bb, params = load(path)
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import serialization
from flax.traverse_util import unflatten_dict

from saejax.backbones import _hf
from saejax.backbones.families import OWN_FAMILIES
from saejax.backbones.loading import _configs, _Heads, _target_shapes
from saejax.backbones.weights import FLAX_MSGPACK, SAFETENSORS
from saejax.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from saejax.checkpoint.staging import staged_directory

_CONFIG_CLASSES = {"clip": "CLIPVisionConfig", "dinov2": "Dinov2Config", "dinov2_registers": "Dinov2WithRegistersConfig",
                   "vit": "ViTConfig", "siglip": "SiglipVisionConfig", "siglip2": "Siglip2VisionConfig",
                   "dinov3": "DINOv3ViTConfig"}


def _random_params(shapes, seed: int, std: float = 0.02) -> dict[tuple, np.ndarray]:
    """Layer norms at identity, biases at zero, layer scales at one, the rest N(0, std)."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in sorted(shapes.items()):
        name = key[-1]
        if name == "bias":
            value = np.zeros(shape, np.float32)
        elif name in ("scale", "lambda1") or (name == "weight" and "layer_scale" in "/".join(key)):
            value = np.ones(shape, np.float32)
        else:
            value = (std * rng.standard_normal(shape)).astype(np.float32)
        params[key] = value
    return params


def create_random(family: str, directory: str, *, seed: int = 0, n_classes: int = 0, **sizes) -> str:
    """Write a randomly initialised `family` model to `directory` (reused if already there).

    Args:
        family: any of `saejax.backbones.FAMILIES`.
        directory: where to write the checkpoint.
        seed: seed of the random weights.
        n_classes: a classification head of this size (ViT, DINOv2 only), 0 for none.
        **sizes: `transformers` config fields (hidden_size, num_hidden_layers, image_size, ...).
            `image_size` is also the size `preprocess` produces (resize short side + crop).

    Returns:
        `directory`.
    """
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(_CONFIG_CLASSES)}")
    if n_classes and family not in ("vit", "dinov2"):
        raise ValueError(f"n_classes={n_classes}: only vit and dinov2 checkpoints carry a classification head")
    with _hf.quiet():
        cfg = getattr(_hf.hf(), _CONFIG_CLASSES[family])(**sizes)
    config_json = cfg.to_dict()
    if n_classes:
        config_json["id2label"] = {str(i): f"class_{i}" for i in range(n_classes)}
        config_json["label2id"] = {f"class_{i}": i for i in range(n_classes)}
    config_json["saejax_random_seed"] = seed
    own = OWN_FAMILIES.get(family)
    if own is not None:
        return _write_own(own, cfg, config_json, directory, seed)
    size = int(cfg.image_size)
    mean, std = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "vit": ((0.5,) * 3, (0.5,) * 3)}.get(
        family, (IMAGENET_MEAN, IMAGENET_STD))
    processor = {"do_resize": True, "size": {"shortest_edge": size}, "do_center_crop": True,
                 "crop_size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}

    config_file = os.path.join(directory, "config.json")
    if os.path.isfile(config_file) and os.path.isfile(os.path.join(directory, FLAX_MSGPACK)):
        with open(config_file) as f:
            if json.load(f) == json.loads(json.dumps(config_json)):
                return directory

    flat = _random_params(_hf_shapes(family, cfg, n_classes)[1], seed)

    with staged_directory(directory) as staging:
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        with open(os.path.join(staging, "preprocessor_config.json"), "w") as f:
            json.dump(processor, f, indent=2)
        with open(os.path.join(staging, FLAX_MSGPACK), "wb") as f:
            f.write(serialization.msgpack_serialize(unflatten_dict(flat)))
    return directory


def _hf_shapes(family: str, cfg, n_classes: int):
    """`(the config the loader builds, {flax key: shape})` of a `transformers`-Flax family."""
    if family == "dinov2_registers":  # the loader builds registers on top of a DINOv2 config
        cfg = _configs(cfg.to_dict(), "<config>")[1]
    heads = _Heads(n_classes=n_classes, classifier_in=cfg.hidden_size * (2 if family.startswith("dinov2") else 1))
    return cfg, _target_shapes(family, cfg, None, heads)


def _write_own(own, cfg, config_json, directory, seed) -> str:
    """An own-family checkpoint: config.json, the family's default processor, model.safetensors."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    processing = own.default_processing(cfg)
    size = processing.output_size[0]
    processor = {"do_resize": True, "size": {"height": size, "width": size}, "resample": processing.resample,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(processing.mean), "image_std": list(processing.std)}
    config_file = os.path.join(directory, "config.json")
    if os.path.isfile(config_file) and os.path.isfile(os.path.join(directory, SAFETENSORS)):
        with open(config_file) as f:
            if json.load(f) == json.loads(json.dumps(config_json)):
                return directory
    shapes = own.build(cfg, np.float32, (size // int(cfg.patch_size),) * 2).param_shapes()
    flat = _random_params(shapes, seed)
    with staged_directory(directory) as staging:
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        with open(os.path.join(staging, "preprocessor_config.json"), "w") as f:
            json.dump(processor, f, indent=2)
        save_file({".".join(k): v for k, v in flat.items()}, os.path.join(staging, SAFETENSORS))
    return directory


def abstract(family: str, *, n_classes: int = 0, dtype=None, input_size: int | None = None, **sizes):
    """`(Backbone, params)` of a `family` model with these `transformers` config fields, where
    params is a pytree of `jax.ShapeDtypeStruct` (float32): no weights made, read or written.
    For planning: `jax.jit(...).lower(params, ...)` compiles the model's programs at full size
    (`benchmarks/paper_scale.py`).

    Args:
        family, n_classes: as `create_random`.
        **sizes: as `create_random` (e.g. `hidden_size=768, num_hidden_layers=12,
            patch_size=16, image_size=224` for ViT-B/16).
        dtype: the matmul dtype (`Backbone.dtype`; float32 when None).
        input_size: the side of the images the model runs at (default: the family's hub
            processor at `image_size`; DINOv2's runs at 224 whatever its config says).
    """
    import dataclasses  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from saejax.backbones.families import make_backbone  # noqa: PLC0415
    from saejax.backbones.loading import default_processing  # noqa: PLC0415

    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(_CONFIG_CLASSES)}")
    with _hf.quiet():
        cfg = getattr(_hf.hf(), _CONFIG_CLASSES[family])(**sizes)
    own = OWN_FAMILIES.get(family)
    if own is not None:
        processing = own.default_processing(cfg)
        side = processing.output_size[0]
        shapes = own.build(cfg, np.float32, (side // int(cfg.patch_size),) * 2).param_shapes()
    else:
        processing = default_processing(family, int(cfg.image_size))
        if input_size is not None:
            side = (int(input_size),) * 2
            processing = dataclasses.replace(processing, **(
                {"resize_to": side} if processing.resize_to else {"resize_shortest": side[0], "crop": side}))
        cfg, shapes = _hf_shapes(family, cfg, n_classes)
    bb = make_backbone(family, cfg, dtype=jnp.dtype(dtype or jnp.float32), n_classes=n_classes, processing=processing)
    return bb, unflatten_dict({k: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for k, s in shapes.items()})
