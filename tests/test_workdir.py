"""saejax.checkpoint.workdir: one run per workdir (stale locks taken over), and the config
comparison that guards a resume."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from saejax.checkpoint.workdir import (ConfigChangedError, WorkdirBusyError, WorkdirLock, check_resume,
                                       config_changes)


def test_a_held_workdir_refuses_a_second_lock_naming_the_holder(tmp_path):
    with WorkdirLock(tmp_path) as first:
        assert first.held and first.took_over_from is None
        with pytest.raises(WorkdirBusyError, match=f"in use by PID {os.getpid()} on host {socket.gethostname()}"):
            WorkdirLock(tmp_path).acquire()
    with WorkdirLock(tmp_path) as again:  # released on exit: free again, and not "stale"
        assert again.held and again.took_over_from is None


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = ("import os, signal, sys; from saejax.checkpoint.workdir import WorkdirLock; "
            f"WorkdirLock({str(tmp_path)!r}).acquire(); print(os.getpid(), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL
    with WorkdirLock(tmp_path) as lock:
        assert lock.took_over_from["pid"] == int(out.stdout.split()[0])


def test_config_changes_list_every_differing_leaf_and_check_resume_names_them():
    saved = {"sweep": {"learning_rate": [1e-3, 3e-3], "k": [0]}, "layers": [10], "total_tokens": 100}
    new = {"sweep": {"learning_rate": (1e-2, 3e-2), "k": (0,)}, "layers": (10,), "total_tokens": 200, "extra": 1}
    changes = config_changes(saved, new)
    assert changes == {"extra": (None, 1), "sweep.learning_rate": ([1e-3, 3e-3], [1e-2, 3e-2]),
                       "total_tokens": (100, 200)}
    check_resume(changes, allowed=("total_tokens", "sweep", "extra"))
    with pytest.raises(ConfigChangedError, match=r"sweep.learning_rate: \[0.001, 0.003\] -> \[0.01, 0.03\]; "
                                                 r"total_tokens: 100 -> 200\. .*--allow_config_change="
                                                 r"sweep.learning_rate,total_tokens"):
        check_resume(changes, allowed=("extra", "sweep.k"))
