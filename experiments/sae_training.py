"""Config -> objects for `experiments.train_sae` and the demo, and the run's workdir glue.

Everything that trains lives in the library (`saejax.stream.ActivationStream`,
`saejax.loop.fit`, `saejax.loop.evaluate`); this module builds those objects from an
ml_collections config and lays out the workdir (see `experiments.train_sae`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saejax import activations, backbones, data, fidelity, loop, report, sae, sharding, stream, train
from saejax.checkpoint import CheckpointError, TrainCheckpointer, save_sae
from saejax.checkpoint.workdir import WorkdirLock, check_resume, config_changes
from saejax.core.losses import Objective
from saejax.core.normalization import Normalization


def build_source(cfg: ml_collections.ConfigDict, split: str) -> data.Source:
    """The image source a config names (`split`: "train" or "validation").

    `cfg.kind` and its keys: "tfds" (`name`, `<split>_split`, `data_dir`, `image_size`,
    `label_key`), "folder" (`<split>_dir`, `image_size`), both with `skip_unreadable` (skip
    and count images that cannot be decoded instead of stopping), "shapes" (`<split>_images`, `seed`,
    `image_size`, 40 by default) or "random" (`<split>_images`, `seed`, `image_size`).
    """
    skip = bool(cfg.get("skip_unreadable", False))
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
    raise ValueError(f"unknown data kind {cfg.kind!r}; expected tfds, folder, shapes or random")


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
                                       **cfg.random.sizes)
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
    ae = getattr(sae, s.architecture)(d_model, d_sae, **kwargs)
    trainer = train.make_trainer(
        ae, objective=Objective(**config.objective), dead_after_tokens=config.dead_after_tokens,
        resample_every=config.resample_every, resample_until=config.get("resample_until"), **config.optimizer)
    return trainer, train.Hparams.grid(**config.sweep)


def build_mesh(config: ml_collections.ConfigDict):
    """`config.mesh.model` devices on `model` (default 1), the rest on `data`."""
    return sharding.make_mesh(model=config.get("mesh", {}).get("model", 1))


def build_stream(config, bb, bb_params, source, mesh, norms, key, position=None) -> stream.ActivationStream:
    return stream.ActivationStream(
        bb, bb_params, source, layers=config.layers, tokens=config.tokens, batch_size=config.batch_size,
        image_batch_size=config.image_batch_size, buffer_tokens=config.buffer_tokens, normalization=norms,
        mesh=mesh, key=key, seed=config.data.seed, groups=config.get("shuffle_groups"), position=position)


def normalization_identity(config) -> dict[str, Any]:
    """What a run's normalisation statistics depend on besides the layer: the backbone (not
    where a random one is cached) and the token set."""
    backbone = config.backbone.to_dict()
    if backbone.get("random"):
        backbone["random"] = {k: v for k, v in backbone["random"].items() if k != "directory"}
    return json.loads(json.dumps({"backbone": backbone, "tokens": config.tokens}))


def load_or_estimate_normalization(config, workdir, bb, bb_params, source, mesh) -> dict[int, Normalization]:
    """`{layer: Normalization}` saved in the workdir, or estimated from `normalization_samples`
    activations drawn across the training images (and then saved, keyed to the backbone,
    layers and token set).

    Raises:
        ValueError: the saved statistics were made for another backbone, token set or layers.
    """
    path = os.path.join(workdir, "normalization.npz")
    identity = normalization_identity(config)
    if os.path.exists(path):
        stored = np.load(path)
        saved = json.loads(str(stored["identity"])) if "identity" in stored else None
        missing = [i for i in config.layers if f"mean_{i}" not in stored]
        if saved != identity or missing:
            what = (f"layers {missing} are not in it" if saved == identity else
                    "it was estimated for " + "; ".join(f"{k}: {v!r} -> {n!r}" for k, (v, n) in
                                                        config_changes(saved or {}, identity).items()))
            raise ValueError(f"{path} does not fit this run: {what}. Delete it to estimate it again, or use "
                             f"another workdir")
        return {i: Normalization(jnp.asarray(stored[f"mean_{i}"]), jnp.asarray(stored[f"scalar_{i}"]))
                for i in config.layers}
    batches = stream.activation_batches(bb, bb_params, source, layers=config.layers, tokens=config.tokens,
                                        image_batch_size=config.image_batch_size, mesh=mesh,
                                        seed=config.data.seed + 1, epochs=None)
    norms = stream.estimate_layer_normalization(batches, config.normalization_samples, jax.random.key(config.seed + 1))
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        arrays = {f"{name}_{i}": np.asarray(getattr(n, name)) for i, n in norms.items() for name in ("mean", "scalar")}
        np.savez(tmp, identity=np.asarray(json.dumps(identity)), **arrays)
        os.replace(tmp, path)
    return norms


# Keys a resumed run may change without saying so: how long it runs, how it reports, and
# whether it skips images that cannot be decoded anyway.
RESUMABLE_KEYS = ("total_tokens", "log_every", "checkpoint_every", "keep_checkpoints", "eval_images",
                  "data.skip_unreadable", "fidelity")


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
    if config.sae.architecture not in sae.ARCHITECTURES:
        problems.append(f"sae.architecture must be one of {', '.join(sae.ARCHITECTURES)}, got "
                        f"{config.sae.architecture!r}")
    elif "k" in sae.ARCHITECTURE_REGISTRY[config.sae.architecture].uses:
        positive("sae.k", config.sae.get("k"))
    if config.get("on_nonfinite", "stop") not in ("stop", "freeze"):
        problems.append(f"on_nonfinite must be 'stop' or 'freeze', got {config.on_nonfinite!r}")
    if problems:
        raise ValueError("bad config: " + "; ".join(problems))


class TrainedRun(NamedTuple):
    """What `train_sae` returns: everything needed to use the SAEs without reading the disk."""

    trainer: train.Trainer
    states: dict[int, train.TrainState]
    normalization: dict[int, Normalization]
    evaluation: dict[str, Any]
    bb: Any
    bb_params: Any


def train_sae(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change=()) -> TrainedRun:
    """Run (or resume) a training run in `workdir`; see `experiments.train_sae`.

    Raises:
        ValueError: a bad config (before any work starts).
        WorkdirBusyError: another run holds the workdir.
        ConfigChangedError: resuming with a config that differs in keys other than
            `RESUMABLE_KEYS` and `allow_config_change`.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        if getattr(lock, "took_over_from", None):
            print(f"took over the workdir lock left by PID {lock.took_over_from['pid']} on host "
                  f"{lock.took_over_from.get('host')} (that process is gone)", flush=True)
        return _train_sae(config, workdir, RESUMABLE_KEYS + tuple(allow_config_change))


