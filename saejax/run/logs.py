"""The run's logs: `MetricsLog` (metrics.jsonl and TensorBoard), `read_metrics`, and the
`ProgressBar` hook. Hooks are called by `saejax.loop.fit` as `hook(step, metrics)`."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

# Host metrics handed to hooks: {layer: {name: float array [members]}}.
Metrics = dict[int, dict[str, np.ndarray]]
MetricsHook = Callable[[int, Metrics], None]


class MetricsLog:
    """A metrics hook: one JSON line per logged step, layer and member in `<directory>/metrics.jsonl`,
    and TensorBoard scalars `layer_<L>/member_<i>/<name>` in `<directory>/tensorboard`.
    Writes on process 0 only.

    Args:
        directory: where the files go.
        tensorboard: also write TensorBoard events.
        start_step: the step a run starts from (0 for a new run): lines of later steps (logged
            before the run stopped, and about to be replayed) are dropped, so each step is
            written once, in metrics.jsonl and in TensorBoard (a purge from `start_step + 1`).
            None appends to the file as it is.
        extra: called at each log; its `{name: number}` goes into every line (e.g. the count of
            skipped images).
    """

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True, start_step: int | None = None,
                 extra: Callable[[], Mapping[str, float]] | None = None):
        self.enabled = jax.process_index() == 0
        self.extra = extra
        if not self.enabled:
            return
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metrics.jsonl")
        if start_step is not None and os.path.exists(path):
            _drop_lines_after(path, start_step)
        self._jsonl = open(path, "a")
        self._tb = None
        if tensorboard:
            self._tb = _EventFile(os.path.join(directory, "tensorboard"),
                                  purge_step=None if start_step is None else start_step + 1)

    def __call__(self, step: int, metrics: Metrics) -> None:
        if not self.enabled:
            return
        extra = dict(self.extra()) if self.extra is not None else {}
        for layer, m in metrics.items():
            for i in range(len(m["loss"])):
                row = {**{k: float(v[i]) for k, v in m.items()}, **extra}
                self._jsonl.write(json.dumps({"step": step, "layer": layer, "member": i, **row}) + "\n")
                if self._tb is not None:
                    self._tb.scalars(step, {f"layer_{layer}/member_{i}/{k}": v for k, v in row.items()})
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class _EventFile:
    """TensorBoard scalars written and flushed in the caller's thread. (tensorboardX's
    SummaryWriter queues events for a thread, so a kill can lose steps that metrics.jsonl already
    holds and that the resumed run will not replay.) A `purge_step` writes TensorBoard's
    SessionLog START, which hides the earlier files' events from that step on; the file name's
    nanosecond suffix keeps restarts within one second in order (TensorBoard reads files sorted
    by name)."""

    def __init__(self, directory: str, *, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=import-outside-toplevel
        from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

        os.makedirs(directory, exist_ok=True)
        self._event_pb2 = event_pb2
        self._writer = EventsWriter(os.path.join(directory, "events"), filename_suffix=f".{time.time_ns()}")
        if purge_step is not None:
            self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=(
                event_pb2.SessionLog(status=event_pb2.SessionLog.START))))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboardX.proto import summary_pb2  # pylint: disable=import-outside-toplevel

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                             for tag, v in values.items()])
        self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _drop_lines_after(path: str, step: int) -> None:
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_metrics(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of `<directory>/metrics.jsonl` (`MetricsLog`) as dicts; none if there is no
    file. A line that is not a JSON object with an integer `step` (cut short by a kill, or
    damaged) is skipped; the lines are plain text, so a damaged digit that still parses reads
    as it stands."""
    path = os.path.join(os.fspath(directory), "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and type(row.get("step")) is int and type(row.get("member", 0)) is int:
                rows.append(row)
    return rows


class ProgressBar:
    """A metrics hook: a tqdm bar with tokens/s and member 0's L0 and NMSE (process 0 only)."""

    def __init__(self, total_steps: int, *, batch_size: int, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.batch_size = batch_size
        if self.enabled:
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            self._last = (start_step, time.time())

    def __call__(self, step: int, metrics: Metrics) -> None:
        if not self.enabled:
            return
        then_step, then = self._last
        now = time.time()
        rate = (step - then_step) * self.batch_size / max(now - then, 1e-9)
        self._last = (step, now)
        self._bar.update(step - self._bar.n)
        layer, m = next(iter(metrics.items()))
        self._bar.set_postfix_str(f"{rate:,.0f} tok/s  layer {layer} member 0: L0 {m['l0'][0]:.1f}  "
                                  f"NMSE {m['nmse'][0]:.3f}")

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
