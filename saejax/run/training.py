"""A whole training run in a workdir, from objects: resume, the normalisation cache, training,
evaluation, export and the report.

>>> spec = RunSpec(bb, bb_params, train_source, validation_source, trainer, hparams,
...                layers=(10,), total_tokens=100_000_000, mesh=saejax.sharding.make_mesh())
>>> trained = run_training(spec, "/tmp/run")     # rerun the same call to resume
>>> trained.evaluation["members"][0]["nmse"]

`saejax train` (`saejax.cli.train_sae`) builds a `RunSpec` from a config file and calls
`run_training`; a notebook or another program can do the same with its own objects. The
workdir layout is described in `saejax.cli.train_sae`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from saejax import sharding
from saejax.analysis import fidelity
from saejax.analysis.site import Site
from saejax.checkpoint import CheckpointError, TrainCheckpointer, save_sae
from saejax.checkpoint.staging import write_atomically
from saejax.checkpoint.workdir import WorkdirLock, check_resume, config_changes
from saejax.core import train
from saejax.core.normalization import Normalization
from saejax.data import activations, stream
from saejax.data.sources import Source
from saejax.provenance import check_written_by, written_by
from saejax.run import loop, report
from saejax.run.logs import MetricsLog, ProgressBar

__all__ = ["RESUMABLE_KEYS", "RunSpec", "TrainedRun", "cached_normalization", "close_all", "evaluate_and_export",
           "run_training"]

# Provenance keys a resumed run may change without saying so: how long it runs, how it
# reports, and whether it skips images that cannot be decoded anyway.
RESUMABLE_KEYS = ("total_tokens", "log_every", "checkpoint_every", "keep_checkpoints", "eval_images",
                  "data.skip_unreadable", "fidelity")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a training run is made of.

    Attributes:
        backbone, backbone_params: the ViT and its params (`saejax.backbones.load`).
        train_source, validation_source: images to train on and to evaluate on.
        trainer, hparams: the SAE trainer and the sweep (`train.make_trainer`, `train.Hparams.grid`).
        layers: the blocks whose residual stream is read; one sweep each.
        tokens: "patches", "cls", "registers" or "all".
        total_tokens: tokens trained on; `total_tokens // batch_size` steps.
        batch_size: tokens per step. image_batch_size: images per harvest call.
        buffer_tokens: the shuffle buffer (tokens); shuffle_groups: see `ActivationStream`.
        normalization_samples: activations drawn to estimate each layer's mean and scale.
        seed: the SAEs' init and the shuffle. data_seed: the order of the images.
        mesh: the devices (`sharding.make_mesh()` when None).
        log_every, checkpoint_every, keep_checkpoints, on_nonfinite: see `loop.fit`.
        eval_images: validation images for the reconstruction and firing metrics.
        fidelity_images: of those, how many to splice through (`fidelity.spliced_fidelity`; 0: none).
        fidelity_head: the readout fidelity compares (`fidelity.classifier_head`, a zero-shot
            head, or None for the pooled embedding only).
        backbone_name: recorded in each exported SAE's info.
        provenance: a JSON-able description of the run (e.g. the config), saved with every
            checkpoint; a resumed run must match it except in `resumable_keys`.
        normalization_identity: what the cached normalisation depends on besides the layers
            (default: the backbone's name and the token set); a cache made for another is refused.
        resumable_keys: provenance keys a resume may change (see `RESUMABLE_KEYS`).
        step_hooks: `fn(step)` after every step (`loop.fit`'s; `saejax train` passes its
            `PeerWatchdog.progress`).
    """

    backbone: Any
    backbone_params: Any
    train_source: Source
    validation_source: Source
    trainer: train.Trainer
    hparams: train.Hparams
    layers: tuple[int, ...]
    total_tokens: int
    tokens: str = "patches"
    batch_size: int = 4096
    image_batch_size: int = 256
    buffer_tokens: int = 2**20
    shuffle_groups: int | None = None
    normalization_samples: int = 2**16
    seed: int = 0
    data_seed: int = 0
    mesh: Mesh | None = None
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"
    eval_images: int = 512
    fidelity_images: int = 512
    fidelity_head: fidelity.Head | None = None
    backbone_name: str = "unnamed"
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    normalization_identity: Mapping[str, Any] | None = None
    resumable_keys: tuple[str, ...] = RESUMABLE_KEYS
    step_hooks: tuple[Callable[[int], None], ...] = ()

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    def identity(self) -> dict[str, Any]:
        given = self.normalization_identity
        return json.loads(json.dumps(given if given is not None else
                                     {"backbone": self.backbone_name, "tokens": self.tokens}))


