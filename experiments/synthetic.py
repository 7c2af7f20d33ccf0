"""Train an SAE sweep on synthetic activations with planted features, end to end.

    python -m experiments.synthetic --workdir=/tmp/saejax-synthetic [--config=...:topk]

Writes to the workdir: `checkpoints/` (orbax; rerunning resumes from the latest),
`metrics.jsonl` (one line per logged step and member), `sae/member_<i>/` (portable SAEs) and
`summary.json` (final metrics and feature recovery per member).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.sae_training import build_trainer
from saejax import metrics as sae_metrics
from saejax import sae, train
from saejax.checkpoint import TrainCheckpointer, save_sae
from saejax.datasets import synthetic
from saejax.normalization import estimate_normalization

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "synthetic.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the trained SAEs.", required=True)


def build(config):
    trainer, hparams = build_trainer(config, config.world.d_model)
    return trainer.ae, trainer, hparams


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; progress is printed below
    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    ae, trainer, hparams = build(config)
    key = jax.random.key(config.seed)
    world_key, norm_key, data_key, init_key, eval_key = jax.random.split(key, 5)
    world = synthetic.make_world(world_key, **config.world)
    norm = estimate_normalization(world.sample(norm_key, config.normalization_samples))

    @jax.jit
    def batch_at(step):  # a pure function of the step: resuming replays the same data
        return norm.apply(world.sample(jax.random.fold_in(data_key, step), config.batch_size))

    def init():
        return trainer.init_sweep(init_key, hparams, b_dec=sae.data_mean(batch_at(-1)))

    step_fn = jax.jit(trainer.sweep_step, donate_argnums=0)
    resample_fn = jax.jit(trainer.sweep_resample, donate_argnums=0)

    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    start = 0
    if ckpt.latest_step() is not None:
        run = ckpt.restore(jax.eval_shape(init))
        states, start = run.state, run.step
        print(f"resumed from step {start}")
    else:
        states = init()

    log = open(os.path.join(workdir, "metrics.jsonl"), "a")
    members = hparams.learning_rate.shape[0]
    pending, t0 = None, time.time()

    def flush(pending):
        step, m = pending
        m = jax.device_get(m)  # one step behind: the device is already busy with the next step
        for i in range(members):
            log.write(json.dumps({"step": step, "member": i, **{k: float(v[i]) for k, v in m.items()}}) + "\n")
        log.flush()
        rate = (step + 1 - start) * config.batch_size / (time.time() - t0)
        print(f"step {step + 1}/{config.steps}  {rate:,.0f} tokens/s  " + "  ".join(
            f"[{i}] loss {m['loss'][i]:.4f} nmse {m['nmse'][i]:.3f} l0 {m['l0'][i]:.1f} dead {m['dead_fraction'][i]:.2f}"
            for i in range(members)), flush=True)

    for step in range(start, config.steps):
        x = batch_at(step)
        states, step_metrics = step_fn(states, x)
        if pending is not None:
            flush(pending)
            pending = None
        if (step + 1) % config.log_every == 0:
            pending = (step, step_metrics)
        if trainer.resample_due(step + 1):
            states, n_resampled = resample_fn(states, x)
            print(f"step {step + 1}: resampled {np.asarray(n_resampled).tolist()} dead latents")
        if (step + 1) % config.checkpoint_every == 0:
            ckpt.save(step + 1, states, config=config.to_dict())
    if pending is not None:
        flush(pending)
    if ckpt.latest_step() != config.steps:
        ckpt.save(config.steps, states, config=config.to_dict())
    ckpt.close()
    log.close()

    summary = {"steps": config.steps, "members": []}
    for i in range(members):
        member = train.member(states, i)
        stats, nmse, ev = sae_metrics.FiringStats.zeros(ae.d_sae), [], []
        for b in range(config.eval_batches):
            x = norm.apply(world.sample(jax.random.fold_in(eval_key, b), config.batch_size))
            z = ae.encode(member.params, x)
            stats = stats.update(z)
            nmse.append(sae_metrics.normalized_mse(x, ae.decode(member.params, z)))
            ev.append(sae_metrics.explained_variance(x, ae.decode(member.params, z)))
        recovered, mean_cos = synthetic.feature_recovery(world.features, member.params.w_dec)
        result = {
            "learning_rate": float(member.hparams.learning_rate), "sparsity_coeff": float(member.hparams.sparsity_coeff),
            "k": int(member.hparams.k), "nmse": float(np.mean(nmse)), "explained_variance": float(np.mean(ev)),
            "l0": float(jnp.sum(stats.counts) / stats.n_inputs), "dead_fraction": float(stats.dead_fraction()),
            "dense_fraction": float(stats.dense_fraction()), "features_recovered": float(recovered),
            "mean_best_cosine": float(mean_cos),
        }
        path = save_sae(os.path.join(workdir, "sae", f"member_{i}"), ae, member.params, normalization=norm,
                        info={"source": "experiments.synthetic", "steps": config.steps, **result})
        summary["members"].append({**result, "path": path})
        print(f"member {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')}")


if __name__ == "__main__":
    app.run(main)
