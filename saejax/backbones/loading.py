"""`load`: hub id or local directory -> (`Backbone`, params), converting PyTorch weights without torch.

The family comes from config.json's `model_type` (`MODEL_TYPES`); a directory in open_clip's
layout (`open_clip_config.json`) loads as CLIP (`saejax.backbones.open_clip`). Own-module
families (`saejax.backbones.families.OWN_FAMILIES`) rename PyTorch weights with their own table
(`layers.convert_torch`); the `transformers` Flax families use HF's rule below.

Weights are read from, in this order of preference, `model.safetensors`, sharded
`model.safetensors.index.json` + `model-0000x-of-0000y.safetensors` (merged here: `transformers`
4.x Flax cannot load sharded safetensors), or `flax_model.msgpack`. PyTorch safetensors are
renamed / transposed to the Flax layout with `transformers`' own rule
(`rename_key_and_reshape_tensor`), checked against the parameter shapes of the HF Flax model
(obtained with `jax.eval_shape`, so no ~10 s eager init), and cached as a flat safetensors file
under `cache_dir` (default `~/.cache/saejax`, or `$SAEJAX_CACHE`) keyed by a hash of the
source files' names, sizes and modification times plus `config.json`, so the second load
skips the conversion.

Long because it is the whole loading path (hub names, configs, the heads, weight conversion and its checks); the readers are in `weights`, the cache in `cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from saejax.backbones import _hf, cache, open_clip, weights
from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import check_finite
from saejax.backbones.families import FAMILIES, HF_FAMILIES, OWN_FAMILIES, make_backbone
from saejax.backbones.layers import convert_torch
from saejax.backbones.base import LoadInfo
from saejax.backbones.model import Backbone
from saejax.backbones.preprocess import (
    BICUBIC,
    BILINEAR,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessing,
)

log = logging.getLogger(__name__)

# Hub ids saejax knows, and their family. Other hub models: download them yourself
# (huggingface_hub.snapshot_download) and pass the directory.
KNOWN_MODELS = {
    "openai/clip-vit-base-patch16": "clip",
    "openai/clip-vit-base-patch32": "clip",
    "openai/clip-vit-large-patch14": "clip",
    "openai/clip-vit-large-patch14-336": "clip",
    "facebook/dinov2-small": "dinov2",
    "facebook/dinov2-base": "dinov2",
    "facebook/dinov2-large": "dinov2",
    "facebook/dinov2-giant": "dinov2",
    "facebook/dinov2-with-registers-small": "dinov2_registers",
    "facebook/dinov2-with-registers-base": "dinov2_registers",
    "facebook/dinov2-with-registers-large": "dinov2_registers",
    "facebook/dinov2-with-registers-giant": "dinov2_registers",
    "google/vit-base-patch16-224": "vit",
    "google/vit-large-patch16-224": "vit",
    "google/vit-base-patch16-224-in21k": "vit",
    **{hub_id: family.name for family in OWN_FAMILIES.values() for hub_id in family.hub_ids},
    **{hub_id: "clip" for hub_id in open_clip.HUB_IDS},  # open_clip's layout, mapped onto CLIP
}

# config.json `model_type` -> family.
MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_registers",
    "vit": "vit",
    **{model_type: family.name for family in OWN_FAMILIES.values() for model_type in family.model_types},
}



def load(name_or_dir, *, dtype=jnp.float32, cache_dir=None, image_size: int | None = None) -> tuple[Backbone, dict]:
    """Loads a vision transformer as a `Backbone` and its params pytree.

    Args:
        name_or_dir: A known hub id (see `KNOWN_MODELS`, e.g. "openai/clip-vit-base-patch16",
            "google/siglip2-base-patch16-224", "facebook/dinov3-vitb16-pretrain-lvd1689m",
            "imageomics/bioclip") or a local directory with `config.json` and
            weights: `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` +
            `model.safetensors.index.json`, or `flax_model.msgpack` (transformers Flax families
            only). A `preprocessor_config.json` there defines `preprocess`; without one the
            family's standard processor is used. Or an open_clip directory:
            `open_clip_config.json` + `open_clip_model.safetensors` or
            `open_clip_pytorch_model.bin` (read without running pickle code).
        dtype: The matmul dtype: float32, or bfloat16 for bf16 inputs to every dense layer's
            matmul with float32 accumulation; params, norms, softmax, the residual stream and
            the captured activations stay float32, as under `torch.autocast` (see
            `Backbone.dtype`).
        cache_dir: Where converted params are cached (default `$SAEJAX_CACHE` or
            `~/.cache/saejax`); `False` disables the cache.
        image_size: Run at this resolution instead of the processor's: any multiple of the
            patch size. The position embeddings are interpolated to the new grid as
            `transformers` does (DINOv2 always; CLIP, ViT and SigLIP as with
            `interpolate_pos_encoding=True`; SigLIP 2 NaFlex resizes its grid always; DINOv3's
            rotary embeddings need nothing). `preprocess` then yields `image_size` squares with
            the checkpoint's resampling and normalisation (ViT, SigLIP, DINOv3: resized to the
            square; the others: short side resized, centre crop); `grid` and the token layout
            follow.
            None: the checkpoint's processor decides.

    Returns:
        `(bb, params)`: the `Backbone` and a nested dict of float32 jax arrays laid out as the
        HF Flax model's params (see `saejax.backbones.model`).

    Raises:
        ValueError: Unknown name, unsupported `model_type`, weights that do not fit the config, or an
            `image_size` that is not a multiple of the patch size.
        CheckpointError: (a ValueError) a file that cannot be read (bad JSON, truncated or corrupt
            msgpack or safetensors), weights that are not finite or not floats, or weights of
            blocks the config does not have; the message names the file and the tensor.
        FileNotFoundError: A directory without `config.json` or without weights.
        OSError: A known hub id that could not be fetched (e.g. no network).

    >>> bb, params = load("openai/clip-vit-base-patch16")             # doctest: +SKIP
    >>> bb.family, bb.d_model, bb.n_layers, bb.grid                   # doctest: +SKIP
    ('clip', 768, 12, (14, 14))
    """
    path = resolve(name_or_dir)
    if open_clip.is_open_clip(path):
        return _load_open_clip(path, dtype, cache_dir, image_size)
    cfg_json = weights.read_json(os.path.join(path, "config.json"), what="config.json")
    family, vision_cfg, full_cfg = _configs(cfg_json, path)
    with _config_errors(path):
        vision_cfg.num_hidden_layers = int(vision_cfg.num_hidden_layers)  # a string here fails later, unnamed
        processing = _processing(path, family, vision_cfg)
    if image_size is not None:
        processing = at_resolution(processing, family, vision_cfg, image_size, path)
    kind, files = weights.find_weights(path)

    own = OWN_FAMILIES.get(family)
    if own is not None:
        flat, info = _load_own(own, path, kind, files, vision_cfg, processing, cache_dir)
        heads = _Heads()
    elif kind == weights.FLAX_MSGPACK:
        root = HF_FAMILIES[family].root
        flat = weights.read_msgpack(files[0], root)
        heads = _heads_from_flax(flat, root)
        with _config_errors(path):
            target = _target_shapes(family, vision_cfg, full_cfg, heads)
        flat = _check(flat, target, files[0], family, vision_cfg.num_hidden_layers)
        info = LoadInfo(path=path, weight_files=tuple(files), cache_file=None, from_cache=False)
    else:
        root = HF_FAMILIES[family].root
        heads = _heads_from_torch(weights.safetensors_shapes(files), root)
        with _config_errors(path):
            target = _target_shapes(family, vision_cfg, full_cfg, heads)
        flat, info = _convert_cached(path, family, kind, files, target, cache_dir,
                                     lambda state: _convert(state, target, root), vision_cfg.num_hidden_layers)

    with _config_errors(path):
        bb = make_backbone(family, vision_cfg, dtype=dtype, n_classes=heads.n_classes, processing=processing,
                           load_info=info, interpolate=image_size is not None)
    if full_cfg is not None and heads.has_text:
        bb = dataclasses.replace(bb, text_config=full_cfg.text_config)
    params = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    return bb, params


def _convert_cached(path, family, kind, files, target, cache_dir, convert, n_layers, *, read=None,
                    config_file="config.json"):
    """Converted params from the cache, or read (default: PyTorch safetensors), converted, checked and cached."""
    cache_file = None if cache_dir is False else cache.cache_file(cache_dir, family, path, files, config_file)
    flat = cache.read_cache(cache_file, target)
    from_cache = flat is not None
    if flat is None:
        state = read() if read else weights.read_safetensors(files, kind)
        flat = _check(convert(state), target, path, family, n_layers, names=list(state))
        cache.write_cache(cache_file, flat, path)
    return flat, LoadInfo(path=path, weight_files=tuple(files), cache_file=cache_file, from_cache=from_cache)


def _load_open_clip(path, dtype, cache_dir, image_size):
    """An open_clip directory as a "clip" Backbone (see `saejax.backbones.open_clip`)."""
    config = weights.read_json(os.path.join(path, open_clip.CONFIG), what=open_clip.CONFIG)
    fields, projection = open_clip.vision_config(config, path)
    with _hf.quiet(), _config_errors(path):
        cfg = _hf.hf().CLIPVisionConfig(**fields)
    processing = open_clip.processing(config, cfg.image_size, path)
    if image_size is not None:
        processing = at_resolution(processing, "clip", cfg, image_size, path)
    files = open_clip.find_weights(path)
    with _config_errors(path):
        target = _target_shapes("clip", cfg, None, _Heads(projection=projection))
    flat, info = _convert_cached(path, "clip", None, files, target, cache_dir,
                                 lambda state: _convert(state, target, HF_FAMILIES["clip"].root), cfg.num_hidden_layers,
                                 read=lambda: open_clip.read_state(files[0]), config_file=open_clip.CONFIG)
    with _config_errors(path):
        bb = make_backbone("clip", cfg, dtype=dtype, n_classes=0, processing=processing, load_info=info,
                           interpolate=image_size is not None)
    return bb, unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def _load_own(own, path, kind, files, cfg, processing, cache_dir):
    """Params of an own-module family (`saejax.backbones.layers`) from PyTorch safetensors."""
    if kind == weights.FLAX_MSGPACK:
        raise FileNotFoundError(f"{path}: the {own.name} family loads PyTorch safetensors ({weights.SAFETENSORS}); "
                                f"{weights.FLAX_MSGPACK} is a transformers Flax format that {own.name} never had")
    size = processing.output_size[0]
    with _config_errors(path):
        target = own.build(cfg, jnp.float32, (size // int(cfg.patch_size),) * 2).param_shapes()

    def convert(state):
        flat, unused = convert_torch(state, own.renames, target)
        if unused:
            log.debug("ignoring %d checkpoint weights the model does not use: %s", len(unused), unused[:10])
        return flat

    return _convert_cached(path, own.name, kind, files, target, cache_dir, convert, cfg.num_hidden_layers)


# ---------------------------------------------------------------------- resolving names
def resolve(name_or_dir) -> str:
    """Returns the local model directory for a directory path or a known hub id (downloading it)."""
    name = os.fspath(name_or_dir)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{name!r} is a file; pass the model directory that holds config.json and the weights")
    if name in KNOWN_MODELS:
        return _download(name)
    raise ValueError(
        f"unknown backbone {name!r}: not a local directory and not a known hub id. Known families: "
        f"{', '.join(FAMILIES)}. Known hub ids: {', '.join(KNOWN_MODELS)}. For another checkpoint of these "
        "families, pass a local directory with config.json + weights (e.g. from save_pretrained or "
        "huggingface_hub.snapshot_download).")


def _download(repo_id: str) -> str:
    """Fetches config, preprocessor config and weights of a hub model (HF cache); clear error offline."""
    import huggingface_hub as hub  # noqa: PLC0415

    # (+ CLIP's tokenizer files, for prompts to `clip_text_embeddings`; absent files are skipped)
    base = ["config.json", "preprocessor_config.json", open_clip.CONFIG, "vocab.json", "merges.txt",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    errors = []
    try:
        available = set(hub.list_repo_files(repo_id))
        if repo_id in open_clip.HUB_IDS:
            patterns = [next((w for w in open_clip.WEIGHT_FILES if w in available), open_clip.PICKLE)]
        elif weights.SAFETENSORS in available:
            patterns = [weights.SAFETENSORS]
        elif weights.SAFETENSORS_INDEX in available:
            patterns = [weights.SAFETENSORS_INDEX, "model-*-of-*.safetensors"]
        elif weights.FLAX_MSGPACK in available:
            patterns = [weights.FLAX_MSGPACK]
        else:
            raise FileNotFoundError(f"hub repo {repo_id!r} has none of {', '.join(weights.WEIGHT_FILES)}")
        return hub.snapshot_download(repo_id, allow_patterns=base + patterns)
    except Exception as e:  # noqa: BLE001  (network errors come in many types)
        errors.append(e)
    try:  # a snapshot already in the local HF cache works offline
        return hub.snapshot_download(repo_id, local_files_only=True,
                                     allow_patterns=base + [weights.SAFETENSORS, weights.SAFETENSORS_INDEX, "model-*-of-*.safetensors",
                                                            weights.FLAX_MSGPACK, *open_clip.WEIGHT_FILES])
    except Exception as e:  # noqa: BLE001
        errors.append(e)
    first = errors[0]
    raise OSError(
        f"could not fetch {repo_id!r} from the Hugging Face hub ({type(first).__name__}: {str(first)[:200]}). "
        "Without network access, pass a local directory with config.json and weights instead "
        f"({weights.SAFETENSORS}, or {weights.SAFETENSORS_INDEX} + its shards, or {weights.FLAX_MSGPACK}).") from first


# ---------------------------------------------------------------------- configs
@contextlib.contextmanager
def _config_errors(path: str):
    """Errors that a config.json with a bad value raises deep inside `transformers` (KeyError
    for an unknown activation, TypeError for a string where a number goes...), as one error
    that names the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}/config.json (or preprocessor_config.json) has a value the model cannot be "
                              f"built with: {type(e).__name__}: {e}") from e


