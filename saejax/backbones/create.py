"""ViT image classifiers trained in saejax, on the `vit` family's own modules, saved as HF checkpoints.

`create_vit_classifier` builds a ViT classifier (a `Backbone` with its classification head)
and random params initialised as `transformers` initialises ViTs; `save_hf_checkpoint` writes
an ordinary HF checkpoint directory (`config.json`, `model.safetensors` under PyTorch's names,
`preprocessor_config.json` for `ViTImageProcessor`), which `saejax.backbones.load` and
`transformers`' `ViTForImageClassification.from_pretrained(dir)` read.

>>> apply_fn, params = create_vit_classifier(dict(hidden_size=64, num_hidden_layers=4,
...     num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=4, num_labels=16),
...     jax.random.key(0))
>>> logits = apply_fn(params, pixels)          # float [B, 32, 32, 3] (NHWC, normalised) -> [B, 16]
>>> save_hf_checkpoint("/tmp/vit", config, params)
>>> bb, bb_params = saejax.backbones.load("/tmp/vit")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax.traverse_util import unflatten_dict

from saejax.backbones import _hf
from saejax.backbones.base import Heads
from saejax.backbones.families import make_backbone
from saejax.backbones.preprocess import BILINEAR, HALF, ImageProcessing
from saejax.backbones.saving import save

__all__ = ["create_vit_classifier", "save_hf_checkpoint", "vit_config"]


def vit_config(config: Mapping):
    """A `transformers.ViTConfig` from a dict of its fields (`num_labels` or `id2label` sets the head)."""
    with _hf.quiet():
        return _hf.config_class("ViTConfig")(**dict(config))


def _classifier(cfg, dtype=jnp.float32, image_mean=HALF, image_std=HALF):
    s = int(cfg.image_size)
    processing = ImageProcessing(resize_to=(s, s), resample=BILINEAR, mean=tuple(image_mean), std=tuple(image_std))
    return make_backbone("vit", cfg, dtype=dtype, processing=processing, heads=Heads(n_classes=int(cfg.num_labels)))


def init_like_transformers(shapes: Mapping[tuple, tuple], key: jax.Array, init_range: float) -> dict:
    """Params initialised as `transformers`' Flax ViT initialised them: every kernel, the CLS
    token and the positions from `variance_scaling(init_range**2, "fan_in", "truncated_normal")`,
    biases at zero, layer norms at one. Returns a nested dict of float32 arrays."""
    init = jax.nn.initializers.variance_scaling(init_range ** 2, "fan_in", "truncated_normal")
    keys = jax.random.split(key, len(shapes))
    flat = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items())):
        if name[-1] == "bias":
            flat[name] = jnp.zeros(shape, jnp.float32)
        elif name[-1] == "scale":
            flat[name] = jnp.ones(shape, jnp.float32)
        else:
            flat[name] = init(k, shape, jnp.float32)
    return unflatten_dict(flat)


def create_vit_classifier(config: Mapping, key: jax.Array, *, dtype=jnp.float32,
                          init_range: float | None = None) -> tuple[Callable, dict]:
    """A ViT image classifier as a pure apply function and random params.

    Args:
        config: `ViTConfig` fields, e.g. `dict(hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=4,
            num_labels=16)`. The apply function runs deterministically (no dropout).
        key: a `jax.random.key` for the initialisation (`init_like_transformers`).
        dtype: the matmul dtype (`Backbone.dtype`; params are float32).
        init_range: `initializer_range` for the random initialisation only (the apply function
            and a saved config keep `config`'s). `transformers` draws every kernel with variance
            `initializer_range**2 / fan_in`: std 0.0025 at width 64 for the default 0.02, so
            small, which makes a tiny ViT trained from scratch sit on a long plateau. 1.0 gives
            LeCun-normal kernels (std `1 / sqrt(fan_in)`) and trains several times faster.

    Returns:
        `(apply_fn, params)`: `apply_fn(params, pixels) -> logits`, pixels float
        [B, S, S, 3] (NHWC, normalised as `preprocessor_config.json` says: (x / 255 - 0.5) / 0.5
        here), logits [B, num_labels]; `apply_fn(params, pixels, return_tokens=True)` returns
        `(logits, tokens)` with tokens [B, 1 + grid**2, hidden] the final-layernorm tokens (CLS
        first, then the patches row-major: HF `last_hidden_state`); params the `vit` family's
        tree (`{"embed", "blocks", "readout"}`, the classifier at `readout/classifier`), what
        `saejax.backbones.load` returns for the saved checkpoint. `apply_fn` is pure and jittable.
    """
    cfg = vit_config(config)
    bb = _classifier(cfg, dtype)
    rng = float(cfg.initializer_range if init_range is None else init_range)
    params = jax.jit(lambda k: init_like_transformers(bb._impl.param_shapes(), k, rng))(key)

    def apply_fn(params, pixels, *, return_tokens: bool = False):
        out = bb.forward(params, pixels)
        return (out.logits, out.tokens) if return_tokens else out.logits

    return apply_fn, params


def save_hf_checkpoint(directory: str | os.PathLike, config: Mapping, params, *, image_mean=HALF,
                       image_std=HALF) -> str:
    """Writes a ViT classifier as an HF checkpoint directory that `saejax.backbones.load` and
    `transformers`' `ViTForImageClassification` read.

    Writes `config.json`, `model.safetensors` (`saejax.backbones.saving.save`) and
    `preprocessor_config.json` (a `ViTImageProcessor`: resize to the model's image size,
    bilinear, which is an exact copy for images already that size; rescale by 1/255; normalise
    with `image_mean`, `image_std`).

    Args:
        directory: where to write (created if needed; existing files are replaced).
        config: the `ViTConfig` fields the params were made with.
        params: the classifier's params, as from `create_vit_classifier`.
        image_mean: per-channel normalisation mean.
        image_std: per-channel normalisation std.

    Returns:
        The directory, as a string.
    """
    cfg = vit_config(config)
    cfg.architectures = ["ViTForImageClassification"]
    return save(directory, _classifier(cfg, image_mean=image_mean, image_std=image_std), params)
