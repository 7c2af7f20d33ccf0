"""The training loop behind `experiments.train_sae` (and the demo): see that module for the
workdir layout and resume behaviour."""


from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saejax import activations, backbones, data, sae, sharding, train
from saejax import metrics as sae_metrics
from saejax.checkpoint import TrainCheckpointer, save_sae
from saejax.losses import Objective
from saejax.normalization import Normalization

class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or Inf."""


# ------------------------------------------------------------------------------------ setup

def build_source(cfg: ml_collections.ConfigDict, split: str) -> data.Source:
    """The image source a config names (`split`: "train" or "validation").

    `cfg.kind` and its keys: "tfds" (`name`, `<split>_split`, `data_dir`, `image_size`,
    `label_key`), "folder" (`<split>_dir`, `image_size`), "shapes" (`<split>_images`, `seed`,
    `image_size`, 40 by default) or "random" (`<split>_images`, `seed`, `image_size`).
    """
    if cfg.kind == "tfds":
        return data.TfdsSource(cfg.name, cfg.get(f"{split}_split"), data_dir=cfg.get("data_dir"),
                               image_size=cfg.get("image_size"), label_key=cfg.get("label_key", "label"))
    if cfg.kind == "folder":
        return data.ImageFolderSource(cfg.get(f"{split}_dir"), image_size=cfg.get("image_size"))
    if cfg.kind == "shapes":
        from saejax.datasets import shapes
        return shapes.source(split, cfg.get(f"{split}_images"), seed=cfg.seed, image_size=cfg.get("image_size", 40))
    if cfg.kind == "random":  # uint8 noise; for smoke tests of the plumbing
        rng = np.random.default_rng(cfg.seed + (split == "validation"))
        n = cfg.get(f"{split}_images")
        return data.ArraySource(rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8))
    raise ValueError(f"unknown data kind {cfg.kind!r}; expected tfds, folder, shapes or random")


def build_backbone(cfg: ml_collections.ConfigDict):
    if cfg.get("random"):
        path = backbones.create_random(cfg.random.family, os.path.join(cfg.random.directory), seed=cfg.random.seed,
                                       **cfg.random.sizes)
        return backbones.load(path, cache_dir=False)
    return backbones.load(cfg.name, dtype=jnp.dtype(cfg.get("dtype", "float32")))


def build_trainer(config, d_model: int) -> tuple[train.Trainer, train.Hparams]:
    s = config.sae
    d_sae = s.expansion * d_model
    if s.architecture in ("topk", "batchtopk"):
        ae = getattr(sae, s.architecture)(d_model, d_sae, k=s.k)
    else:
        ae = getattr(sae, s.architecture)(d_model, d_sae)
    trainer = train.make_trainer(
        ae, objective=Objective(**config.objective), dead_after_tokens=config.dead_after_tokens,
        resample_every=config.resample_every, resample_until=config.get("resample_until"), **config.optimizer)
    return trainer, train.Hparams.grid(**config.sweep)


class ActivationStream:
    """Normalised SAE batches from images: harvest -> shuffle buffer -> batches.

    The buffer holds about `buffer_tokens` rows. Fill f starts at data position `fill_start`
    and is read in the order drawn with key `fold_in(key, f)`, so `position()` (fill index, fill
    start, batches taken) is enough to replay the stream exactly after a restart.
    """

    def __init__(self, config, bb, bb_params, source, mesh, norm: Normalization, key, *, fill_index: int = 0,
                 fill_start: int = 0, taken: int = 0):
        self.config, self.bb, self.source, self.mesh, self.key = config, bb, source, mesh, key
        self.bb_params = jax.device_put(bb_params, sharding.replicated(mesh))
        self.harvest = activations.make_harvest(bb, (config.layer,), tokens=config.tokens, mesh=mesh)
        rows_per_harvest = config.image_batch_size * len(activations.token_indices(bb.layout, config.tokens))
        capacity = max(1, config.buffer_tokens // rows_per_harvest) * rows_per_harvest
        if capacity < config.batch_size:
            raise ValueError(f"buffer_tokens={config.buffer_tokens} holds fewer rows than one batch "
                             f"({config.batch_size}); raise buffer_tokens")
        self.batches_per_fill = capacity // config.batch_size
        self.pushes_per_fill = capacity // rows_per_harvest
        self.buffer = activations.ShuffleBuffer.create(capacity, bb.d_model, mesh=mesh)
        self._push = jax.jit(activations.push, donate_argnums=0)
        self._shuffle = jax.jit(activations.shuffle, donate_argnums=0)
        batch_size = config.batch_size

        @jax.jit
        def take(buf):
            buf, batch = activations.take(buf, batch_size)
            return buf, norm.apply(batch.acts[0])

        self._take = take
        self.fill_index, self.fill_start, self.taken = fill_index, fill_start, taken
        self._fill(skip=taken)

    def _fill(self, skip: int = 0) -> None:
        images = data.batches(self.source, self.config.image_batch_size, seed=self.config.data.seed,
                              start=self.fill_start, process_index=jax.process_index(),
                              process_count=jax.process_count())
        buf = self.buffer.clear()
        for _ in range(self.pushes_per_fill):
            batch = next(images)
            out = self.harvest(self.bb_params, self._device_images(batch.images), jnp.asarray(batch.ids, jnp.int32))
            buf = self._push(buf, out.acts[self.config.layer], out.image_ids, out.token_ids)
            self.next_fill_start = batch.position
        self.buffer = self._shuffle(buf, jax.random.fold_in(self.key, self.fill_index))
        for _ in range(skip):  # batches of this fill already used before a restart
            self.buffer, _ = self._take(self.buffer)

    def _device_images(self, images_uint8: np.ndarray) -> jax.Array:
        return jax.device_put(self.bb.preprocess(images_uint8), sharding.batch_sharding(self.mesh, 4))

    def next(self) -> jax.Array:
        """The next normalised batch [batch_size, D]."""
        if self.taken == self.batches_per_fill:
            self.fill_index, self.fill_start, self.taken = self.fill_index + 1, self.next_fill_start, 0
            self._fill()
        self.buffer, x = self._take(self.buffer)
        self.taken += 1
        return x

    def position(self) -> dict[str, int]:
        return {"fill_index": self.fill_index, "fill_start": self.fill_start, "taken": self.taken}


def activation_batches(config, bb, bb_params, source, mesh, *, seed: int, shuffle: bool = True):
    """Raw [N, D] activations of `config.layer`, image batch by image batch (no buffer)."""
    harvest = activations.make_harvest(bb, (config.layer,), tokens=config.tokens, mesh=mesh)
    params = jax.device_put(bb_params, sharding.replicated(mesh))
    for batch in data.batches(source, config.image_batch_size, seed=seed if shuffle else None, shuffle=shuffle,
                              epochs=1, drop_remainder=True):
        images = jax.device_put(bb.preprocess(batch.images), sharding.batch_sharding(mesh, 4))
        yield harvest(params, images, jnp.asarray(batch.ids, jnp.int32)).acts[config.layer]


def load_or_estimate_normalization(config, workdir, bb, bb_params, source, mesh) -> Normalization:
    """Statistics saved in the workdir, or estimated from `normalization_samples` activations
    drawn across the training images (and then saved)."""
    path = os.path.join(workdir, "normalization.npz")
    if os.path.exists(path):
        stored = np.load(path)
        return Normalization(jnp.asarray(stored["mean"]), jnp.asarray(stored["scalar"]))
    stream = activation_batches(config, bb, bb_params, source, mesh, seed=config.data.seed + 1)
    norm = activations.estimate_normalization_from(stream, config.normalization_samples,
                                                   jax.random.key(config.seed + 1))
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, mean=np.asarray(norm.mean), scalar=np.asarray(norm.scalar))
        os.replace(tmp, path)
    return norm


# ------------------------------------------------------------------------------------- loop

class _Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_finite(tree) -> bool:
    return bool(jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)))


class _Logger:
    """metrics.jsonl, TensorBoard events and a progress bar (process 0 only)."""

    def __init__(self, workdir, total_steps, start, batch_size, members, enabled):
        self.enabled, self.members, self.batch_size = enabled, members, batch_size
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)
        self.last = (start, time.time())

    def write(self, step: int, metrics: dict[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        for i in range(self.members):
            row = {k: float(v[i]) for k, v in metrics.items()}
            self.jsonl.write(json.dumps({"step": step, "member": i, **row}) + "\n")
            for k, v in row.items():
                self.tb.add_scalar(f"member_{i}/{k}", v, step)
        self.jsonl.flush()
        steps_then, t_then = self.last
        now = time.time()
        rate = (step - steps_then) * self.batch_size / max(now - t_then, 1e-9)
        self.last = (step, now)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s  L0 {metrics['l0'][0]:.1f}  NMSE {metrics['nmse'][0]:.3f}"
                                 + ("  (member 0)" if self.members > 1 else ""))

    def close(self):
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


def train_sae(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final evaluation. See the module docstring."""
    os.makedirs(workdir, exist_ok=True)
    bb, bb_params = build_backbone(config.backbone)
    mesh = sharding.make_mesh()
    source = build_source(config.data, "train")
    trainer, hparams = build_trainer(config, bb.d_model)
    members = int(hparams.learning_rate.shape[0])
    total_steps = config.total_tokens // config.batch_size
    norm = load_or_estimate_normalization(config, workdir, bb, bb_params, source, mesh)

    init_key, shuffle_key = jax.random.split(jax.random.key(config.seed))
    replicated = sharding.replicated(mesh)
    init = jax.jit(lambda: trainer.init_sweep(init_key, hparams), out_shardings=replicated)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.get("keep_checkpoints", 2))
    if ckpt.latest_step() is not None:
        run = ckpt.restore(jax.eval_shape(init))
        states, step, position = run.state, run.step, run.extra["stream"]
        print(f"resuming from step {step} ({ckpt.directory})", flush=True)
    else:
        states, step, position = init(), 0, {}
    stream = ActivationStream(config, bb, bb_params, source, mesh, norm, shuffle_key, **position)

    step_fn = jax.jit(trainer.sweep_step, donate_argnums=0)
    resample_fn = jax.jit(trainer.sweep_resample, donate_argnums=0)
    config_json = config.to_dict()

    def save(at_step):
        if not _all_finite(states.params):
            raise NonFiniteLossError(f"parameters are not finite at step {at_step}; not saving. The newest "
                                     f"checkpoint ({ckpt.latest_step()}) is the last good one.")
        ckpt.save(at_step, states, config=config_json, extra={"stream": stream.position()})

    logger = _Logger(workdir, total_steps, step, config.batch_size, members, jax.process_index() == 0)
    pending = None

    def check_and_log(pending):
        at, metrics = pending
        metrics = jax.device_get(metrics)  # step `at`, fetched while the device runs the next one
        bad = [i for i in range(members) if not np.isfinite(metrics["loss"][i])]
        if bad:
            raise NonFiniteLossError(f"loss is {metrics['loss'][bad[0]]} at step {at} for sweep member(s) {bad}; "
                                     f"stopping. The newest checkpoint ({ckpt.latest_step()}) is the last good one.")
        logger.write(at, metrics)

    try:
        with _Preemption() as preemption:
            while step < total_steps:
                x = stream.next()
                states, metrics = step_fn(states, x)
                step += 1
                if pending is not None:
                    check_and_log(pending)
                    pending = None
                if step % config.log_every == 0 or step == total_steps:
                    pending = (step, metrics)
                if trainer.resample_due(step):
                    states, _ = resample_fn(states, x)
                if step % config.checkpoint_every == 0 or preemption.signal is not None:
                    if pending is not None:
                        check_and_log(pending)
                        pending = None
                    save(step)
                if preemption.signal is not None:
                    name = signal.Signals(preemption.signal).name
                    print(f"\n{name}: saved a checkpoint at step {step}; rerun the same command to resume.", flush=True)
                    raise SystemExit(128 + preemption.signal)
            if pending is not None:
                check_and_log(pending)
            if ckpt.latest_step() != step:
                save(step)
    finally:
        logger.close()
        ckpt.close()

    return finish(config, workdir, bb, bb_params, mesh, trainer, states, norm, total_steps)


