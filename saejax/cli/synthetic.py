"""Train an SAE sweep on synthetic activations with planted features, end to end.

    saejax synthetic --workdir=/tmp/saejax-synthetic [--config=...:topk]

Writes to the workdir: `checkpoints/` (orbax; rerunning resumes from the latest),
`metrics.jsonl` (one line per logged step and member), `sae/member_<i>/` (portable SAEs) and
`summary.json` (final metrics and feature recovery per member). The logic is
`saejax.studies.planted`.
"""

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax.studies.planted import run_planted


def run(config, workdir: str) -> dict:
    trainer, hparams = builders.build_trainer(config, config.world.d_model)
    return run_planted(trainer, hparams, workdir, world=config.world.to_dict(), steps=config.steps,
                       batch_size=config.batch_size, normalization_samples=config.normalization_samples,
                       seed=config.seed, mesh=builders.build_mesh(config), checkpoint_every=config.checkpoint_every,
                       log_every=config.log_every, eval_batches=config.eval_batches, provenance=config.to_dict())



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("synthetic", run, "synthetic.py", argv=argv, workdir_help="Directory for checkpoints, metrics and the trained SAEs.")


if __name__ == "__main__":
    main()