class TrainedRun(NamedTuple):
    """What `run_training` returns: everything needed to use the SAEs without reading the disk."""

    trainer: train.Trainer
    states: dict[int, train.TrainState]
    normalization: dict[int, Normalization]
    evaluation: dict[str, Any]
    bb: Any
    bb_params: Any


def run_training(spec: RunSpec, workdir: str, *, allow_changes: tuple[str, ...] = ()) -> TrainedRun:
    """Train (or resume) `spec` in `workdir`, then evaluate, export and write the report.

    Raises:
        WorkdirBusyError: another run holds the workdir.
        ConfigChangedError: resuming with a provenance that differs in keys other than
            `spec.resumable_keys` and `allow_changes`.
        ValueError: the cached normalisation was made for another backbone, token set or layers.
    """
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        if getattr(lock, "took_over_from", None):
            print(f"took over the workdir lock left by PID {lock.took_over_from['pid']} on host "
                  f"{lock.took_over_from.get('host')} (that process is gone)", flush=True)
        return _run(spec, workdir, tuple(spec.resumable_keys) + tuple(allow_changes))


def _run(spec: RunSpec, workdir: str, allowed_changes: tuple[str, ...]) -> TrainedRun:
    provenance = json.loads(json.dumps(dict(spec.provenance)))
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=spec.keep_checkpoints)
    if ckpt.latest_step() is not None:  # refuse a changed run before any work
        with contextlib.suppress(CheckpointError):  # a broken newest step: checked after the fallback below
            check_resume(config_changes(ckpt.saved_config(), provenance), allowed_changes)
    mesh = spec.mesh if spec.mesh is not None else sharding.make_mesh()
    bb, bb_params, source = spec.backbone, spec.backbone_params, spec.train_source

    def estimate():
        batches = stream.activation_batches(bb, bb_params, source, layers=spec.layers, tokens=spec.tokens,
                                            image_batch_size=spec.image_batch_size, mesh=mesh,
                                            seed=spec.data_seed + 1, epochs=None)
        return stream.estimate_layer_normalization(batches, spec.normalization_samples,
                                                   jax.random.key(spec.seed + 1))

    norms = cached_normalization(os.path.join(workdir, "normalization.npz"), spec.identity(), spec.layers, estimate)

    init_key, shuffle_key = jax.random.split(jax.random.key(spec.seed))
    # One layer keeps the run's init key (runs made before several layers were possible stay the same).
    layer_keys = {i: init_key if len(spec.layers) == 1 else jax.random.fold_in(init_key, i) for i in spec.layers}
    states = {i: spec.trainer.init_sweep_sharded(layer_keys[i], spec.hparams, mesh) for i in spec.layers}
    step, position, frozen = 0, None, {}
    if ckpt.latest_step() is not None:
        restored = ckpt.restore({str(i): s for i, s in states.items()})
        for skipped_step, why in restored.skipped:
            print(f"skipped checkpoint {skipped_step}: {why}", flush=True)
        check_resume(config_changes(restored.config, provenance), allowed_changes)
        # The sweep's numbers come from the spec (the same, or changed on purpose).
        states = {i: restored.state[str(i)].replace(hparams=jax.tree.map(
            lambda new, old: jax.device_put(new, old.sharding), spec.hparams, restored.state[str(i)].hparams))
            for i in spec.layers}
        step, position = restored.step, restored.extra["stream"]
        frozen = {int(layer): members for layer, members in restored.extra.get("frozen", {}).items()}
        print(f"resuming from step {step} ({ckpt.directory})", flush=True)
    batches = stream.ActivationStream(
        bb, bb_params, source, layers=spec.layers, tokens=spec.tokens, batch_size=spec.batch_size,
        image_batch_size=spec.image_batch_size, buffer_tokens=spec.buffer_tokens, normalization=norms,
        mesh=mesh, key=shuffle_key, seed=spec.data_seed, groups=spec.shuffle_groups, position=position)
    log = MetricsLog(workdir, start_step=step, extra=lambda: {"skipped_images": len(source.skipped)})
    bar = ProgressBar(spec.total_steps, batch_size=spec.batch_size, start_step=step)

    def record_frozen(_, metrics):
        frozen.update({layer: np.flatnonzero(m["frozen"]).tolist() for layer, m in metrics.items() if "frozen" in m})

    try:
        states = loop.fit(spec.trainer, states, batches, steps=spec.total_steps, mesh=mesh, start_step=step,
                          log_every=spec.log_every, hooks=[log, bar, record_frozen], step_hooks=spec.step_hooks,
                          checkpointer=ckpt,
                          checkpoint_every=spec.checkpoint_every, checkpoint_config=provenance,
                          on_nonfinite=spec.on_nonfinite, frozen=frozen)
    finally:
        close_all(batches.close, bar.close, log.close, ckpt.close)
    if source.skipped:
        print(f"skipped {len(source.skipped)} unreadable images: {sorted(source.skipped.values())[:3]}", flush=True)
    for layer, members in frozen.items():
        if members:
            print(f"layer {layer}: sweep member(s) {members} diverged (NaN or Inf loss) and were frozen at their "
                  f"last finite state", flush=True)
    evaluation = evaluate_and_export(spec, workdir, states, norms, frozen, mesh=mesh)
    return TrainedRun(spec.trainer, states, norms, evaluation, bb, bb_params)


