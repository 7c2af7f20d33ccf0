"""A training run, from objects: `run_training(RunSpec(...), workdir)` owns the workdir lock,
resume, the normalisation cache, training (`loop.fit`), evaluation, export and the report
(`report`); `loop` and `logs` are the pieces under it, and `peers` watches the other processes
of a multi-host run."""

from saejax.run.training import RunSpec, TrainedRun, run_training

__all__ = ["RunSpec", "TrainedRun", "run_training"]
