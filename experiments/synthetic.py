"""Train an SAE sweep on synthetic activations with planted features, end to end.

    python -m experiments.synthetic --workdir=/tmp/saejax-synthetic [--config=...:topk]

Writes to the workdir: `checkpoints/` (orbax; rerunning resumes from the latest),
`metrics.jsonl` (one line per logged step and member), `sae/member_<i>/` (portable SAEs) and
`summary.json` (final metrics and feature recovery per member).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.sae_training import build_mesh, build_trainer
from saejax import loop, sae, train
from saejax.checkpoint import TrainCheckpointer, save_sae
from saejax.datasets import synthetic
from saejax.core.normalization import estimate_normalization

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "synthetic.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the trained SAEs.", required=True)


def print_progress(total_steps: int):
    """A metrics hook printing one line per logged step with every member's numbers."""

    def hook(step, metrics):
        (m,) = metrics.values()
        print(f"step {step}/{total_steps}  " + "  ".join(
            f"[{i}] loss {m['loss'][i]:.4f} nmse {m['nmse'][i]:.3f} l0 {m['l0'][i]:.1f} dead {m['dead_fraction'][i]:.2f}"
            for i in range(len(m["loss"]))), flush=True)

    return hook


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; progress is printed below
    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    trainer, hparams = build_trainer(config, config.world.d_model)
    mesh = build_mesh(config)
    world_key, norm_key, data_key, init_key, eval_key = jax.random.split(jax.random.key(config.seed), 5)
    world = synthetic.make_world(world_key, **config.world)
    norm = estimate_normalization(world.sample(norm_key, config.normalization_samples))

    b_dec = sae.data_mean(norm.apply(world.sample(jax.random.fold_in(data_key, jnp.int32(-1)), config.batch_size)))
    states = trainer.init_sweep_sharded(init_key, hparams, mesh, b_dec=b_dec)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    start, position = 0, None
    if ckpt.latest_step() is not None:
        run = ckpt.restore({"0": states})
        states, start, position = run.state["0"], run.step, run.extra["stream"]
        print(f"resumed from step {start}")
    batches = synthetic.WorldStream(world, data_key, config.batch_size, normalization=norm, mesh=mesh,
                                    position=position)
    log = loop.MetricsLog(workdir, tensorboard=False, start_step=start)
    try:
        states = loop.fit(trainer, {0: states}, batches, steps=config.steps, mesh=mesh, start_step=start,
                          log_every=config.log_every, hooks=[log, print_progress(config.steps)], checkpointer=ckpt,
                          checkpoint_every=config.checkpoint_every, checkpoint_config=config.to_dict())[0]
    finally:
        log.close()
        ckpt.close()

    held_out = (world.sample(jax.random.fold_in(eval_key, b), config.batch_size) for b in range(config.eval_batches))
    results = loop.evaluate(trainer.ae, states, held_out, normalization=norm)
    summary = {"steps": config.steps, "members": []}
    for i, result in enumerate(results):
        member = train.member(states, i)
        recovered, mean_cos = synthetic.feature_recovery(world.features, member.params.w_dec)
        result = {k: v for k, v in result.items() if k not in loop.PER_LATENT_KEYS}
        result.update(features_recovered=float(recovered), mean_best_cosine=float(mean_cos))
        path = save_sae(os.path.join(workdir, "sae", f"member_{i}"), trainer.ae, member.params, normalization=norm,
                        info={"source": "experiments.synthetic", "steps": config.steps, **result})
        summary["members"].append({**result, "path": path})
        print(f"member {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float))))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')}")


if __name__ == "__main__":
    app.run(main)