def cached_normalization(path: str, identity: Mapping[str, Any], layers: tuple[int, ...],
                         estimate: Callable[[], dict[int, Normalization]]) -> dict[int, Normalization]:
    """`{layer: Normalization}` read from `path`, or `estimate()`d and saved there (process 0),
    keyed to `identity` and the layers.

    Raises:
        ValueError: the saved statistics were made for another identity, or lack a layer.
    """
    identity = json.loads(json.dumps(dict(identity)))
    if os.path.exists(path):
        saved, stored = read_normalization(path)
        missing = [i for i in layers if i not in stored]
        if saved != identity or missing:
            what = (f"layers {missing} are not in it" if saved == identity else
                    "it was estimated for " + "; ".join(f"{k}: {v!r} -> {n!r}" for k, (v, n) in
                                                        config_changes(saved or {}, identity).items()))
            raise ValueError(f"{path} does not fit this run: {what}. Delete it to estimate it again, or use "
                             f"another workdir")
        return {i: stored[i] for i in layers}
    norms = estimate()
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        arrays = {f"{name}_{i}": np.asarray(getattr(n, name)) for i, n in norms.items() for name in ("mean", "scalar")}
        np.savez(tmp, identity=np.asarray(json.dumps(identity)), written_by=np.asarray(json.dumps(written_by())),
                 **arrays)
        os.replace(tmp, path)
    return norms


