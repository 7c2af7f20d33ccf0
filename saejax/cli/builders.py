"""Config -> objects, for every binary: the only module of saejax that reads an ml_collections
ConfigDict. Each command in `saejax.cli` is `run(config, workdir)`: the objects built here,
then one call into the library (`saejax.run.run_training`, `saejax.studies.*`,
`saejax.browser`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saejax import backbones, data, fidelity, sae, sharding, site, train
from saejax.checkpoint import import_saev, load_sae
from saejax.core.losses import Objective
from saejax.core.normalization import Normalization
from saejax.provenance import check_written_by
from saejax.run.training import RESUMABLE_KEYS, RunSpec, TrainedRun, run_training

__all__ = ["RESUMABLE_KEYS", "TrainedRun", "build_backbone", "build_head", "build_mesh", "build_run", "build_sae", "build_site",
           "build_source", "build_trainer", "compute_dtype", "demo_summary", "ensure_tiny_tree", "fidelity_head",
           "normalization_identity", "resolve_model", "train_sae", "validate_config"]


def build_source(cfg: ml_collections.ConfigDict, split: str) -> data.Source:
    """The image source a config names (`split`: "train" or "validation").

    `cfg.kind` and its keys: "hf" (a Hugging Face data set, `saejax.data.HfDatasetSource`:
    `path` (a hub name, a `save_to_disk` folder or parquet files), `split` (the training
    images' split, "train" by default), `validation_split` ("validation"), `image_column`,
    `label_column`, `name`, `streaming`, `cache_dir`, `image_size`), "tfds" (`name`,
    `<split>_split`, `data_dir`, `image_size`, `label_key`), "folder" (`<split>_dir`,
    `image_size`), all three with `skip_unreadable` (skip and count images that cannot be
    decoded instead of stopping), "shapes" (`<split>_images`, `seed`, `image_size`, 40 by
    default) or "random" (`<split>_images`, `seed`, `image_size`).
    """
    skip = bool(cfg.get("skip_unreadable", False))
    if cfg.kind == "hf":
        hf_split = cfg.get("split", "train") if split == "train" else cfg.get(f"{split}_split", split)
        return data.HfDatasetSource(cfg.path, hf_split, image_column=cfg.get("image_column", "image"),
                                    label_column=cfg.get("label_column", "label"), name=cfg.get("name"),
                                    streaming=bool(cfg.get("streaming", False)), image_size=cfg.get("image_size"),
                                    skip_unreadable=skip, cache_dir=cfg.get("cache_dir"))
    if cfg.kind == "tfds":
        return data.TfdsSource(cfg.name, cfg.get(f"{split}_split"), data_dir=cfg.get("data_dir"),
                               image_size=cfg.get("image_size"), label_key=cfg.get("label_key", "label"),
                               skip_unreadable=skip)
    if cfg.kind == "folder":
        return data.ImageFolderSource(cfg.get(f"{split}_dir"), image_size=cfg.get("image_size"), skip_unreadable=skip)
    if cfg.kind == "shapes":
        from saejax.datasets import shapes
        return shapes.source(split, cfg.get(f"{split}_images"), seed=cfg.seed, image_size=cfg.get("image_size", 40))
    if cfg.kind == "random":  # uint8 noise; for smoke tests of the plumbing
        rng = np.random.default_rng(cfg.seed + (split == "validation"))
        n = cfg.get(f"{split}_images")
        return data.ArraySource(rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8))
    raise ValueError(f"unknown data kind {cfg.kind!r}; expected hf, tfds, folder, shapes or random")


def compute_dtype(name: str | None):
    """A config's precision: "float32", "bfloat16", or "auto" = bfloat16 on TPU and GPU (bf16
    matrix units: the matmuls run 2x or more faster and the state stays float32) and float32
    on CPU (where bf16 is slower without AMX, and where results are compared bit for bit)."""
    if name in (None, "auto"):
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {name!r}: expected 'float32', 'bfloat16' or 'auto'")
    return jnp.dtype(name)


def build_backbone(cfg: ml_collections.ConfigDict):
    """`(bb, params)`: a hub id or local directory (`name`, run at `image_size` px when given, see
    `saejax.backbones.load`), or else a tiny random one (`random`), as the `:small` configs have."""
    if cfg.get("random") and not cfg.get("name"):
        path = backbones.create_random(cfg.random.family, cfg.random.directory, seed=cfg.random.seed,
                                       n_classes=cfg.random.get("n_classes", 0), **cfg.random.sizes)
        return backbones.load(path, cache_dir=False)
    return backbones.load(cfg.name, dtype=compute_dtype(cfg.get("dtype", "float32")), image_size=cfg.get("image_size"))


def build_trainer(config: ml_collections.ConfigDict, d_model: int) -> tuple[train.Trainer, train.Hparams]:
    """The trainer and the sweep's hyperparameters. `config.sae`: `architecture`, `d_sae` or
    `expansion` (x d_model), `k` for topk / batchtopk, and `compute_dtype` for the matmuls
    (see `compute_dtype`; float32 when absent)."""
    s = config.sae
    d_sae = s.get("d_sae") or s.expansion * d_model
    kwargs = {"k": s.k} if "k" in sae.ARCHITECTURE_REGISTRY[s.architecture].uses else {}
    kwargs["compute_dtype"] = compute_dtype(s.get("compute_dtype", "float32"))
    ae = sae.create(s.architecture, d_model, d_sae, **kwargs)
    trainer = train.make_trainer(
        ae, objective=Objective(**config.objective), dead_after_tokens=config.dead_after_tokens,
        resample_every=config.resample_every, resample_until=config.get("resample_until"), **config.optimizer)
    return trainer, train.Hparams.grid(**config.sweep)


def build_mesh(config: ml_collections.ConfigDict):
    """`config.mesh.model` devices on `model` (default 1), the rest on `data`."""
    return sharding.make_mesh(model=config.get("mesh", {}).get("model", 1))


def normalization_identity(config) -> dict[str, Any]:
    """What a run's normalisation statistics depend on besides the layer: the backbone (not
    where a random one is cached) and the token set."""
    backbone = config.backbone.to_dict()
    if backbone.get("random"):
        backbone["random"] = {k: v for k, v in backbone["random"].items() if k != "directory"}
    return json.loads(json.dumps({"backbone": backbone, "tokens": config.tokens}))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check the numbers a run needs before any work starts.

    Raises:
        ValueError: every problem found, each naming its key.
    """
    problems = []

    def positive(key, value, allow_zero=False):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
            problems.append(f"{key} must be an integer >= {0 if allow_zero else 1}, got {value!r}")

    for key in ("batch_size", "image_batch_size", "buffer_tokens", "log_every", "normalization_samples",
                "total_tokens"):
        positive(key, config.get(key))
    positive("checkpoint_every", config.get("checkpoint_every"), allow_zero=True)
    if isinstance(config.get("total_tokens"), int) and isinstance(config.get("batch_size"), int) \
            and 0 < config.total_tokens < config.batch_size:
        problems.append(f"total_tokens={config.total_tokens} is less than one batch (batch_size={config.batch_size})")
    layers = config.get("layers")
    if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
        problems.append(f"layers must be a non-empty tuple of block indices, got {layers!r}")
    if config.sae.architecture not in sae.architectures():
        problems.append(f"sae.architecture must be one of {', '.join(sae.architectures())}, got "
                        f"{config.sae.architecture!r}")
    elif "k" in sae.ARCHITECTURE_REGISTRY[config.sae.architecture].uses:
        positive("sae.k", config.sae.get("k"))
    if config.get("on_nonfinite", "stop") not in ("stop", "freeze"):
        problems.append(f"on_nonfinite must be 'stop' or 'freeze', got {config.on_nonfinite!r}")
    if problems:
        raise ValueError("bad config: " + "; ".join(problems))