def _configs(cfg_json: Mapping, path: str):
    """Returns `(family, vision config, full CLIPConfig or None)` as `transformers` config objects."""
    model_type = cfg_json.get("model_type")
    family = MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(f"{path}/config.json has model_type {model_type!r}; supported model types: "
                         f"{', '.join(MODEL_TYPES)} (families {', '.join(FAMILIES)})")
    t = _hf.hf()
    with _hf.quiet(), _config_errors(path):
        if family in OWN_FAMILIES:
            return family, OWN_FAMILIES[family].vision_config(cfg_json, t), None
        if model_type == "clip":
            full = t.CLIPConfig.from_dict(dict(cfg_json))
            return family, full.vision_config, full
        if model_type == "clip_vision_model":
            return family, t.CLIPVisionConfig.from_dict(dict(cfg_json)), None
        if model_type == "dinov2":
            return family, t.Dinov2Config.from_dict(dict(cfg_json)), None
        if model_type == "vit":
            return family, t.ViTConfig.from_dict(dict(cfg_json)), None
        reg = t.Dinov2WithRegistersConfig.from_dict(dict(cfg_json))
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "hidden_act",
                "initializer_range", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
                "layerscale_value", "use_swiglu_ffn")
        cfg = t.Dinov2Config(**{k: getattr(reg, k) for k in keys})
        cfg.num_register_tokens = int(reg.num_register_tokens)
        return family, cfg, None