def read_normalization(path: str) -> tuple[Any, dict[int, Normalization]]:
    """`(identity, {layer: Normalization})` of a `normalization.npz` (`cached_normalization`).

    Raises:
        ValueError: naming the file, when it is not such a file (damaged, cut short, or another
            kind of .npz): delete it and the next run estimates the statistics again.
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            identity = json.loads(str(stored["identity"]))
            if "written_by" in stored.files:  # absent in files from before versions were recorded
                check_written_by(json.loads(str(stored["written_by"])), path)
            norms = {}
            for name in stored.files:
                if name.startswith("mean_"):
                    layer = int(name.removeprefix("mean_"))
                    mean, scalar = stored[name], stored[f"scalar_{layer}"]
                    if mean.ndim != 1 or mean.dtype.kind != "f" or scalar.shape != () or not np.isfinite(mean).all() \
                            or not float(scalar) > 0:
                        raise ValueError(f"layer {layer}: mean {mean.dtype}{list(mean.shape)}, scalar {scalar!r}")
                    norms[layer] = Normalization(jnp.asarray(mean), jnp.asarray(scalar))
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and json each raise their own types
        raise ValueError(f"{path}: not a readable normalization.npz ({type(e).__name__}: {e}); delete it to "
                         f"estimate the statistics again") from e
    return identity, norms


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


def evaluate_and_export(spec: RunSpec, workdir: str, states: Mapping[int, train.TrainState],
                        norms: Mapping[int, Normalization], frozen: Mapping[int, list[int]] | None = None, *,
                        mesh: Mesh | None = None) -> dict[str, Any]:
    """Evaluation on `spec.eval_images` validation images (reconstruction, firing and dictionary
    metrics) and on `spec.fidelity_images` of them (spliced-in fidelity, `saejax.fidelity`),
    the portable export of every member (`sae/layer_<L>/member_<i>`), `eval.json` and
    `report.html`. Returns what `eval.json` holds."""
    mesh = mesh if mesh is not None else sharding.make_mesh()
    bb, bb_params, source, ae = spec.backbone, spec.backbone_params, spec.validation_source, spec.trainer.ae
    tokens_per_image = len(activations.token_indices(bb.layout, spec.tokens))
    members = []
    for layer, layer_states in states.items():
        sweep_params = jax.device_get(jax.jit(lambda s: s.params, out_shardings=sharding.replicated(mesh))(layer_states))
        batches = (acts[layer] for acts in stream.activation_batches(
            bb, bb_params, source, layers=(layer,), tokens=spec.tokens, image_batch_size=spec.image_batch_size,
            mesh=mesh))
        results = loop.evaluate(ae, layer_states, batches, normalization=norms[layer],
                                max_rows=spec.eval_images * tokens_per_image)
        if spec.fidelity_images:
            sweep_site = Site(bb, bb_params, layer=layer, ae=ae, sae_params=sweep_params, norm=norms[layer])
            spliced = fidelity.spliced_fidelity(
                sweep_site, source, tokens=spec.tokens, head=spec.fidelity_head, batch_size=spec.image_batch_size,
                max_images=spec.fidelity_images, mesh=mesh)
            for result, extra in zip(results, spliced, strict=True):
                result.update(extra)
        for i, result in enumerate(results):
            summary = {k: v for k, v in result.items() if k not in loop.PER_LATENT_KEYS}
            info = {"backbone": spec.backbone_name, "layer": layer, "tokens": spec.tokens,
                    "steps": spec.total_steps, "batch_size": spec.batch_size, "eval": summary}
            params = jax.tree.map(lambda a: a[i], sweep_params)  # noqa: B023
            path = os.path.join(workdir, "sae", f"layer_{layer}", f"member_{i}")
            if jax.process_index() == 0:
                save_sae(path, ae, params, normalization=norms[layer], info=info)
            members.append({"layer": layer, "member": i, "path": path, "frozen": i in (frozen or {}).get(layer, []),
                            **result})
    evaluation = {"steps": spec.total_steps, "members": members}
    if jax.process_index() == 0:
        write_atomically(os.path.join(workdir, "eval.json"), json.dumps({**evaluation, "written_by": written_by()}))
        report.write_sweep_report(workdir)
        for r in members:
            print(_member_line(r), flush=True)
    return evaluation


def _member_line(r: Mapping[str, Any]) -> str:
    score = (f", fidelity {r['fidelity']:.3f}" if "fidelity" in r else
             f", pooled fidelity {r['fidelity_pooled']:.3f}" if "fidelity_pooled" in r else "")
    return (f"layer {r['layer']} member {r['member']}: lr {r['learning_rate']:.2g} lambda "
            f"{r['sparsity_coeff']:.2g} -> L0 {r['l0']:.1f}, NMSE {r['nmse']:.3f}, explained variance "
            f"{r['explained_variance']:.3f}, dead {r['dead_fraction']:.3f}, dense {r['dense_fraction']:.3f}{score}")
