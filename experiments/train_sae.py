"""Train SAEs on a ViT's residual stream, activations generated on the fly.

    python -m experiments.train_sae --config=experiments/configs/clip_vit_b16.py --workdir=DIR
    python -m experiments.train_sae --config=experiments/configs/clip_vit_b16.py:small --workdir=DIR

The loop (all of it `saejax`): backbone -> mesh -> sharded jitted harvest of the config's
layers -> double-buffered device shuffle buffer (`saejax.stream.ActivationStream`) -> one
jitted, data-parallel step of each layer's sweep (`saejax.loop.fit`) -> dead-latent
resampling on schedule -> metrics (`metrics.jsonl`, TensorBoard event files in
`tensorboard/`, a progress bar).

Workdir layout:
    normalization.npz             activation mean and scalar per layer (estimated once, reused on resume)
    checkpoints/<step>/           orbax: the stacked TrainState per layer, the config, the stream position
    metrics.jsonl                 one line per logged step, layer and sweep member
    tensorboard/                  event files (tensorboard --logdir DIR/tensorboard)
    eval.json                     final evaluation per layer and member: reconstruction (L0, MSE, NMSE,
                                  explained variance, cosine, l2_ratio, relative reconstruction bias),
                                  firing (dead/dense fraction, log10 frequency histogram), dictionary
                                  (encoder-decoder cosine, near duplicates), spliced-in fidelity
                                  (saejax.fidelity), and per-latent lists
    report.html                   the sweep on one page (saejax.report): L0 vs NMSE and vs fidelity
                                  with the Pareto front, loss curves, density histograms, every metric
    sae/layer_<L>/member_<i>/     portable SAEs (saejax.checkpoint.load_sae)

Resuming: rerunning the same command continues from the latest checkpoint and ends with the same
parameters as an uninterrupted run. The config must be the same, except for how long the run
goes and how it reports (`total_tokens`, `log_every`, `checkpoint_every`, `keep_checkpoints`,
`eval_images`, `data.skip_unreadable`); any other change is refused with the list of keys that differ, unless
`--allow_config_change=KEY,...` names them (e.g. `sweep.learning_rate`: the new rates apply from
the resumed step). One run at a time holds the workdir (`.saejax.lock`). Checkpoints are written every `checkpoint_every` steps and
on SIGTERM/SIGINT (preemption; exit code 128 + the signal). The activation buffer is not saved:
a resumed run refills it from the data position where its fill began and reshuffles it with
the same key. A NaN or Inf loss stops the run with an error; the last checkpoint written
before it stays the newest. Any other error first saves a checkpoint of the last completed step.
A checkpoint that cannot be read (or fails its checksums) is skipped for the previous one.

Your own SAE architecture: register it in a module of yours (`saejax.sae.register`, see
`saejax.sae.Architecture`) and name both: `--import_modules=my_saes
--config.sae.architecture=my_architecture`.

Several hosts (a TPU pod slice, several GPU nodes): run the same command on every host.
`--distributed` calls `jax.distributed.initialize()`, which finds its peers by itself on Cloud
TPU and under SLURM; elsewhere give `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`. Each process reads its own share of the images; checkpoints and the mesh span
all processes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "An experiments/configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the trained SAEs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (peers found automatically "
                                 "on Cloud TPU, SLURM, ...).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_ALLOW_CHANGE = flags.DEFINE_list("allow_config_change", [], "Config keys a resumed run may change (a key allows "
                                   "the keys under it: 'sweep' allows 'sweep.learning_rate').")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_IMPORT_MODULES = flags.DEFINE_list("import_modules", [], "Python modules to import first, e.g. one that registers "
                                    "an SAE architecture (`saejax.sae.register`) named in --config.sae.architecture.")


def initialize_distributed() -> None:
    """`jax.distributed.initialize` from the flags, before anything touches the devices."""
    if _COORDINATOR.value is None and not _DISTRIBUTED.value:
        return
    import jax

    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    initialize_distributed()
    import importlib

    for module in _IMPORT_MODULES.value:
        importlib.import_module(module)
    from experiments.sae_training import train_sae
    from saejax.run.loop import Preempted

    try:
        train_sae(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    except Preempted as e:
        print(f"\n{e}: saved a checkpoint; rerun the same command to resume.", flush=True)
        raise SystemExit(128 + e.signum) from None
    except Exception as e:  # noqa: BLE001 - the traceback, then the first error in one line at the end
        import sys
        import traceback

        traceback.print_exc()
        notes = "; ".join(n for n in getattr(e, "__notes__", []) if n.startswith("saejax:"))
        line = " ".join(f"{type(e).__name__}: {e}{' (' + notes + ')' if notes else ''}".split())
        print(f"\ntrain_sae failed: {line}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    app.run(main)
