"""An SAE sweep trained on synthetic activations with planted features, end to end
(`experiments.synthetic` runs it from a config).

Writes to the workdir: `checkpoints/` (orbax; rerunning resumes from the latest),
`metrics.jsonl` (one line per logged step and member), `sae/member_<i>/` (portable SAEs) and
`summary.json` (final metrics and feature recovery per member).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from saejax import sharding
from saejax.checkpoint import TrainCheckpointer, save_sae
from saejax.core import sae, train
from saejax.core.normalization import estimate_normalization
from saejax.datasets import synthetic
from saejax.run import loop
from saejax.provenance import written_by


def print_progress(total_steps: int):
    """A metrics hook printing one line per logged step with every member's numbers."""

    def hook(step, metrics):
        (m,) = metrics.values()
        print(f"step {step}/{total_steps}  " + "  ".join(
            f"[{i}] loss {m['loss'][i]:.4f} nmse {m['nmse'][i]:.3f} l0 {m['l0'][i]:.1f} dead {m['dead_fraction'][i]:.2f}"
            for i in range(len(m["loss"]))), flush=True)

    return hook


def run_planted(trainer: train.Trainer, hparams: train.Hparams, workdir: str, *, world: Mapping[str, Any],
                steps: int, batch_size: int = 1024, normalization_samples: int = 2**14, seed: int = 0,
                mesh: Mesh | None = None, checkpoint_every: int = 1000, log_every: int = 100, eval_batches: int = 16,
                provenance: Mapping[str, Any] | None = None) -> dict:
    """Train `trainer`'s sweep (`hparams`) on a planted-feature world for `steps` steps of
    `batch_size`; see the module docstring.

    Args:
        world: `synthetic.make_world` settings (d_model, n_features, mean_active, zipf_exponent, noise).
        normalization_samples: activations drawn to estimate the normalisation.
        seed: the world, the normalisation sample, the data, the SAE init and the held-out data.
        mesh: the devices (`sharding.make_mesh()` when None).
        eval_batches: held-out batches for the final metrics.
        provenance: saved with each checkpoint (e.g. the config).

    Returns:
        what `summary.json` holds: per member its metrics, feature recovery and portable path.
    """
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    world_key, norm_key, data_key, init_key, eval_key = jax.random.split(jax.random.key(seed), 5)
    world = synthetic.make_world(world_key, **world)
    norm = estimate_normalization(world.sample(norm_key, normalization_samples))

    b_dec = sae.data_mean(norm.apply(world.sample(jax.random.fold_in(data_key, jnp.int32(-1)), batch_size)))
    states = trainer.init_sweep_sharded(init_key, hparams, mesh, b_dec=b_dec)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    start, position = 0, None
    if ckpt.latest_step() is not None:
        run = ckpt.restore({"0": states})
        states, start, position = run.state["0"], run.step, run.extra["stream"]
        print(f"resumed from step {start}")
    batches = synthetic.WorldStream(world, data_key, batch_size, normalization=norm, mesh=mesh,
                                    position=position)
    log = loop.MetricsLog(workdir, tensorboard=False, start_step=start)
    try:
        states = loop.fit(trainer, {0: states}, batches, steps=steps, mesh=mesh, start_step=start,
                          log_every=log_every, hooks=[log, print_progress(steps)], checkpointer=ckpt,
                          checkpoint_every=checkpoint_every, checkpoint_config=dict(provenance or {}))[0]
    finally:
        log.close()
        ckpt.close()

    held_out = (world.sample(jax.random.fold_in(eval_key, b), batch_size) for b in range(eval_batches))
    results = loop.evaluate(trainer.ae, states, held_out, normalization=norm)
    summary = {"steps": steps, "members": []}
    for i, result in enumerate(results):
        member = train.member(states, i)
        recovered, mean_cos = synthetic.feature_recovery(world.features, member.params.w_dec)
        result = {k: v for k, v in result.items() if k not in loop.PER_LATENT_KEYS}
        result.update(features_recovered=float(recovered), mean_best_cosine=float(mean_cos))
        path = save_sae(os.path.join(workdir, "sae", f"member_{i}"), trainer.ae, member.params, normalization=norm,
                        info={"source": "experiments.synthetic", "steps": steps, **result})
        summary["members"].append({**result, "path": path})
        print(f"member {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float))))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({**summary, "written_by": written_by()}, f, indent=2)
    print(f"wrote {os.path.join(workdir, 'summary.json')}")
    return summary
