"""Train SAEs on a ViT's residual stream, activations generated on the fly.

    python -m experiments.train_sae --config=experiments/configs/clip_vit_b16.py --workdir=DIR
    python -m experiments.train_sae --config=experiments/configs/clip_vit_b16.py:small --workdir=DIR

The loop: backbone -> mesh -> sharded jitted harvest of one layer's tokens -> device shuffle
buffer -> jitted SAE step (one SAE or a `vmap` sweep) -> dead-latent resampling on schedule ->
metrics (`metrics.jsonl`, TensorBoard event files in `tensorboard/`, a progress bar).

Workdir layout:
    normalization.npz       activation mean and scalar (estimated once, reused on resume)
    checkpoints/<step>/     orbax: the stacked TrainState, the config, the data position
    metrics.jsonl           one line per logged step and sweep member
    tensorboard/            event files (tensorboard --logdir DIR/tensorboard)
    eval.json               final evaluation per member (L0, MSE, NMSE, explained variance,
                            dead/dense fraction, per-latent frequency and mean value)
    sae/member_<i>/         portable SAEs (saejax.checkpoint.load_sae)

Resuming: rerunning the same command continues from the latest checkpoint and ends with the same
parameters as an uninterrupted run. Checkpoints are written every `checkpoint_every` steps and
on SIGTERM/SIGINT (preemption). The activation buffer is not saved: a resumed run refills it
from the data position where its fill began, reshuffles it with the same key and skips the
batches already taken. A NaN or Inf loss stops the run with an error; the last checkpoint
written before it stays the newest.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.sae_training import train_sae

_CONFIG = config_flags.DEFINE_config_file("config", None, "An experiments/configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the trained SAEs.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    train_sae(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
