"""`load`: hub id or local directory -> (`Backbone`, params), converting PyTorch weights without torch.

The family comes from config.json's `model_type` (`MODEL_TYPES`); a directory in open_clip's
layout (`open_clip_config.json`) loads as CLIP (`saejax.backbones.open_clip`). Every family
loads the same way:

1. the weights are read under their PyTorch names (`weights.read_state`: `model.safetensors`,
   sharded safetensors, `pytorch_model.bin` (sharded too), an old `transformers`
   `flax_model.msgpack`, or open_clip's files);
2. the family's name table turns them into saejax's params (`convert.to_own`); the heads the
   checkpoint carries (a classifier, a pooler, CLIP's projection and text tower) are read off
   the converted names (`heads_of`);
3. they are checked against the parameter shapes of the model the config describes (from
   `jax.eval_shape`, so nothing is initialised): every parameter present, of its shape, a
   float, finite, and no blocks beyond `num_hidden_layers`;
4. they are cached as one flat safetensors file under `cache_dir` (default `~/.cache/saejax`,
   or `$SAEJAX_CACHE`) keyed by a hash of the source files' names, sizes and modification
   times plus the config, so the second load skips steps 1 to 3.

`transformers` supplies the config classes (their defaults fill what config.json leaves out);
it is never asked for a model.

Long because it is the whole loading path (hub names, configs, processors, weights and their
checks); the readers are in `weights`, the names in `convert`, the cache in `cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from saejax.backbones import _hf, cache, open_clip, weights
from saejax.backbones.base import Heads, LoadInfo
from saejax.backbones.convert import to_own
from saejax.backbones.families import FAMILIES, get_family, grid_of, make_backbone
from saejax.backbones.model import Backbone
from saejax.backbones.preprocess import ImageProcessing
from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.safetensors_header import check_finite

log = logging.getLogger(__name__)

# Hub ids saejax knows, and their family. Other hub models: download them yourself
# (huggingface_hub.snapshot_download) and pass the directory.
KNOWN_MODELS = {
    **{hub_id: f.name for f in FAMILIES.values() for hub_id in f.hub_ids},
    **{hub_id: "clip" for hub_id in open_clip.HUB_IDS},  # open_clip's layout, mapped onto CLIP
}

# config.json `model_type` -> family.
MODEL_TYPES = {model_type: f.name for f in FAMILIES.values() for model_type in f.model_types}


def load(name_or_dir, *, dtype=jnp.float32, cache_dir=None, image_size: int | None = None) -> tuple[Backbone, dict]:
    """Loads a vision transformer as a `Backbone` and its params pytree.

    Args:
        name_or_dir: A known hub id (see `KNOWN_MODELS`, e.g. "openai/clip-vit-base-patch16",
            "google/siglip2-base-patch16-224", "facebook/dinov3-vitb16-pretrain-lvd1689m",
            "imageomics/bioclip") or a local directory with `config.json` and weights:
            `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` +
            `model.safetensors.index.json`, `pytorch_model.bin` (or its shards + index; read
            without running pickle code), or an old `transformers` `flax_model.msgpack`. A
            `preprocessor_config.json` there defines `preprocess`; without one the family's
            standard processor is used. Or an open_clip directory: `open_clip_config.json` +
            `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`.
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
        `(bb, params)`: the `Backbone` and a nested dict of float32 jax arrays,
        `{"embed", "blocks", "readout"}` (+ `"text"` for a full CLIPModel; see
        `saejax.backbones.layers`).

    Raises:
        ValueError: Unknown name, unsupported `model_type`, weights that do not fit the config, or an
            `image_size` that is not a multiple of the patch size.
        CheckpointError: (a ValueError) a file that cannot be read (bad JSON, truncated or corrupt
            safetensors, pickle or msgpack), weights that are not finite or not floats, or weights
            of blocks the config does not have; the message names the file and the tensor.
        FileNotFoundError: A directory without `config.json` or without weights.
        OSError: A known hub id that could not be fetched (e.g. no network).

    >>> bb, params = load("openai/clip-vit-base-patch16")             # doctest: +SKIP
    >>> bb.family, bb.d_model, bb.n_layers, bb.grid                   # doctest: +SKIP
    ('clip', 768, 12, (14, 14))
    """
    path = resolve(name_or_dir)
    if open_clip.is_open_clip(path):
        config = weights.read_json(os.path.join(path, open_clip.CONFIG), what=open_clip.CONFIG)
        fields, _ = open_clip.vision_config(config, path)
        with _hf.quiet(), _config_errors(path):
            cfg = _hf.config_class("CLIPVisionConfig")(**fields)
        fam, text_cfg, processing = get_family("clip"), None, open_clip.processing(config, cfg.image_size, path)
        files = open_clip.find_weights(path)
        read, config_file = (lambda: open_clip.read_state(files[0])), open_clip.CONFIG
    else:
        cfg_json = weights.read_json(os.path.join(path, "config.json"), what="config.json")
        fam = _family_of(cfg_json, path)
        with _hf.quiet(), _config_errors(path):
            cfg, text_cfg = fam.configs(cfg_json)
            cfg.num_hidden_layers = int(cfg.num_hidden_layers)  # a string here fails later, unnamed
            processing = _processing(path, fam, cfg)
        kind, files = weights.find_weights(path)
        read, config_file = (lambda: weights.read_state(kind, files)), "config.json"
    if image_size is not None:
        processing = at_resolution(processing, fam.name, cfg, image_size, path)
    with _config_errors(path):
        grid = grid_of(fam.name, cfg, processing)
    flat, heads, info = _read_params(fam, cfg, text_cfg, grid, path, files, read, config_file, cache_dir)
    with _config_errors(path):
        bb = make_backbone(fam.name, cfg, dtype=dtype, processing=processing, heads=heads, text_config=text_cfg,
                           load_info=info, interpolate=image_size is not None)
    return bb, unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def heads_of(shapes: Mapping[tuple, tuple]) -> Heads:
    """The heads a checkpoint carries, from its converted params' `{key: shape}`."""
    def out_size(name):
        shape = shapes.get(("readout", name, "kernel"))
        return int(shape[-1]) if shape is not None else 0

    return Heads(n_classes=out_size("classifier"), pooler=out_size("pooler"), projection=out_size("projection"),
                 text=any(k[0] == "text" for k in shapes))


