"""Tiny randomly initialised backbones, written as ordinary HF checkpoint directories.

For smoke runs and tests that need a backbone but no hub: the directory holds `config.json`,
`preprocessor_config.json` and `model.safetensors` under the PyTorch model's own weight names
(`saving.save`), so `load` reads it through the same path as a downloaded checkpoint (and
`transformers`' PyTorch classes read it too).

>>> path = create_random("clip", "/tmp/tiny-clip", hidden_size=32, num_hidden_layers=3,
...                      num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
>>> bb, params = load(path)
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax.traverse_util import unflatten_dict

from saejax.backbones import _hf
from saejax.backbones.base import Heads
from saejax.backbones.families import get_family, grid_of, make_backbone
from saejax.backbones.loading import at_resolution, target_shapes
from saejax.backbones.saving import save
from saejax.backbones.weights import SAFETENSORS
from saejax.checkpoint.staging import staged_directory


def random_params(shapes, seed: int, std: float = 0.02) -> dict[tuple, np.ndarray]:
    """Layer norms and layer scales at one, biases at zero, the rest N(0, std), for flat
    `{key: shape}` (sorted by key, so the same shapes and seed give the same params)."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in sorted(shapes.items()):
        if key[-1] == "bias":
            value = np.zeros(shape, np.float32)
        elif key[-1] == "scale":
            value = np.ones(shape, np.float32)
        else:
            value = (std * rng.standard_normal(shape)).astype(np.float32)
        params[key] = value
    return params


def _config(family: str, sizes):
    with _hf.quiet():
        return _hf.config_class(get_family(family).config_class)(**sizes)


def _processing(fam, cfg, input_size=None):
    """The family's processor, yielding `input_size` px (default: the config's image_size)."""
    processing = fam.default_processing(cfg)
    side = input_size or getattr(cfg, "image_size", None)
    if side is None or processing.output_size == (side, side):
        return processing
    return at_resolution(processing, fam.name, cfg, int(side))


def _heads(fam, cfg, grid, n_classes: int) -> Heads:
    heads = Heads(n_classes=int(n_classes))
    if n_classes and ("readout", "classifier", "kernel") not in target_shapes(fam, cfg, grid, heads):
        raise ValueError(f"n_classes={n_classes}: {fam.name} checkpoints carry no classification head "
                         "(vit, dinov2 and dinov2_registers do)")
    return heads


def create_random(family: str, directory: str, *, seed: int = 0, n_classes: int = 0, **sizes) -> str:
    """Write a randomly initialised `family` model to `directory` (reused if already there).

    Args:
        family: any of `saejax.backbones.FAMILIES`.
        directory: where to write the checkpoint.
        seed: seed of the random weights.
        n_classes: a classification head of this size (ViT, DINOv2), 0 for none.
        **sizes: `transformers` config fields (hidden_size, num_hidden_layers, image_size, ...).
            `image_size` is also the size `preprocess` produces, resized as the family's
            processor resizes (short side and centre crop, or straight to the square).

    Returns:
        `directory`.
    """
    fam = get_family(family)
    labels = {"id2label": {i: f"class_{i}" for i in range(n_classes)}} if n_classes else {}
    cfg = _config(family, {**sizes, **labels, "saejax_random_seed": seed})
    config_file = os.path.join(directory, "config.json")
    if os.path.isfile(config_file) and os.path.isfile(os.path.join(directory, SAFETENSORS)):
        with open(config_file) as f:
            if json.load(f) == json.loads(json.dumps(cfg.to_dict())):
                return directory
    processing = _processing(fam, cfg)
    grid = grid_of(family, cfg, processing)
    heads = _heads(fam, cfg, grid, n_classes)
    bb = make_backbone(family, cfg, dtype=np.float32, processing=processing, heads=heads)
    params = unflatten_dict(random_params(target_shapes(fam, cfg, grid, heads), seed))
    with staged_directory(directory) as staging:
        save(staging, bb, params)
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
            processor's; DINOv2's runs at 224 whatever its config says).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    fam = get_family(family)
    cfg = _config(family, sizes)
    processing = fam.default_processing(cfg)
    if input_size is not None:
        processing = at_resolution(processing, family, cfg, int(input_size))
    grid = grid_of(family, cfg, processing)
    heads = _heads(fam, cfg, grid, n_classes)
    shapes = target_shapes(fam, cfg, grid, heads)
    bb = make_backbone(family, cfg, dtype=jnp.dtype(dtype or jnp.float32), processing=processing, heads=heads,
                       interpolate=input_size is not None)
    return bb, unflatten_dict({k: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for k, s in shapes.items()})
