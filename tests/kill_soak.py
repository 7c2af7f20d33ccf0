"""SIGKILL `train_sae :small` at random moments, resume each time, and check the end state
against an uninterrupted run of the same topology (run by tests/test_faults.py; by hand for
the long version):

    python tests/kill_soak.py --topology=devices8 --kills=20 --seed=0 --workdir=/tmp/soak8
    python tests/kill_soak.py --topology=processes2 --kills=20 --seed=0 --workdir=/tmp/soak2

Topologies: `devices8`, one process on 8 fake CPU devices; `processes2`, two processes of 4
fake devices each on localhost (gloo), where the kill hits one process at random and the other
must end by itself: exit 75 with the watchdog's line naming the killed process
(`saejax.run.peers`; `--peer_timeout_s=5`), or an immediate abort: JAX's when the coordinator
(process 0) died, gloo's when the kill tore a transfer mid-message (counted in the summary).

Each kill's moment is drawn (seeded) from five kinds, so every phase is hit:
- a random time in the run;
- mid-step: once this run has logged a step, while no checkpoint is being written;
- while a checkpoint is being written (an orbax temporary directory exists);
- after the final checkpoint, while the run evaluates;
- after `eval.json`, while the report is written.
When a run finishes, its exported parameters must equal the uninterrupted run's bit for bit,
`metrics.jsonl` must hold each step once, and so must TensorBoard (its events read back with
TensorBoard's purge rule); then a new round starts in a fresh workdir. Prints one line per kill
and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from test_multihost import env_of_process, free_port  # noqa: E402
from test_train_sae import command, final_params  # noqa: E402

STEPS = 150  # test_train_sae.command's run
RUN_FLAGS = ("--config.eval_images=16", "--config.fidelity.images=16")
PEER_TIMEOUT_S = 5
GLOO_TORN = "Received data size doesn't match expected size"
KINDS = ("random time", "mid-step", "mid-checkpoint", "mid-eval", "mid-report")


def start(topology: str, workdir: str, backbone_dir: str, log_dir: str, tag: str) -> list[subprocess.Popen]:
    env = env_of_process()  # test_multihost's: 4 fake CPU devices, gloo collectives
    if topology == "devices8":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        argvs = [command(workdir, backbone_dir, *RUN_FLAGS)]
    else:
        port = free_port()
        argvs = [command(workdir, backbone_dir, *RUN_FLAGS, f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}", f"--peer_timeout_s={PEER_TIMEOUT_S}")
                 for i in range(2)]
    return [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(os.path.join(log_dir, f"{tag}.p{i}.out"), "w"),
                             stderr=open(os.path.join(log_dir, f"{tag}.p{i}.err"), "w"))
            for i, argv in enumerate(argvs)]


def phase(workdir: str, since: float = 0.0) -> str:
    """What the run started at `since` was doing, from the files it wrote (a killed run's
    leftovers are older)."""
    def new(path):
        return os.path.exists(path) and os.path.getmtime(path) >= since

    ckpts = os.path.join(workdir, "checkpoints")
    names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
    if any(not n.isdigit() and new(os.path.join(ckpts, n)) for n in names):
        return "mid-checkpoint"
    if new(os.path.join(workdir, "eval.json")):
        return "mid-report"
    if new(os.path.join(ckpts, str(STEPS))):
        return "mid-eval"
    return "mid-step" if any(new(os.path.join(ckpts, n)) for n in names) or new(
        os.path.join(workdir, "metrics.jsonl")) else "startup"


def logged_lines(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.isfile(path) else 0


def moment_reached(kind: str, workdir: str, deadline: float, lines_at_start: int, since: float) -> bool:
    if kind == "random time":
        return time.time() >= deadline
    if kind == "mid-step":  # this run has trained and logged a step, and is not checkpointing
        return logged_lines(workdir) > lines_at_start and phase(workdir, since) == "mid-step"
    return phase(workdir, since) == kind


def tensorboard_steps(workdir: str) -> dict[str, list[int]]:
    """{tag: steps} as TensorBoard shows them: files in order, and a SessionLog START at step s
    (written by MetricsLog on resume) hides the earlier events at steps >= s."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    shown: dict[str, list[int]] = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):  # as TensorBoard
        data = open(path, "rb").read()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            record = data[at + 12:at + 12 + length]
            at += 12 + length + 4
            if len(record) < length:
                break  # a record cut short by the kill: TensorBoard stops reading there too
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for tag in shown:
                    shown[tag] = [s for s in shown[tag] if s < event.step]
            for value in event.summary.value:
                shown[value.tag].append(event.step)
    return shown


