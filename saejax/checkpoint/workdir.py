"""Guards for a training run's working directory: one run at a time, and no silent change of
config on resume.

>>> with WorkdirLock(workdir):                      # a second run fails at once, naming the first
...     changes = config_changes(ckpt.saved_config(), config.to_dict())
...     check_resume(changes, allowed=RESUMABLE_KEYS)   # ConfigChangedError lists what differs
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ConfigChangedError", "WorkdirBusyError", "WorkdirLock", "check_resume", "config_changes"]

LOCK_FILE = ".saejax.lock"


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class ConfigChangedError(ValueError):
    """The config of a resumed run differs from the one its checkpoint was made with."""


class WorkdirLock:
    """An exclusive lock on `<workdir>/.saejax.lock`, held while the run lives.

    It is an `fcntl.flock` lock, which the operating system drops when the process dies in any
    way, so a lock left by a dead process is taken over (and reported in `took_over_from`).
    The file records the holder's PID, host and start time for the error message. Local and
    NFSv4 filesystems honour it; object stores (gs://) do not have locks, and there the lock is
    skipped (`held` is False).

    Raises:
        WorkdirBusyError: "workdir ... is in use by PID n on host h (since ...)".
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.held, self.took_over_from, self._fd = False, None, None

    def acquire(self) -> WorkdirLock:
        if "://" in self.workdir:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(f"workdir {self.workdir} is in use by PID {holder.get('pid', '?')} on host "
                                   f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it "
                                   f"to finish or use another workdir") from None
        previous = _read_holder(fd)
        if previous.get("pid") is not None:
            self.took_over_from = previous
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd, self.held = fd, True
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to report
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self.held = None, False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{dotted key: (saved value, new value)}` for every leaf that differs (tuples and lists
    compare equal; a key present on one side only shows `None` on the other)."""
    canonical = lambda tree: _flatten(json.loads(json.dumps(tree, default=str)))  # noqa: E731
    a, b = canonical(saved), canonical(new)
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def check_resume(changes: Mapping[str, tuple[Any, Any]], allowed: Iterable[str] = ()) -> None:
    """Raise `ConfigChangedError` listing each changed key that is not in `allowed` (a key
    allows itself and everything under it: "sweep" allows "sweep.learning_rate")."""
    allowed = tuple(allowed)
    refused = {k: v for k, v in changes.items() if not any(k == a or k.startswith(a + ".") for a in allowed)}
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigChangedError(f"the config differs from the one this run was started with: {lines}. Resume with "
                                 f"the same config, use another workdir, or allow the change with "
                                 f"--allow_config_change={','.join(refused)}")
