"""The other processes of a multi-host run, watched: one that dies, stops or hangs ends the run
on every host within a bounded time, with one line that names it.

JAX's coordination service already ends every process when one stops sending heartbeats
(`jax.distributed.initialize(heartbeat_timeout_seconds=...)`; when process 0, the coordinator,
dies, the others end at once), but with a C++ abort and a stack dump, and not at all when a
process is alive but stuck (a hung reader, a deadlock) while the others wait for it inside a
collective. `PeerWatchdog` runs a thread in each process that writes a tick and the process's
progress (the training step, `watchdog.progress(step)`) to the coordination service's key-value store
every `timeout_s / 10` seconds, and reads the others':

- a peer whose tick has not changed for `timeout_s` is gone (killed, stopped, cut off);
- a peer whose progress has not changed for `timeout_s` while this process made none either
  and is ahead of it is stuck, and this process is waiting for it in a collective.

Either way the thread prints `saejax: process I of N stopped answering ...` on stderr and ends
the process with exit code `PEER_LOST_EXIT`, through `os._exit`: the main thread is blocked
inside a collective and cannot be interrupted. Checkpoints are renamed into place when
complete, so the newest one stays usable; rerunning the same command on every host resumes.

>>> with PeerWatchdog(timeout_s=180) as watchdog:      # after jax.distributed.initialize
...     loop.fit(..., step_hooks=[watchdog.progress])    # or RunSpec(..., step_hooks=...)
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings

import jax

__all__ = ["PEER_LOST_EXIT", "PeerWatchdog"]

PEER_LOST_EXIT = 75  # EX_TEMPFAIL: rerun to resume
_KEY = "saejax/peer/{}"
_ENTERED: list = []  # only for the deprecated module-level `progress`


def progress(step: int) -> None:
    """Deprecated (until saejax 0.3): pass `watchdog.progress` to `loop.fit(step_hooks=...)`."""
    warnings.warn("saejax.run.peers.progress is deprecated: pass the watchdog's own progress as a step hook, "
                  "loop.fit(..., step_hooks=[watchdog.progress]); progress goes away in saejax 0.3",
                  DeprecationWarning, stacklevel=2)
    for watchdog in _ENTERED:
        watchdog.progress(step)


class PeerWatchdog:
    """A context manager that watches the other processes (see the module docstring).

    Args:
        timeout_s: seconds without a tick (or without progress, behind this process) after which
            a peer counts as lost; the thread ticks every tenth of it (at least every 0.5 s).

    With one process it does nothing.
    """

    def __init__(self, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.interval_s = max(0.5, self.timeout_s / 10)
        self._stop = threading.Event()
        self._thread = None
        self._step = 0

    def progress(self, step: int) -> None:
        """Record this process's progress (a host integer, e.g. the training step): a step
        hook for `saejax.loop.fit` (`step_hooks=[watchdog.progress]`)."""
        self._step = int(step)

    def __enter__(self) -> "PeerWatchdog":
        _ENTERED.append(self)
        if jax.process_count() > 1:
            from jax._src import distributed  # noqa: PLC0415 - the coordination service's client has no public handle

            self._client = distributed.global_state.client
            self._client.key_value_set(_KEY.format(jax.process_index()), f"0 {self._step}", allow_overwrite=True)
            self._thread = threading.Thread(target=self._watch, name="saejax-peer-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _ENTERED.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        me, count = jax.process_index(), jax.process_count()
        peers = [i for i in range(count) if i != me]
        seen = {}  # peer -> (its tick, its step, when each last changed, in this process's clock)
        my_step, my_step_at, tick = self._step, time.monotonic(), 0
        while not self._stop.wait(self.interval_s):
            tick, now = tick + 1, time.monotonic()
            if self._step != my_step:
                my_step, my_step_at = self._step, now
            try:
                self._client.key_value_set(_KEY.format(me), f"{tick} {my_step}", allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordinator is gone: JAX ends this process itself
                continue
            for peer in peers:
                try:
                    peer_tick, peer_step = map(int, self._client.key_value_try_get(_KEY.format(peer)).split())
                except Exception:  # noqa: BLE001 - not written yet: a peer that never starts ticking is lost too
                    peer_tick, peer_step = -1, -1
                last_tick, last_step, tick_at, step_at = seen.get(peer, (peer_tick, peer_step, now, now))
                tick_at = now if peer_tick != last_tick else tick_at
                step_at = now if peer_step != last_step else step_at
                seen[peer] = (peer_tick, peer_step, tick_at, step_at)
                if now - tick_at > self.timeout_s:
                    why = f"no sign of life for {now - tick_at:.0f} s"
                elif peer_step < my_step and min(now - step_at, now - my_step_at) > self.timeout_s:
                    why = (f"alive but stuck at step {peer_step} for {now - step_at:.0f} s while this process "
                           f"waits for it at step {my_step}")
                else:
                    continue
                print(f"\nsaejax: process {peer} of {count} stopped answering ({why}; this is process {me}). Stopping; "
                      f"the newest checkpoint stays usable: rerun the same command on every host to resume.",
                      file=sys.stderr, flush=True)
                os._exit(PEER_LOST_EXIT)

    def lost_peer(self) -> str | None:
        """After an error in this process: the message naming a peer whose tick stops for three
        of the watchdog's intervals (it died, and that is why a collective failed), or None
        when every peer still ticks (or there is one process)."""
        if self._thread is None:
            return None
        wait_s = 3 * self.interval_s
        me, count = jax.process_index(), jax.process_count()

        def ticks():
            out = {}
            for peer in (i for i in range(count) if i != me):
                try:
                    out[peer] = self._client.key_value_try_get(_KEY.format(peer)).split()[0]
                except Exception:  # noqa: BLE001 - gone from the store: no tick
                    out[peer] = None
            return out

        before = ticks()
        time.sleep(wait_s)
        after = ticks()
        stopped = [peer for peer in before if after[peer] is None or after[peer] == before[peer]]
        if not stopped:
            return None
        return (f"saejax: process {stopped[0]} of {count} stopped answering (no tick for {wait_s:.0f} s; this "
                f"is process {me}), which is why the step above failed. The newest checkpoint stays usable: rerun "
                f"the same command on every host to resume.")
