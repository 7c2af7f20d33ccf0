"""Faults at scale (tests/kill_soak.py): SIGKILL at random moments of `train_sae :small` on 8
fake devices and as two processes, resumed each time, ends with the uninterrupted run's
parameters bit for bit and each step logged once. One kill on 8 devices runs in the suite; one kill on two
processes and the long variant (20 kills per topology) are marked slow: `pytest -m slow tests/test_faults.py`. The
suite checks the two-process parts on their own in tests/test_multihost.py: a dead or stuck peer ends the others
naming it, and a run stopped on two processes resumes to one process's parameters."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def soak(topology, kills, workdir, timeout):
    run = subprocess.run([sys.executable, os.path.join(HERE, "kill_soak.py"), f"--topology={topology}",
                          f"--kills={kills}", "--seed=0", f"--workdir={workdir}"],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["kills"] == kills and summary["rounds"] >= 1
    return summary


def test_a_random_kill_on_eight_devices_resumes_to_the_uninterrupted_parameters(tmp_path):
    soak("devices8", 1, tmp_path, timeout=600)


@pytest.mark.slow  # its parts run in the suite: tests/test_multihost.py (a dead peer, resume on two processes)
def test_a_random_kill_on_two_processes_resumes_to_the_uninterrupted_parameters(tmp_path):
    soak("processes2", 1, tmp_path, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["devices8", "processes2"])
def test_twenty_random_kills_on_each_topology(topology, tmp_path):
    summary = soak(topology, 20, tmp_path, timeout=3600)
    assert {"mid-step", "mid-checkpoint", "mid-eval", "mid-report"} <= set(summary["phases"]), summary