def evaluate(config, bb, bb_params, mesh, trainer: train.Trainer, states: train.TrainState, norm: Normalization,
             source) -> list[dict[str, Any]]:
    """Every metric of the SAE core per sweep member, over `eval_images` validation images.

    NMSE and explained variance use the variance of the whole evaluation set, accumulated as
    sums so the pass streams.
    """
    ae = trainer.ae

    @jax.jit
    def update(stats, sums, params, raw):
        x = norm.apply(raw)

        def one(stats, sums, p):
            z = ae.encode(p, x)
            x_hat = ae.decode(p, z)
            resid = x - x_hat
            sums = {"n": sums["n"] + x.shape[0], "sq_err": sums["sq_err"] + jnp.sum(resid**2),
                    "x": sums["x"] + jnp.sum(x, 0), "x2": sums["x2"] + jnp.sum(x**2, 0),
                    "r": sums["r"] + jnp.sum(resid, 0), "r2": sums["r2"] + jnp.sum(resid**2, 0)}
            return stats.update(z), sums

        return jax.vmap(one, in_axes=(0, 0, 0))(stats, sums, params)

    members = states.step.shape[0]
    d = bb.d_model
    stats = jax.vmap(lambda _: sae_metrics.FiringStats.zeros(ae.d_sae))(jnp.arange(members))
    sums = {"n": jnp.zeros(members), "sq_err": jnp.zeros(members), "x": jnp.zeros((members, d)),
            "x2": jnp.zeros((members, d)), "r": jnp.zeros((members, d)), "r2": jnp.zeros((members, d))}
    n_images = 0
    for raw in activation_batches(config, bb, bb_params, source, mesh, seed=0, shuffle=False):
        stats, sums = update(stats, sums, states.params, raw)
        n_images += config.image_batch_size
        if n_images >= config.eval_images:
            break
    stats, sums = jax.device_get((stats, sums))
    results = []
    for i in range(members):
        n = sums["n"][i]
        var_x = np.sum(sums["x2"][i] / n - (sums["x"][i] / n) ** 2)
        var_r = np.sum(sums["r2"][i] / n - (sums["r"][i] / n) ** 2)
        mse = sums["sq_err"][i] / (n * d)
        member_stats = jax.tree.map(lambda a: a[i], stats)
        results.append({
            "learning_rate": float(states.hparams.learning_rate[i]),
            "sparsity_coeff": float(states.hparams.sparsity_coeff[i]),
            "k": int(states.hparams.k[i]),
            "l0": float(np.sum(member_stats.counts) / member_stats.n_inputs),
            "mse": float(mse), "nmse": float(mse * d / var_x), "explained_variance": float(1 - var_r / var_x),
            "dead_fraction": float(member_stats.dead_fraction()), "dense_fraction": float(member_stats.dense_fraction()),
            "tokens": int(n),
            "frequency": np.asarray(member_stats.frequency()).tolist(),
            "mean_when_firing": np.asarray(member_stats.mean_when_firing()).tolist(),
        })
    return results