def _train_sae(config, workdir, allowed_changes) -> TrainedRun:
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.get("keep_checkpoints", 2))
    if ckpt.latest_step() is not None:  # refuse a changed config before any work
        with contextlib.suppress(CheckpointError):  # a broken newest step: checked after the fallback below
            check_resume(config_changes(ckpt.saved_config(), config.to_dict()), allowed_changes)
    bb, bb_params = build_backbone(config.backbone)
    mesh = build_mesh(config)
    source = build_source(config.data, "train")
    trainer, hparams = build_trainer(config, bb.d_model)
    total_steps = config.total_tokens // config.batch_size
    norms = load_or_estimate_normalization(config, workdir, bb, bb_params, source, mesh)

    init_key, shuffle_key = jax.random.split(jax.random.key(config.seed))
    # One layer keeps the run's init key (runs made before several layers were possible stay the same).
    layer_keys = {i: init_key if len(config.layers) == 1 else jax.random.fold_in(init_key, i) for i in config.layers}
    states = {i: trainer.init_sweep_sharded(layer_keys[i], hparams, mesh) for i in config.layers}
    step, position, frozen = 0, None, {}
    if ckpt.latest_step() is not None:
        run = ckpt.restore({str(i): s for i, s in states.items()})
        for skipped_step, why in run.skipped:
            print(f"skipped checkpoint {skipped_step}: {why}", flush=True)
        check_resume(config_changes(run.config, config.to_dict()), allowed_changes)
        # The sweep's numbers come from the config (the same, or changed on purpose).
        states = {i: run.state[str(i)].replace(hparams=jax.tree.map(
            lambda new, old: jax.device_put(new, old.sharding), hparams, run.state[str(i)].hparams))
            for i in config.layers}
        step, position = run.step, run.extra["stream"]
        frozen = {int(layer): members for layer, members in run.extra.get("frozen", {}).items()}
        print(f"resuming from step {step} ({ckpt.directory})", flush=True)
    batches = build_stream(config, bb, bb_params, source, mesh, norms, shuffle_key, position)
    log = loop.MetricsLog(workdir, start_step=step, extra=lambda: {"skipped_images": len(source.skipped)})
    bar = loop.ProgressBar(total_steps, batch_size=config.batch_size, start_step=step)

    def record_frozen(_, metrics):
        frozen.update({layer: np.flatnonzero(m["frozen"]).tolist() for layer, m in metrics.items() if "frozen" in m})

    try:
        states = loop.fit(trainer, states, batches, steps=total_steps, mesh=mesh, start_step=step,
                          log_every=config.log_every, hooks=[log, bar, record_frozen], checkpointer=ckpt,
                          checkpoint_every=config.checkpoint_every, checkpoint_config=config.to_dict(),
                          on_nonfinite=config.get("on_nonfinite", "stop"), frozen=frozen)
    finally:
        close_all(batches.close, bar.close, log.close, ckpt.close)
    if source.skipped:
        print(f"skipped {len(source.skipped)} unreadable images: {sorted(source.skipped.values())[:3]}", flush=True)
    for layer, members in frozen.items():
        if members:
            print(f"layer {layer}: sweep member(s) {members} diverged (NaN or Inf loss) and were frozen at their "
                  f"last finite state", flush=True)
    evaluation = finish(config, workdir, bb, bb_params, mesh, trainer, states, norms, total_steps, frozen)
    return TrainedRun(trainer, states, norms, evaluation, bb, bb_params)