def build_run(config: ml_collections.ConfigDict) -> RunSpec:
    """The `saejax.run.RunSpec` a training config describes (loads the backbone)."""
    validate_config(config)
    bb, bb_params = build_backbone(config.backbone)
    trainer, hparams = build_trainer(config, bb.d_model)
    fidelity_config = config.get("fidelity", {})
    return RunSpec(
        bb, bb_params, build_source(config.data, "train"), build_source(config.data, "validation"), trainer, hparams,
        layers=tuple(config.layers), total_tokens=config.total_tokens, tokens=config.tokens,
        batch_size=config.batch_size, image_batch_size=config.image_batch_size, buffer_tokens=config.buffer_tokens,
        shuffle_groups=config.get("shuffle_groups"), normalization_samples=config.normalization_samples,
        seed=config.seed, data_seed=config.data.seed, mesh=build_mesh(config), log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.get("keep_checkpoints", 2),
        on_nonfinite=config.get("on_nonfinite", "stop"), eval_images=config.eval_images,
        fidelity_images=fidelity_config.get("images", min(config.eval_images, 512)),
        fidelity_head=fidelity_head(bb, bb_params, fidelity_config.get("head", "auto"),
                                    fidelity_config.get("prompts", ())),
        backbone_name=config.backbone.get("name") or "random", provenance=config.to_dict(),
        normalization_identity=normalization_identity(config))


