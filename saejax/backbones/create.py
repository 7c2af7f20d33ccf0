"""Building and saving HF Flax ViT classifiers from a config dict (for models trained in saejax).

`create_vit_classifier` builds `transformers`' `FlaxViTForImageClassificationModule` and its
random params; `save_hf_checkpoint` writes an ordinary HF checkpoint directory (`config.json`,
`flax_model.msgpack`, `preprocessor_config.json`, exactly what `FlaxViTForImageClassification
.save_pretrained` and `ViTImageProcessor.save_pretrained` write), which `saejax.backbones.load`
and `transformers` (`FlaxViTForImageClassification.from_pretrained(dir)`, or the PyTorch class
with `from_flax=True`) read.

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

from saejax.backbones import _hf
from saejax.backbones.preprocess import BILINEAR, HALF

__all__ = ["create_vit_classifier", "save_hf_checkpoint", "vit_config"]


def vit_config(config: Mapping):
    """A `transformers.ViTConfig` from a dict of its fields (`num_labels` or `id2label` sets the head)."""
    config = dict(config)
    t = _hf.hf()
    with _hf.quiet():
        return t.ViTConfig(**config)


def create_vit_classifier(config: Mapping, key: jax.Array, *, dtype=jnp.float32,
                          init_range: float | None = None) -> tuple[Callable, dict]:
    """HF's Flax ViT image classifier as a pure apply function and random params.

    Args:
        config: `ViTConfig` fields, e.g. `dict(hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=4,
            num_labels=16)`. Dropout defaults to 0 in `ViTConfig`; the apply function runs
            deterministically.
        key: a `jax.random.key` for the initialisation (HF's initialisers).
        dtype: computation dtype (params are float32).
        init_range: `initializer_range` for the random initialisation only (the apply function
            and a saved config keep `config`'s). HF's Flax ViT draws every kernel with variance
            `initializer_range**2 / fan_in`: std 0.0025 at width 64 for the default 0.02, so
            small, which makes a tiny ViT trained from scratch sit on a long plateau. 1.0 gives
            LeCun-normal kernels (std `1 / sqrt(fan_in)`) and trains several times faster.

    Returns:
        `(apply_fn, params)`: `apply_fn(params, pixels) -> logits`, pixels float
        [B, S, S, 3] (NHWC, normalised as `preprocessor_config.json` says: (x / 255 - 0.5) / 0.5
        here), logits [B, num_labels]; `apply_fn(params, pixels, return_tokens=True)` returns
        `(logits, tokens)` with tokens [B, 1 + grid**2, hidden] the final-layernorm tokens (CLS
        first, then the patches row-major: HF `last_hidden_state`); params the nested dict `{"vit": ..., "classifier": ...}`
        of `FlaxViTForImageClassification`. `apply_fn` is pure and jittable.
    """
    cfg = vit_config(config)
    classes = _hf.flax_module("vit.modeling_flax_vit").FlaxViTForImageClassificationModule
    module = classes(cfg, dtype=dtype)
    init_module = module if init_range is None else classes(vit_config({**dict(config), "initializer_range": init_range}),
                                                            dtype=dtype)
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    with _hf.quiet():
        params = jax.jit(lambda k: init_module.init(k, dummy)["params"])(key)
    params = jax.tree.map(lambda x: x, dict(params))  # a plain nested dict

    def tokens_and_logits(m, pixels):
        tokens = m.vit(pixels, deterministic=True, return_dict=False)[0]
        return m.classifier(tokens[:, 0]), tokens

    def apply_fn(params, pixels, *, return_tokens: bool = False):
        logits, tokens = module.apply({"params": params}, pixels, method=tokens_and_logits)
        return (logits, tokens) if return_tokens else logits

    return apply_fn, params


def save_hf_checkpoint(directory: str | os.PathLike, config: Mapping, params, *, image_mean=HALF,
                       image_std=HALF) -> str:
    """Writes a ViT classifier as an HF checkpoint directory that `saejax.backbones.load` reads.

    Writes `config.json` and `flax_model.msgpack` (via `FlaxViTForImageClassification
    .save_pretrained`) and `preprocessor_config.json` (a `ViTImageProcessor`: resize to the
    model's image size, bilinear, which is an exact copy for images already that size; rescale
    by 1/255; normalise with `image_mean`, `image_std`).

    Args:
        directory: where to write (created if needed; existing weight files are replaced).
        config: the `ViTConfig` fields the params were made with.
        params: `{"vit": ..., "classifier": ...}` as from `create_vit_classifier`.
        image_mean: per-channel normalisation mean.
        image_std: per-channel normalisation std.

    Returns:
        The directory, as a string.
    """
    directory = os.fspath(directory)
    cfg = vit_config(config)
    t = _hf.hf()
    with _hf.quiet():
        model = t.FlaxViTForImageClassification(cfg, _do_init=False)
        model.save_pretrained(directory, params=jax.device_get(params))
        size = int(cfg.image_size)
        processor = t.ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=BILINEAR,
                                        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                        image_mean=list(image_mean), image_std=list(image_std))
        processor.save_pretrained(directory)
    return directory