def target_shapes(fam, cfg, grid, heads: Heads, text_cfg=None) -> dict[tuple, tuple]:
    """`{key: shape}` of every parameter the model needs (`jax.eval_shape`; nothing is computed)."""
    return fam.build(cfg, jnp.float32, grid, heads, text_cfg).param_shapes()


def _read_params(fam, cfg, text_cfg, grid, path, files, read, config_file, cache_dir):
    """Flat params, the heads and the `LoadInfo`: from the cache, or read, converted, checked and cached."""
    cache_file = None if cache_dir is False else cache.cache_file(cache_dir, fam.name, path, files, config_file)
    flat = cache.read_cache(cache_file)
    if flat is not None:
        heads = heads_of({k: v.shape for k, v in flat.items()})
        with _config_errors(path):
            target = target_shapes(fam, cfg, grid, heads, text_cfg)
        if cache.fits(flat, target):
            return flat, heads, LoadInfo(path=path, weight_files=tuple(files), cache_file=cache_file, from_cache=True)
        log.warning("ignoring stale backbone cache %s", cache_file)
    state = read()
    converted, unused = to_own(state, fam.names(cfg))
    if unused:
        log.debug("ignoring %d checkpoint weights the model does not use: %s", len(unused), unused[:10])
    ignored = set(unused)
    check_tensors({k: v for k, v in state.items() if k not in ignored}, path)
    heads = heads_of({k: v.shape for k, v in converted.items()})
    with _config_errors(path):
        target = target_shapes(fam, cfg, grid, heads, text_cfg)
    flat = check_params(converted, target, path, fam.name, int(cfg.num_hidden_layers))
    cache.write_cache(cache_file, flat, path)
    return flat, heads, LoadInfo(path=path, weight_files=tuple(files), cache_file=cache_file, from_cache=False)


def _family_of(cfg_json: Mapping, path: str):
    model_type = cfg_json.get("model_type")
    name = MODEL_TYPES.get(model_type)
    if name is None:
        raise ValueError(f"{path}/config.json has model_type {model_type!r}; supported model types: "
                         f"{', '.join(MODEL_TYPES)} (families {', '.join(FAMILIES)})")
    return get_family(name)


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