def train_sae(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change=(), step_hooks=()) -> TrainedRun:
    """Run (or resume) the training run `config` describes in `workdir`; see
    `saejax train` and `saejax.run.run_training` (`step_hooks`: `RunSpec.step_hooks`).

    Raises:
        ValueError: a bad config (before any work starts).
        WorkdirBusyError: another run holds the workdir.
        ConfigChangedError: resuming with a config that differs in keys other than
            `RESUMABLE_KEYS` and `allow_config_change`.
    """
    spec = dataclasses.replace(build_run(config), step_hooks=tuple(step_hooks))
    return run_training(spec, workdir, allow_changes=tuple(allow_config_change))


def fidelity_head(bb, bb_params, name: str, prompts=()):
    """`config.fidelity.head`: "auto" (the checkpoint's classifier when it has one, else none),
    "classifier", "zero_shot" (a full CLIP checkpoint: its zero-shot logits over
    `fidelity.prompts`, one per class, in the labels' order), or "none" (compare the pooled
    embedding only)."""
    if name == "auto":
        name = "classifier" if bb.n_classes else "none"
    if name == "zero_shot":
        if not prompts:
            raise ValueError("fidelity.head 'zero_shot' needs fidelity.prompts, one text prompt per class")
        return fidelity.clip_zero_shot_head(bb, bb_params, prompts)
    if name not in ("classifier", "none"):
        raise ValueError(f"fidelity.head {name!r}: expected 'auto', 'classifier', 'zero_shot' or 'none'")
    return fidelity.classifier_head if name == "classifier" else None


def build_sae(cfg: ml_collections.ConfigDict, d_model: int):
    """`(ae, params, normalization or None)` from `cfg.kind`:
    "saejax" (`path`: a `save_sae` directory), "saev" (`path`: saev's `sae.pt`, raw activations
    unless `norm_mean` / `norm_scalar` are given), or "random" (`d_sae`, `seed`: an untrained
    ReLU SAE whose latents fire, for `:small` plumbing runs)."""
    if cfg.kind == "saejax":
        ae, params, info = load_sae(cfg.path)
        norm = info["normalization"]
    elif cfg.kind == "saev":
        ae, params, _ = import_saev(cfg.path)
        norm = None
        if cfg.get("norm_scalar"):  # e.g. saev's DINOv2 SAE reads (x - mu) / 2.018...
            if not cfg.get("norm_mean"):
                raise ValueError(f"sae.norm_scalar={cfg.norm_scalar} needs sae.norm_mean: an .npy file of the mean "
                                 f"the SAE subtracts")
            mean = np.load(cfg.norm_mean)
            if mean.shape != (d_model,):
                raise ValueError(f"{cfg.norm_mean}: shape {mean.shape}, expected ({d_model},)")
            norm = Normalization(jnp.asarray(mean, jnp.float32), jnp.asarray(cfg.norm_scalar, jnp.float32))
    elif cfg.kind == "random":
        ae = sae.relu(d_model, cfg.d_sae)
        params = ae.init(jax.random.key(cfg.seed))
        params = params.replace(b_enc=jnp.full((cfg.d_sae,), 0.05))
        norm = None
    else:
        raise ValueError(f"sae.kind must be saejax, saev or random, got {cfg.kind!r}")
    if ae.d_model != d_model:
        raise ValueError(f"the SAE reads d_model={ae.d_model}, the backbone has {d_model}")
    return ae, params, norm


