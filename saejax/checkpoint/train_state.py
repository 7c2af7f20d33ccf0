"""Whole-run checkpoints with orbax: the `TrainState` (params, optimizer state, counters, step,
PRNG key), the run's config as JSON, and a JSON dict of extras (e.g. the data position).

Orbax writes each step to a temporary directory and renames it when complete, so a crash or a
kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from saejax.checkpoint.errors import CheckpointError


class RestoredRun(NamedTuple):
    """What `TrainCheckpointer.restore` returns."""

    step: int
    state: Any
    config: dict
    extra: dict


def _leaf_shapes(tree) -> dict[str, tuple]:
    """'params/w_enc' -> shape; PRNG keys by the shape of their raw data (as orbax stores them)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
        shape = tuple(leaf.shape)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            shape = jax.eval_shape(jax.random.key_data, leaf).shape
        shapes[name] = shape
    return shapes


def _check_fits(saved_metadata, target, where: str) -> None:
    saved, wanted = _leaf_shapes(saved_metadata), _leaf_shapes(target)
    problems = [f"{name}: saved {saved[name]}, target {shape}" for name, shape in wanted.items()
                if name in saved and saved[name] != shape]
    problems += [f"{name}: not in the checkpoint" for name in wanted if name not in saved]
    problems += [f"{name}: in the checkpoint, not in the target" for name in saved if name not in wanted]
    if problems:
        raise CheckpointError(f"{where} does not restore into the given target: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


class TrainCheckpointer:
    """Saves and restores training runs in `directory` (one sub-directory per step).

    >>> ckpt = TrainCheckpointer(workdir + "/checkpoints", max_to_keep=3)
    >>> ckpt.save(step, state, config=config_dict, extra={"data_position": pos})
    >>> run = ckpt.restore(jax.eval_shape(trainer.init, key, hparams))  # latest step
    >>> state = run.state
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                           "extra": ocp.JsonCheckpointHandler()},
        )

    def save(self, step: int, state: Any, *, config: dict | None = None, extra: dict | None = None,
             wait: bool = True) -> None:
        """Write `state` as step `step`. With `wait=False` the device arrays are copied to the
        host and the write goes on in the background (the state may be donated right after);
        the step counts as saved once it is complete (`wait_until_finished`, `close`)."""
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config or {}),
            extra=ocp.args.JsonSave(extra or {}),
        ), force=True)
        if wait:
            self._manager.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Block until every save started is on disk."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, target: Any, step: int | None = None) -> RestoredRun:
        """Restore `step` (default: the latest) into the structure, shapes, dtypes and shardings
        of `target` (concrete arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).

        Raises:
            CheckpointError: no checkpoint, or one that does not fit `target`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        _check_fits(self._manager.item_metadata(step)["state"], abstract, f"{self.directory} step {step}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                config=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}: step {step} does not restore into the given target: {e}") from e
        return RestoredRun(step, restored.state, dict(restored.config or {}), dict(restored.extra or {}))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