def close_all(*closers) -> None:
    """Call every closer. While an exception propagates, their own errors are dropped (the
    first error is the one to see); otherwise the first of them is raised."""
    failing = sys.exc_info()[1] is not None
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001
            first = first or e
    if first is not None and not failing:
        raise first


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


def finish(config, workdir, bb, bb_params, mesh, trainer, states, norms, total_steps, frozen=None) -> dict[str, Any]:
    """Evaluation on `eval_images` validation images (reconstruction, firing and dictionary
    metrics) and on `fidelity.images` of them (spliced-in fidelity, `saejax.fidelity`), and the
    portable export of every member (`sae/layer_<L>/member_<i>`); writes `eval.json`."""
    source = build_source(config.data, "validation")
    fidelity_config = config.get("fidelity", {})
    fidelity_images = fidelity_config.get("images", min(config.eval_images, 512))
    head = fidelity_head(bb, bb_params, fidelity_config.get("head", "auto"), fidelity_config.get("prompts", ()))
    members = []
    for layer, layer_states in states.items():
        batches = (acts[layer] for acts in stream.activation_batches(
            bb, bb_params, source, layers=(layer,), tokens=config.tokens, image_batch_size=config.image_batch_size,
            mesh=mesh))
        max_rows = config.eval_images * len(activations.token_indices(bb.layout, config.tokens))
        results = loop.evaluate(trainer.ae, layer_states, batches, normalization=norms[layer], max_rows=max_rows)
        sweep_params = jax.device_get(jax.jit(lambda s: s.params, out_shardings=sharding.replicated(mesh))(layer_states))
        if fidelity_images:
            spliced = fidelity.spliced_fidelity(
                bb, bb_params, trainer.ae, sweep_params, source,
                layer=layer, tokens=config.tokens, head=head,
                normalization=norms[layer], batch_size=config.image_batch_size, max_images=fidelity_images)
            for result, extra in zip(results, spliced, strict=True):
                result.update(extra)
        for i, result in enumerate(results):
            summary = {k: v for k, v in result.items() if k not in loop.PER_LATENT_KEYS}
            info = {"backbone": config.backbone.get("name") or "random", "layer": layer, "tokens": config.tokens,
                    "steps": total_steps, "batch_size": config.batch_size, "eval": summary}
            params = jax.tree.map(lambda a: a[i], sweep_params)  # noqa: B023
            path = os.path.join(workdir, "sae", f"layer_{layer}", f"member_{i}")
            if jax.process_index() == 0:
                save_sae(path, trainer.ae, params, normalization=norms[layer], info=info)
            members.append({"layer": layer, "member": i, "path": path, "frozen": i in (frozen or {}).get(layer, []),
                            **result})
    evaluation = {"steps": total_steps, "members": members}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(evaluation, f)
        report.write_sweep_report(workdir)
        for r in members:
            score = (f", fidelity {r['fidelity']:.3f}" if "fidelity" in r else
                     f", pooled fidelity {r['fidelity_pooled']:.3f}" if "fidelity_pooled" in r else "")
            print(f"layer {r['layer']} member {r['member']}: lr {r['learning_rate']:.2g} lambda "
                  f"{r['sparsity_coeff']:.2g} -> L0 {r['l0']:.1f}, NMSE {r['nmse']:.3f}, explained variance "
                  f"{r['explained_variance']:.3f}, dead {r['dead_fraction']:.3f}, dense {r['dense_fraction']:.3f}"
                  f"{score}", flush=True)
    return evaluation