def ensure_tiny_tree(cfg, write) -> str:
    """`cfg.root`, written by `write(root)` first when `cfg.tiny_tree` is set and it is missing."""
    root = os.path.expanduser(cfg.root)
    if cfg.get("tiny_tree") and not os.path.isdir(root):
        write(root)
    return root


def build_site(backbone_cfg, sae_cfg, layer: int, image_size: int | None = None) -> site.Site:
    """The SAE at its block: `build_backbone` + `build_sae`; with `image_size`, for images a
    source already resized and cropped to that size (`site.cropped_processing`)."""
    bb, bb_params = build_backbone(backbone_cfg)
    ae, sae_params, norm = build_sae(sae_cfg, bb.d_model)
    processing = site.cropped_processing(bb, image_size) if image_size else None
    return site.Site(bb, bb_params, layer=layer, ae=ae, sae_params=sae_params, norm=norm, processing=processing)


def demo_summary(workdir: str) -> dict:
    """The `report/summary.json` of a finished `saejax demo` workdir."""
    path = os.path.join(os.path.expanduser(workdir), "report", "summary.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: give the workdir of a finished `saejax demo` run")
    with open(path) as f:
        summary = json.load(f)
    check_written_by(summary.get("written_by"), path)
    return summary


def resolve_model(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A model config (`backbone`, `sae`, `layer`), with `demo` (a demo workdir) filling in the
    demo's backbone, SAE and block. Returns a new config with `image_size`: the demo's world size
    (or `cfg.image_size`, or None)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.get("demo"):
        summary = demo_summary(cfg.demo)
        cfg.backbone = ml_collections.ConfigDict({"name": summary["backbone"]["path"], "dtype": "float32",
                                                  "image_size": summary["backbone"]["image_size"]})
        cfg.sae = ml_collections.ConfigDict({"kind": "saejax", "path": summary["sae"]["path"]})
        cfg.layer = summary["sae"]["layer"]
        cfg.image_size = summary["backbone"]["image_size"]
    else:
        cfg.image_size = cfg.get("image_size")
    return cfg


def build_head(bb, bb_params, cfg: ml_collections.ConfigDict, backbone_path: str | None):
    """`(head, class names)` for `saejax.discovery`: `cfg.kind` "classifier" (the checkpoint's
    logits, `cfg.logits = (start, stop)` for one of several softmax heads, `(0, 0)` for all) or
    "zero_shot" (a full CLIP checkpoint over `cfg.prompts`). Names: `cfg.classes`, else the
    checkpoint's `id2label` (classifier) or the prompts."""
    from saejax.analysis import discovery  # noqa: PLC0415

    if cfg.kind == "classifier":
        if not bb.n_classes:
            raise ValueError("head.kind='classifier', but the backbone has no classification head; use "
                             "head.kind='zero_shot' with head.prompts")
        start, stop = (int(i) for i in cfg.get("logits", (0, 0)))
        stop = stop or bb.n_classes
        if not 0 <= start < stop <= bb.n_classes:
            raise ValueError(f"head.logits=({start}, {stop}) is outside the classifier's {bb.n_classes} logits")
        head = fidelity.classifier_head if (start, stop) == (0, bb.n_classes) else discovery.logit_slice(
            fidelity.classifier_head, start, stop)
        names = list(cfg.get("classes", ())) or _id2label(backbone_path, bb.n_classes)[start:stop]
    elif cfg.kind == "zero_shot":
        head = fidelity_head(bb, bb_params, "zero_shot", tuple(cfg.get("prompts", ())))
        names = list(cfg.get("classes", ())) or list(cfg.prompts)
    else:
        raise ValueError(f"head.kind {cfg.kind!r}: expected 'classifier' or 'zero_shot'")
    return head, names


def _id2label(path: str | None, n: int) -> list[str]:
    config = os.path.join(path, "config.json") if path and os.path.isdir(path) else None
    labels = {}
    if config and os.path.isfile(config):
        with open(config) as f:
            labels = json.load(f).get("id2label") or {}
    return [str(labels.get(str(i), f"class_{i}")) for i in range(n)]
