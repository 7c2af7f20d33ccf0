"""Train SAEs on a ViT's residual stream, activations generated on the fly.

    saejax train --config=clip_vit_b16 --workdir=DIR
    saejax train --config=clip_vit_b16:small --workdir=DIR

The loop (all of it `saejax`): backbone -> mesh -> sharded jitted harvest of the config's
layers -> double-buffered device shuffle buffer (`saejax.stream.ActivationStream`) -> one
jitted, data-parallel step of each layer's sweep (`saejax.loop.fit`) -> dead-latent
resampling on schedule -> metrics (`metrics.jsonl`, TensorBoard event files in
`tensorboard/`, a progress bar).

Workdir layout::

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

from absl import flags

from saejax.cli.entry import run_binary


def run(config, workdir: str, *, step_hooks=()):
    """Train the config's sweeps in `workdir`, resuming it if it holds a run (`builders.train_sae`);
    `step_hooks` are the multi-host watchdog's (`run_binary` passes them)."""
    from saejax.cli.builders import train_sae  # noqa: PLC0415

    return train_sae(config, workdir, allow_config_change=flags.FLAGS.allow_config_change, step_hooks=step_hooks)



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    flags.DEFINE_list("allow_config_change", [], "Config keys a resumed run may change (a key allows the keys "
                      "under it: 'sweep' allows 'sweep.learning_rate').")
    run_binary("train_sae", run, "clip_vit_b16.py", argv=argv, workdir_help="Directory for checkpoints, metrics and the trained "
               "SAEs.")


if __name__ == "__main__":
    main()