# What each kind of weights needs fetched besides itself (the shards an index lists).
_SHARDS = {weights.SAFETENSORS_INDEX: "model-*-of-*.safetensors", weights.PYTORCH_BIN_INDEX: "pytorch_model-*-of-*.bin"}


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
        else:
            kind = next((w for w in weights.WEIGHT_FILES if w in available), None)
            if kind is None:
                raise FileNotFoundError(f"hub repo {repo_id!r} has none of {', '.join(weights.WEIGHT_FILES)}")
            patterns = [kind] + ([_SHARDS[kind]] if kind in _SHARDS else [])
        return hub.snapshot_download(repo_id, allow_patterns=base + patterns)
    except Exception as e:  # noqa: BLE001  (network errors come in many types)
        errors.append(e)
    try:  # a snapshot already in the local HF cache works offline
        return hub.snapshot_download(repo_id, local_files_only=True, allow_patterns=base + list(weights.WEIGHT_FILES)
                                     + list(_SHARDS.values()) + list(open_clip.WEIGHT_FILES))
    except Exception as e:  # noqa: BLE001
        errors.append(e)
    first = errors[0]
    raise OSError(
        f"could not fetch {repo_id!r} from the Hugging Face hub ({type(first).__name__}: {str(first)[:200]}). "
        "Without network access, pass a local directory with config.json and weights instead "
        f"({', '.join(weights.WEIGHT_FILES)}).") from first


# ---------------------------------------------------------------------- configs
@contextlib.contextmanager
def _config_errors(path: str):
    """Errors that a config.json with a bad value raises deep inside `transformers` or the model
    (KeyError for an unknown activation, TypeError for a string where a number goes...), as one
    error that names the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}/config.json (or preprocessor_config.json) has a value the model cannot be "
                              f"built with: {type(e).__name__}: {e}") from e


def _processing(path, fam, cfg) -> ImageProcessing:
    file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(file):
        return fam.processing_from_hf(weights.read_json(file, what="preprocessor_config.json"), cfg)
    return fam.default_processing(cfg)


def at_resolution(processing: ImageProcessing, family: str, cfg, image_size, path="") -> ImageProcessing:
    """`processing` made to yield `image_size` px squares, the way the family's processor sizes
    them (ViT, SigLIP, DINOv3: resize to the square; the others: short side, then centre crop)."""
    patch = int(cfg.patch_size)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < patch \
            or image_size % patch:
        raise ValueError(f"{path}: image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    s = int(image_size)
    if get_family(family).resize_square:
        return dataclasses.replace(processing, resize_shortest=None, resize_to=(s, s), crop=None)
    return dataclasses.replace(processing, resize_shortest=s, resize_to=None, crop=(s, s))


def default_processing(family: str, image_size: int) -> ImageProcessing:
    """The family's standard HF image processor for a config of `image_size`, used when a
    directory has no preprocessor_config.json.

    CLIP: short side -> `image_size` (bicubic), center crop, OpenAI mean/std. DINOv2 (both):
    short side -> 256 (bicubic), center crop 224, ImageNet mean/std (the hub processors; the
    DINOv2 config's own image_size, 518, is only the position-embedding grid). ViT: resize to
    `image_size` x `image_size` (bilinear), mean = std = 0.5. SigLIP: resize to the square,
    bicubic, mean = std = 0.5. DINOv3: resize to the square, bilinear, ImageNet mean/std.
    """
    fam = get_family(family)
    with _hf.quiet():
        cfg = _hf.config_class(fam.config_class)(image_size=int(image_size))
    return fam.default_processing(cfg)


# ---------------------------------------------------------------------- checks
def check_tensors(state: Mapping[str, np.ndarray], source) -> None:
    """Raises a `CheckpointError` naming the tensor (under the checkpoint's own name) that is
    not a float or not finite."""
    for name, value in state.items():
        if value.dtype.kind != "f":
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {value.dtype}, expected a float type")
        check_finite(source, name, value)


def check_params(flat, target, source, family, n_layers: int) -> dict[tuple, np.ndarray]:
    """Keeps the target's params and raises a clear error if any is missing or mis-shaped, or
    if the weights hold blocks the config does not have."""
    extra_blocks = sorted({int(k[1]) for k in flat if k[0] == "blocks" and int(k[1]) >= n_layers})
    if extra_blocks:
        raise CheckpointError(f"{source}: the weights hold blocks {extra_blocks[:5]} beyond config.json's "
                              f"num_hidden_layers={n_layers}; the config does not describe these weights")
    missing = [".".join(k) for k in target if k not in flat]
    wrong = [f"{'.'.join(k)}: {tuple(flat[k].shape)} (expected {target[k]})" for k in target
             if k in flat and tuple(flat[k].shape) != target[k]]
    if missing or wrong:
        raise ValueError(f"weights in {source} do not match the {family} config.json: "
                         f"{len(missing)} missing (e.g. {missing[:5]}), {len(wrong)} mis-shaped (e.g. {wrong[:3]})")
    return {k: weights.contiguous(flat[k]) for k in target}
