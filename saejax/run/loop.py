"""The training loop: `fit` trains one SAE sweep per layer on an activation stream, and
`evaluate` scores trained SAEs on held-out activations. Side effects (checkpoints, signals,
logs) live here, at the edge; the step itself is `saejax.train`'s pure function.

>>> mesh = saejax.sharding.make_mesh()
>>> states = {10: trainer.init_sweep_sharded(jax.random.key(0), hparams, mesh)}
>>> states = fit(trainer, states, stream, steps=1000, mesh=mesh, hooks=[ProgressBar(1000, batch_size=4096)])

`fit` dispatches step t+1 before it reads step t's metrics, so the host never stalls the
device; a NaN or Inf loss stops it (`NonFiniteLossError`), and SIGTERM or SIGINT saves a
checkpoint and raises `Preempted`. Checkpoints are written by orbax in the background.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from saejax import sharding as shd
from saejax.core import train
from saejax.checkpoint import TrainCheckpointer
from saejax.core import metrics
from saejax.core.metrics import FiringStats
from saejax.core.normalization import Normalization
from saejax.core.sae import SAE
from saejax.core.sweep_step import jit_sweep_step
from saejax.run.logs import Metrics, MetricsHook, MetricsLog, ProgressBar, read_metrics  # noqa: F401 - the loop's hooks

__all__ = ["MetricsLog", "NonFiniteLossError", "Preempted", "ProgressBar", "evaluate", "fit", "read_metrics"]


class NonFiniteLossError(RuntimeError):
    """A training loss (or the parameters about to be saved) became NaN or Inf."""


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint of `step` was saved (when a checkpointer was
    given). Rerun the same thing to resume."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (main thread only).

    Several processes must stop at the same step, or their checkpoint would mix steps. There
    SIGTERM is left to JAX's preemption service (started by `jax.distributed.initialize`), which
    tells every process the first step that all of them can still reach; `due(step)` is True at
    that step on every process.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.multihost = self.enabled and jax.process_count() > 1
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if self.enabled and not self.multihost:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def due(self, step: int) -> bool:
        if self.multihost and multihost_utils.reached_preemption_sync_point(step):
            self.signum = signal.SIGTERM
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_finite(tree) -> bool:
    return bool(jax.device_get(jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)),
                                                                              tree))))


def _host(metrics: Mapping[int, Mapping[str, jax.Array]]) -> Metrics:
    return {layer: {k: np.asarray(v) for k, v in m.items()} for layer, m in jax.device_get(dict(metrics)).items()}


def fit(trainer: train.Trainer, states: Mapping[int, train.TrainState], stream: Iterator[Mapping[int, jax.Array]],
        *, steps: int, mesh: Mesh | None = None, start_step: int = 0, log_every: int = 1,
        hooks: Sequence[MetricsHook] = (), step_hooks: Sequence[Callable[[int], None]] = (),
        state_hooks: Sequence[tuple[int, Callable[[int, Any], None]]] = (),
        checkpointer: TrainCheckpointer | None = None, checkpoint_every: int = 0,
        checkpoint_config: Mapping[str, Any] | None = None, handle_signals: bool = True,
        on_nonfinite: str = "stop", frozen: Mapping[int, Sequence[int]] | None = None) -> dict[int, train.TrainState]:
    """Trains `states` (a stacked sweep per layer) on `stream` up to step `steps`.

    Args:
        trainer: the static training configuration.
        states: `{layer: TrainState}` (stacked sweeps, e.g. from `Trainer.init_sweep_sharded`);
            donated to the step, so use the returned states, not these.
        stream: yields `{layer: [B, D]}` batches (an `ActivationStream`); it must have
            `position()` when checkpoints are written.
        steps: the step to stop at (total, counting the steps already done).
        mesh: the device mesh (default: every device on `data`).
        start_step: steps already done (when resuming).
        log_every: hooks get the metrics of every this many steps (and of the last).
        hooks: `hook(step, {layer: {name: [members]}})`, called with host metrics one step
            late (`MetricsLog`, `ProgressBar`, or your own).
        step_hooks: `fn(step)` after every step is dispatched, with the host step number (no
            device values, so it must not block: `PeerWatchdog.progress`, a heartbeat).
        state_hooks: `(every, fn)` pairs; `fn(step, states)` runs after every `every` steps
            with the current states (an evaluation, a custom export). It may block.
        checkpointer: where checkpoints go (None: no checkpoints).
        checkpoint_every: steps between checkpoints (0: only the final one and on signals).
        checkpoint_config: JSON saved with each checkpoint (the run's config).
        handle_signals: on SIGTERM/SIGINT, save a checkpoint and raise `Preempted`. With
            several processes, SIGTERM to any of them (a preemption notice) stops all of them
            at the same step, through JAX's preemption service.
        on_nonfinite: "stop" (a NaN or Inf loss raises `NonFiniteLossError`) or "freeze": the
            member keeps its last finite state and stops training, the others go on. Hooks see
            `frozen` (1.0 for frozen members) in the metrics, and checkpoints record the frozen
            members in their extras (`extra["frozen"]`: `{layer: [members]}`).
        frozen: `{layer: [members]}` already frozen (from a checkpoint's extras, on resume).

    Returns:
        The trained `{layer: TrainState}`, in memory.

    Raises:
        ValueError: `log_every` < 1 or `checkpoint_every` < 0 (before any work).
        NonFiniteLossError: a logged loss, or the parameters at a checkpoint, are not finite;
            the newest checkpoint is then the last good one.
        Preempted: after a signal (and its checkpoint).
        Exception: any other error (an unreadable image, a full disk, a failing hook) first
            saves a checkpoint of the last completed step, when it can, then propagates.
    """
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only the final checkpoint), got "
                         f"{checkpoint_every!r}")
    if on_nonfinite not in ("stop", "freeze"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'freeze', got {on_nonfinite!r}")
    mesh = shd.make_mesh() if mesh is None else mesh
    states = dict(states)
    freeze = on_nonfinite == "freeze"
    jitted = {layer: jit_sweep_step(trainer, s, mesh, freeze_nonfinite=freeze) for layer, s in states.items()}
    masks = {layer: _member_mask(mesh, int(s.step.shape[0]), (frozen or {}).get(layer, ())) for layer, s in states.items()}
    step, pending = start_step, None

    def report(pending):
        at, metrics = pending
        host = _host(metrics)
        for layer, m in host.items():
            bad = np.flatnonzero(~np.isfinite(m["loss"]) & ~(m.get("frozen", 0) > 0))
            if bad.size:
                raise NonFiniteLossError(
                    f"loss is {m['loss'][bad[0]]} at step {at} for layer {layer}, sweep member(s) {bad.tolist()}; "
                    f"stopping. The newest checkpoint ({_latest(checkpointer)}) is the last good one.")
        for hook in hooks:
            hook(at, host)

    saved_at = start_step

    def save(at):
        nonlocal saved_at
        if checkpointer is None:
            return
        if not _all_finite({layer: s.params for layer, s in states.items()}):
            raise NonFiniteLossError(f"parameters are not finite at step {at}; not saving. The newest checkpoint "
                                     f"({_latest(checkpointer)}) is the last good one.")
        extra = {"stream": stream.position()} if hasattr(stream, "position") else {}
        if freeze:
            extra["frozen"] = {str(layer): np.flatnonzero(jax.device_get(mask)).tolist() for layer, mask in masks.items()}
        checkpointer.save(at, {str(layer): s for layer, s in states.items()}, config=dict(checkpoint_config or {}),
                          extra=extra, wait=False)
        saved_at = at

    consistent = True  # the states and the stream's position are both at `step`
    try:
        with _SignalFlag(handle_signals) as signals:
            while step < steps:
                batch = next(stream)
                consistent = False
                metrics = {}
                for layer, (step_fn, _) in jitted.items():
                    if freeze:
                        states[layer], metrics[layer], masks[layer] = step_fn(states[layer], batch[layer], masks[layer])
                        metrics[layer] = dict(metrics[layer], frozen=masks[layer])
                    else:
                        states[layer], metrics[layer] = step_fn(states[layer], batch[layer])
                step += 1
                for hook in step_hooks:
                    hook(step)
                if trainer.resample_due(step):
                    for layer, (_, resample_fn) in jitted.items():
                        if freeze:
                            states[layer], _, masks[layer] = resample_fn(states[layer], batch[layer], masks[layer])
                        else:
                            states[layer], _ = resample_fn(states[layer], batch[layer])
                consistent = True
                if pending is not None:  # step - 1's metrics, read while the device runs this step
                    report(pending)
                    pending = None
                if step % log_every == 0 or step == steps:
                    pending = (step, metrics)
                for every, fn in state_hooks:
                    if step % every == 0:
                        fn(step, states)
                interrupted = signals.due(step)
                if interrupted or step == steps or (checkpoint_every and step % checkpoint_every == 0):
                    if pending is not None:
                        report(pending)
                        pending = None
                    save(step)
                if interrupted:
                    if checkpointer is not None:
                        checkpointer.wait_until_finished()
                    raise Preempted(signals.signum, step)
    except (NonFiniteLossError, Preempted):
        raise
    except Exception as error:
        # Anything else (an unreadable image, a full disk, a bug in a hook): keep the steps done
        # since the last checkpoint, then let the error go on.
        if checkpointer is not None and consistent and step > saved_at:
            try:
                save(step)
                checkpointer.wait_until_finished()
                error.add_note(f"saejax: saved a checkpoint of step {step} before stopping")
            except Exception as also:  # noqa: BLE001 - the first error is the one to report
                error.add_note(f"saejax: could not save step {step} ({type(also).__name__}: {also})")
        if checkpointer is not None:
            with contextlib.suppress(Exception):  # the error to report is the first one
                error.add_note(f"saejax: the newest complete checkpoint is step {_latest(checkpointer)} in "
                               f"{checkpointer.directory}")
        raise
    if checkpointer is not None:
        checkpointer.wait_until_finished()
    return states


def _member_mask(mesh: Mesh, members: int, chosen: Sequence[int]) -> jax.Array:
    """bool [members], True for `chosen`, replicated over the mesh."""
    mask = np.zeros(members, bool)
    mask[list(chosen)] = True
    return jax.make_array_from_callback((members,), shd.replicated(mesh), lambda index: mask[index])


def _latest(checkpointer: TrainCheckpointer | None):
    return None if checkpointer is None else checkpointer.latest_step()


PER_LATENT_KEYS = ("frequency", "mean_when_firing", "encoder_decoder_cosine", "max_decoder_cosine")
NEAR_DUPLICATE_COSINE = 0.9


def evaluate(ae: SAE, states: train.TrainState, batches: Iterable[jax.Array], *,
             normalization: Normalization | None = None, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Every metric of the SAE core for each member of a stacked sweep, streamed over raw
    activation batches `[N, D]` (normalised here with `normalization`).

    NMSE, explained variance and the reconstruction ratios use sums over all the rows seen, so
    the result equals `saejax.metrics` on the concatenated rows.

    Returns:
        Per member: learning_rate, sparsity_coeff, k, tokens; reconstruction: l0, mse, nmse,
        explained_variance, cosine (mean cos(x, x_hat)), l2_ratio (mean ||x_hat|| / ||x||),
        relative_reconstruction_bias (gamma; < 1 is shrinkage); firing: dead_fraction,
        dense_fraction, log10_frequency_histogram (`{"edges", "counts", "dead"}`); dictionary:
        mean_encoder_decoder_cosine, near_duplicate_fraction (latents whose decoder row has
        cosine > 0.9 with another's); and the per-latent lists `PER_LATENT_KEYS`.
    """
    members = int(states.step.shape[0])

    def one(stats, sums, params, x):
        z = ae.encode(params, x)
        return stats.update(z), sums.update(x, ae.decode(params, z))

    @jax.jit
    def update(stats, sums, params, raw):
        x = raw if normalization is None else normalization.apply(raw)
        return jax.vmap(one, in_axes=(0, 0, 0, None))(stats, sums, params, x)

    @jax.jit
    def dictionary(params):
        return jax.vmap(lambda p: (metrics.encoder_decoder_cosine(p.w_enc, p.w_dec),
                                   metrics.max_decoder_cosine(p.w_dec)))(params)

    stats = jax.vmap(lambda _: FiringStats.zeros(ae.d_sae))(jnp.arange(members))
    sums = jax.vmap(lambda _: metrics.ReconstructionSums.zeros(ae.d_model))(jnp.arange(members))
    for raw in batches:
        stats, sums = update(stats, sums, states.params, raw)
        if max_rows is not None and float(sums.n[0]) >= max_rows:
            break
    stats, sums = jax.device_get((stats, sums))
    if float(sums.n[0]) == 0:
        raise ValueError("evaluate: the batches held no rows")
    enc_dec, max_dec = jax.device_get(dictionary(states.params))
    hparams = jax.device_get(states.hparams)
    reconstruction = jax.device_get(jax.vmap(metrics.ReconstructionSums.result)(sums))
    results = []
    for i in range(members):
        member = jax.tree.map(lambda a: a[i], stats)  # noqa: B023
        frequency = member.frequency()
        counts, dead = metrics.log10_frequency_histogram(frequency)
        results.append({
            "learning_rate": float(hparams.learning_rate[i]), "sparsity_coeff": float(hparams.sparsity_coeff[i]),
            "k": int(hparams.k[i]), "l0": float(np.sum(member.counts) / member.n_inputs),
            **{name: float(value[i]) for name, value in reconstruction.items()},
            "dead_fraction": float(member.dead_fraction()), "dense_fraction": float(member.dense_fraction()),
            "mean_encoder_decoder_cosine": float(np.mean(enc_dec[i])),
            "near_duplicate_fraction": float(np.mean(max_dec[i] > NEAR_DUPLICATE_COSINE)),
            "log10_frequency_histogram": {"edges": list(metrics.LOG10_FREQUENCY_BINS),
                                          "counts": np.asarray(counts).tolist(), "dead": int(dead)},
            "tokens": int(sums.n[i]), "frequency": np.asarray(frequency).tolist(),
            "mean_when_firing": np.asarray(member.mean_when_firing()).tolist(),
            "encoder_decoder_cosine": np.asarray(enc_dec[i]).tolist(),
            "max_decoder_cosine": np.asarray(max_dec[i]).tolist(),
        })
    return results