def check_finished(workdir: str, reference: str) -> None:
    for member, (got, want) in enumerate(zip(final_params(workdir), final_params(reference), strict=True)):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{workdir}: member {member} {jax.tree_util.keystr(path)}")
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = [r["step"] for r in lines if r["member"] == 0]
    if logged != list(range(1, STEPS + 1)):
        raise AssertionError(f"{workdir}/metrics.jsonl: member 0's steps are not 1..{STEPS} once each: {logged}")
    for tag, steps in tensorboard_steps(workdir).items():
        if sorted(steps) != list(range(1, STEPS + 1)):
            raise AssertionError(f"{workdir}/tensorboard: {tag} shows steps {sorted(steps)}")


def wait(procs, timeout: float) -> list[int]:
    end = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", choices=("devices8", "processes2"), required=True)
    parser.add_argument("--kills", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.workdir, exist_ok=True)
    logs, backbone_dir = os.path.join(args.workdir, "logs"), os.path.join(args.workdir, "backbone")
    os.makedirs(logs, exist_ok=True)

    reference = os.path.join(args.workdir, "reference")
    began = time.time()
    codes = wait(start(args.topology, reference, backbone_dir, logs, "reference"), 600)
    if codes != [0] * len(codes):
        raise SystemExit(f"the uninterrupted run failed ({codes}); see {logs}/reference.*")
    run_seconds = time.time() - began

    kills, rounds, runs, phases, survivor_seconds = 0, 0, 0, collections.Counter(), []
    aborts = collections.Counter()  # survivors ended by an immediate abort instead of the watchdog's line
    while kills < args.kills:
        rounds += 1
        workdir = os.path.join(args.workdir, f"round{rounds}")
        while True:
            runs += 1
            tag = f"round{rounds}.run{runs}"
            lines_at_start, since = logged_lines(workdir), time.time()
            procs = start(args.topology, workdir, backbone_dir, logs, tag)
            kind = KINDS[rng.integers(len(KINDS))] if kills < args.kills else None
            deadline = time.time() + rng.uniform(0.2, 1.0) * run_seconds
            while kind is not None and procs[0].poll() is None and not moment_reached(kind, workdir, deadline,
                                                                                     lines_at_start, since):
                time.sleep(0.005)
            if kind is None or any(p.poll() is not None for p in procs):
                codes = wait(procs, 600)
                if codes != [0] * len(codes):
                    raise SystemExit(f"{tag} failed ({codes}); see {logs}/{tag}.*")
                check_finished(workdir, reference)
                print(f"{workdir}: finished, equal to the uninterrupted run", flush=True)
                break
            victim = int(rng.integers(len(procs)))
            where = phase(workdir, since)
            procs[victim].send_signal(signal.SIGKILL)
            killed_at = time.time()
            kills += 1
            phases[where] += 1
            codes = wait(procs, 10 * PEER_TIMEOUT_S + 60)
            note = ""
            if len(procs) == 2:
                survivor = 1 - victim
                err = open(os.path.join(logs, f"{tag}.p{survivor}.err")).read()
                survivor_seconds.append(time.time() - killed_at)
                if codes[survivor] == 75:
                    if f"process {victim} of 2 stopped answering" not in err and not (
                            where == "startup" and "a process did not join" in err):
                        raise SystemExit(f"{tag}: the survivor exited 75 without naming process {victim}")
                elif codes[survivor] == 0:
                    pass  # the peer died after the survivor's last collective: it finished alone
                elif codes[survivor] == -signal.SIGABRT and (victim == 0 or GLOO_TORN in err):
                    # Immediate aborts: JAX's when the coordinator died; gloo's on a transfer torn mid-message.
                    aborts[("coordinator" if victim == 0 else "gloo")] += 1
                else:
                    raise SystemExit(f"{tag}: after process {victim}'s kill, process {survivor} exited "
                                     f"{codes[survivor]}; see {logs}/{tag}.p{survivor}.err")
                note = f", process {victim}; the other exited {codes[survivor]} after {survivor_seconds[-1]:.1f} s"
            print(f"kill {kills}: {kind} -> {where}{note}", flush=True)
    summary = {"topology": args.topology, "kills": kills, "rounds": rounds, "runs": runs, "phases": dict(phases),
               "survivor_max_seconds": max(survivor_seconds, default=None), "survivor_aborts": dict(aborts),
               "seconds": round(time.time() - began)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
