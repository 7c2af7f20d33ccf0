"""Whole-run checkpoints with orbax: the `TrainState` (params, optimizer state, counters, step,
PRNG key), the run's config as JSON, and a JSON dict of extras (e.g. the data position).

Orbax writes each step to a temporary directory and renames it when complete, so a crash or a
kill mid-save leaves the previous checkpoint intact. Each step also stores a checksum of every
array (computed on the devices when saving), verified when restoring: a flipped bit is an
error, not a silently different run. `restore` falls back to the newest step that restores and
says which ones it skipped and why.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from saejax.checkpoint.errors import CheckpointError
from saejax.provenance import check_written_by, written_by


class RestoredRun(NamedTuple):
    """What `TrainCheckpointer.restore` returns; `skipped` lists `(step, reason)` for newer
    steps that did not restore; `written_by` the versions that saved the step
    (`saejax.provenance`; None for steps saved before they were recorded)."""

    step: int
    state: Any
    config: dict
    extra: dict
    skipped: tuple = ()
    written_by: dict | None = None


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


@jax.jit
def _checksums(tree):
    """Per leaf, the sum of its 32-bit words modulo 2**32 (any single flipped bit changes it)."""

    def words(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize, jnp.uint32)
        return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)

    return jax.tree.map(words, tree)


_JSON_KEYS = ("__config__", "__extra__")


def _json_checksums(config: dict, extra: dict) -> dict[str, int]:
    """CRC-32 of the config and extra JSON as saved: a damaged stream position must not resume elsewhere."""
    as_saved = (json.loads(json.dumps(value)) for value in (config, extra))  # int keys become strings, as on disk
    return {key: zlib.crc32(json.dumps(value, sort_keys=True).encode()) for key, value in zip(_JSON_KEYS, as_saved)}


def checksums(tree) -> dict[str, int]:
    """`{leaf path: checksum}` of a pytree of arrays (see `TrainCheckpointer`)."""
    sums = jax.device_get(_checksums(tree))
    return {_path_name(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _leaf_shapes(tree) -> dict[str, tuple]:
    """'params/w_enc' -> shape; PRNG keys by the shape of their raw data (as orbax stores them)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _path_name(path)
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


def _open_failure(directory: str, error: Exception) -> str:
    """Why orbax could not open `directory`: the step metadata file that is not a JSON object
    when there is one (orbax reads them all on opening), else orbax's own error."""
    for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        path = os.path.join(directory, entry, "_CHECKPOINT_METADATA")
        try:
            with open(path) as f:
                value = json.load(f)
        except (OSError, ValueError):
            continue  # missing or unparsable: orbax falls back by itself
        if not isinstance(value, dict):
            return (f"{path}: not a JSON object, so the checkpoints cannot be opened; step {entry} is corrupt "
                    f"(move {os.path.join(directory, entry)} aside to resume from the step before it)")
    return f"{directory}: cannot open the checkpoints: {type(error).__name__}: {error}"


class TrainCheckpointer:
    """Saves and restores training runs in `directory` (one sub-directory per step).

    >>> ckpt = TrainCheckpointer(workdir + "/checkpoints", max_to_keep=3)
    >>> ckpt.save(step, state, config=config_dict, extra={"data_position": pos})
    >>> run = ckpt.restore(jax.eval_shape(trainer.init, key, hparams))  # latest step
    >>> state = run.state
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
                item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                               "extra": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()},
            )
        except Exception as e:  # noqa: BLE001 - orbax reads every step's metadata file when it opens
            raise CheckpointError(_open_failure(self.directory, e)) from e

    def save(self, step: int, state: Any, *, config: dict | None = None, extra: dict | None = None,
             wait: bool = True) -> None:
        """Write `state` as step `step`. With `wait=False` the device arrays are copied to the
        host and the write goes on in the background (the state may be donated right after);
        the step counts as saved once it is complete (`wait_until_finished`, `close`)."""
        extra = {**(extra or {}), "written_by": written_by()}
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config or {}),
            extra=ocp.args.JsonSave(extra or {}),
            checksums=ocp.args.JsonSave({**checksums(state), **_json_checksums(config or {}, extra or {})}),
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

    def saved_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the latest), without restoring the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same failure here
            raise CheckpointError(f"{self._step_dir(step)}: cannot read its config: {e}") from e
        return dict(restored.config or {})

    def restore(self, target: Any, step: int | None = None) -> RestoredRun:
        """Restore `step`, or the newest step that restores, into the structure, shapes, dtypes
        and shardings of `target` (concrete arrays or `jax.ShapeDtypeStruct` objects, e.g. from
        `jax.eval_shape`).

        Without `step`, a step that cannot be read (empty, truncated, corrupt, or whose
        checksums do not match) is skipped for the next older one; the skipped steps and why
        are in `RestoredRun.skipped`.

        Raises:
            CheckpointError: no checkpoint, none that restores (each step's reason is named),
                or one that does not fit `target` (not skipped: an older step would not fit either).
        """
        steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        skipped = []
        for candidate in steps:
            try:
                return self._restore_step(candidate, abstract)._replace(skipped=tuple(skipped))
            except _Unreadable as e:
                if step is not None:
                    raise CheckpointError(str(e)) from e.__cause__
                skipped.append((candidate, str(e)))
        raise CheckpointError(f"{self.directory}: no checkpoint restores: "
                              + "; ".join(f"step {s}: {why}" for s, why in skipped))

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore_step(self, step: int, abstract) -> RestoredRun:
        where = self._step_dir(step)
        try:
            metadata = self._manager.item_metadata(step)["state"]
            if metadata is None:
                raise ValueError("no state metadata")
        except Exception as e:  # noqa: BLE001 - a missing or broken file, whatever the library raises
            raise _Unreadable(f"{where}: cannot read its metadata: {type(e).__name__}: {e}") from e
        _check_fits(metadata, abstract, where)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                config=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(f"{where}: cannot read it: {type(e).__name__}: {str(e)[:300]}") from e
        try:
            saved = dict(self._manager.restore(step, args=ocp.args.Composite(
                checksums=ocp.args.JsonRestore())).checksums or {})
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(f"{where}: cannot read its checksums: {type(e).__name__}: {e}") from e
        config, extra = restored.config or {}, restored.extra or {}
        if not isinstance(config, dict) or not isinstance(extra, dict):
            raise _Unreadable(f"{where}: its config or extra is not a JSON object: the files are corrupt")
        got = checksums(restored.state)
        if _JSON_KEYS[0] in saved:  # steps saved before the config and extra were checksummed have none
            got.update(_json_checksums(config, extra))
        bad = [name for name, value in got.items() if saved.get(name) != value]
        if bad:
            raise _Unreadable(f"{where}: checksum mismatch in {', '.join(bad[:3])}"
                              + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "") + ": the files are corrupt")
        extra = dict(extra)
        versions = extra.pop("written_by", None)  # saved beside the caller's extra, returned apart
        check_written_by(versions, where)
        return RestoredRun(step, restored.state, dict(config), extra, written_by=versions)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Unreadable(Exception):
    """A step that cannot be restored because of its files (the message names them)."""