def finish(config, workdir, bb, bb_params, mesh, trainer, states, norm, total_steps) -> dict[str, Any]:
    """Evaluation pass and portable export of every member."""
    source = build_source(config.data, "validation")
    results = evaluate(config, bb, bb_params, mesh, trainer, states, norm, source)
    for i, result in enumerate(results):
        member = train.member(states, i)
        summary = {k: v for k, v in result.items() if k not in ("frequency", "mean_when_firing")}
        info = {"backbone": config.backbone.get("name") or "random", "layer": config.layer, "tokens": config.tokens,
                "steps": total_steps, "batch_size": config.batch_size, "eval": summary}
        result["path"] = save_sae(os.path.join(workdir, "sae", f"member_{i}"), trainer.ae, member.params,
                                  normalization=norm, info=info)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump({"steps": total_steps, "members": results}, f)
    for i, r in enumerate(results):
        print(f"member {i}: lr {r['learning_rate']:.2g} lambda {r['sparsity_coeff']:.2g} -> L0 {r['l0']:.1f}, "
              f"NMSE {r['nmse']:.3f}, explained variance {r['explained_variance']:.3f}, "
              f"dead {r['dead_fraction']:.3f}, dense {r['dense_fraction']:.3f}", flush=True)
    return {"steps": total_steps, "members": results}