def _processing(path, family, cfg) -> ImageProcessing:
    file = os.path.join(path, "preprocessor_config.json")
    own = OWN_FAMILIES.get(family)
    if os.path.isfile(file):
        processor = weights.read_json(file, what="preprocessor_config.json")
        if own is not None:
            return own.processing_from_hf(processor, cfg)
        return ImageProcessing.from_hf(processor, square_size=family == "vit")
    if own is not None:
        return own.default_processing(cfg)
    return default_processing(family, int(cfg.image_size))


def at_resolution(processing: ImageProcessing, family: str, cfg, image_size, path="") -> ImageProcessing:
    """`processing` made to yield `image_size` px squares, the way the family's processor sizes
    them (ViT: resize to the square; the others: short side, then centre crop)."""
    patch = int(cfg.patch_size)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < patch \
            or image_size % patch:
        raise ValueError(f"{path}: image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    s = int(image_size)
    if family == "vit" or (family in OWN_FAMILIES and OWN_FAMILIES[family].resize_square):
        return dataclasses.replace(processing, resize_shortest=None, resize_to=(s, s), crop=None)
    return dataclasses.replace(processing, resize_shortest=s, resize_to=None, crop=(s, s))


def default_processing(family: str, image_size: int) -> ImageProcessing:
    """The family's standard HF image processor, used when a directory has no preprocessor_config.json.

    CLIP: short side -> `image_size` (bicubic), center crop, OpenAI mean/std. DINOv2 (both):
    short side -> 256 (bicubic), center crop 224, ImageNet mean/std (the hub processors; the
    DINOv2 config's own image_size, 518, is only the position-embedding grid). ViT: resize to
    `image_size` x `image_size` (bilinear), mean = std = 0.5.
    """
    s = image_size
    if family == "clip":
        return ImageProcessing(resize_shortest=s, crop=(s, s), resample=BICUBIC, mean=OPENAI_CLIP_MEAN,
                               std=OPENAI_CLIP_STD)
    if family == "vit":
        return ImageProcessing(resize_to=(s, s), resample=BILINEAR, mean=HALF, std=HALF)
    if family in ("dinov2", "dinov2_registers"):
        return ImageProcessing(resize_shortest=256, crop=(224, 224), resample=BICUBIC, mean=IMAGENET_MEAN,
                               std=IMAGENET_STD)
    raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")


# ---------------------------------------------------------------------- heads and target shapes
@dataclasses.dataclass(frozen=True)
class _Heads:
    n_classes: int = 0
    classifier_in: int = 0
    projection: int = 0  # CLIP visual_projection output size (0: absent)
    has_text: bool = False  # CLIP text tower present
    has_pooler: bool = False  # ViT tanh pooler saved


def _heads_from_torch(shapes: Mapping[str, tuple], root) -> _Heads:
    """Heads present in a PyTorch state dict (`{name: shape}`; Linear weights are [out, in])."""
    return _heads(shapes, root, weight="weight", out_axis=0)


def _heads_from_flax(flat: Mapping[tuple, np.ndarray], root) -> _Heads:
    """Heads present in flat Flax params (Dense kernels are [in, out])."""
    return _heads({".".join(k): v.shape for k, v in flat.items()}, root, weight="kernel", out_axis=1)


def _heads(shapes, root, *, weight, out_axis) -> _Heads:
    n_classes = classifier_in = projection = 0
    if f"classifier.{weight}" in shapes:
        s = shapes[f"classifier.{weight}"]
        n_classes, classifier_in = s[out_axis], s[1 - out_axis]
    if f"visual_projection.{weight}" in shapes:
        projection = shapes[f"visual_projection.{weight}"][out_axis]
    has_text = any(k.startswith("text_model.") for k in shapes)
    has_pooler = any(k.startswith(("pooler.", f"{root}.pooler.")) for k in shapes)
    return _Heads(n_classes, classifier_in, projection, has_text, has_pooler)


def _target_shapes(family, cfg, full_cfg, heads: _Heads) -> dict[tuple, tuple]:
    """Flat `{flax key: shape}` of the params the model needs, from `jax.eval_shape` of HF's Flax modules."""
    key = jax.random.key(0)
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    root = HF_FAMILIES[family].root
    if family == "clip":
        m = _hf.flax_module("clip.modeling_flax_clip")
        if heads.has_text and full_cfg is not None:
            ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
            tree = jax.eval_shape(m.FlaxCLIPModule(full_cfg).init, key, ids, pixels, ids, ids)["params"]
        else:
            tree = jax.eval_shape(m.FlaxCLIPVisionModule(cfg).init, key, pixels)["params"]
        shapes = {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}
        if heads.projection and ("visual_projection", "kernel") not in shapes:
            shapes[("visual_projection", "kernel")] = (cfg.hidden_size, heads.projection)
        return shapes
    if family == "vit":
        m = _hf.flax_module("vit.modeling_flax_vit")
        tree = jax.eval_shape(m.FlaxViTModule(cfg, add_pooling_layer=heads.has_pooler).init, key, pixels)["params"]
    else:
        m = _hf.flax_module("dinov2.modeling_flax_dinov2")
        tree = jax.eval_shape(m.FlaxDinov2Module(cfg).init, key, pixels)["params"]
    shapes = {(root,) + k: tuple(v.shape) for k, v in flatten_dict(tree).items()}
    if family == "dinov2_registers":
        shapes[(root, "embeddings", "register_tokens")] = (1, cfg.num_register_tokens, cfg.hidden_size)
    if heads.n_classes:
        shapes[("classifier", "kernel")] = (heads.classifier_in, heads.n_classes)
        shapes[("classifier", "bias")] = (heads.n_classes,)
    return shapes


# ---------------------------------------------------------------------- conversion
def _convert(state: Mapping[str, np.ndarray], target: Mapping[tuple, tuple], root: str) -> dict[tuple, np.ndarray]:
    """PyTorch state dict -> flat Flax params, with HF's renaming rule (Linear transposed, conv to HWIO...)."""
    rename = _hf.rename_key_and_reshape_tensor()
    prefixed = any(k.split(".", 1)[0] == root for k in state)
    out, unexpected = {}, []
    for name, value in state.items():
        parts = tuple(name.split("."))
        if not prefixed and parts[0] not in ("classifier",):
            parts = (root,) + parts  # a base-model checkpoint (e.g. Dinov2Model) has no prefix
        flax_key, value = rename(parts, value, target, root)
        if flax_key in target:
            out[flax_key] = weights.contiguous(value)
        else:
            unexpected.append(name)
    if unexpected:
        log.debug("ignoring %d checkpoint weights the model does not use: %s", len(unexpected), unexpected[:10])
    return out


def _check(flat, target, source, family, n_layers: int, names=None) -> dict[tuple, np.ndarray]:
    """Keeps the target's params and raises a clear error if any is missing, mis-shaped, not a
    float, not finite, or if the weights hold blocks the config does not have."""
    missing = [".".join(k) for k in target if k not in flat]
    wrong = [f"{'.'.join(k)}: {flat[k].shape} (expected {target[k]})" for k in target
             if k in flat and tuple(flat[k].shape) != target[k]]
    if missing or wrong:
        raise ValueError(f"weights in {source} do not match the {family} config.json: "
                         f"{len(missing)} missing (e.g. {missing[:5]}), {len(wrong)} mis-shaped (e.g. {wrong[:3]})")
    names = [".".join(k) for k in flat] if names is None else names
    extra_blocks = sorted({int(m.group(1)) for name in names if not name.startswith("text_model.")
                           for m in [re.search(r"(?:^|\.)layers?\.(\d+)\.", name)] if m and int(m.group(1)) >= n_layers})
    if extra_blocks:
        raise CheckpointError(f"{source}: the weights hold blocks {extra_blocks[:5]} beyond config.json's "
                              f"num_hidden_layers={n_layers}; the config does not describe these weights")
    for k in target:
        value = flat[k]
        if value.dtype.kind != "f":
            raise CheckpointError(f"{source}: tensor {'.'.join(k)!r} has dtype {value.dtype}, expected a float type")
        check_finite(source, ".".join(k), value)
    return {k: flat[k] for k in target}


