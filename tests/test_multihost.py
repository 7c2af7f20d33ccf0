"""Two processes on localhost, 4 fake CPU devices each, joined by `jax.distributed` (gloo CPU
collectives): each reads only its own share of the images, and together they compute what one
process computes; the train_sae binary checkpoints and resumes across both."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from saejax import backbones, data, stream

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def stream_args():
    """The stream that both processes run, and that one process runs here for comparison."""
    bb, params = backbones.load(os.path.join(HERE, "fixtures", "backbones", "clip_vision"), cache_dir=False)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    return bb, params, images, dict(layers=(1, 2), batch_size=32, image_batch_size=8, buffer_tokens=256,
                                    key=jax.random.key(0), seed=3, groups=8)


def fidelity_args():
    """The spliced-fidelity run both processes share (10 images in global batches of 8: the
    last one is padded), and that one process runs here for comparison."""
    from saejax import fidelity, sae
    from saejax.analysis.site import Site

    bb, params = backbones.load(os.path.join(HERE, "fixtures", "backbones", "clip_vision"), cache_dir=False)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 10)
    ae = sae.relu(bb.d_model, 64)
    sweep = jax.vmap(ae.init)(jax.random.split(jax.random.key(0), 2))
    head = fidelity.linear_probe_head(jax.random.normal(jax.random.key(1), (bb.d_model, 3)), jax.numpy.zeros(3))
    return Site(bb, params, layer=1, ae=ae, sae_params=sweep), images, labels, dict(head=head, batch_size=8)


def collect_args():
    """A Site and 25 labelled images (3 classes), for the browser's and semprobe's passes."""
    from saejax import sae, site

    bb, params = backbones.load(os.path.join(HERE, "fixtures", "backbones", "clip_vision"), cache_dir=False)
    ae = sae.relu(bb.d_model, 32)
    sae_params = ae.init(jax.random.key(0)).replace(b_enc=jax.numpy.full((32,), 0.05))
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (25, 32, 32, 3), dtype=np.uint8), np.arange(25) % 3
    return site.Site(bb, params, layer=1, ae=ae, sae_params=sae_params), images, labels, ("none", "a", "b")


def findings_args(readout):
    """A second SAE on `readout`'s backbone (for `compare`) and a fixed linear head over 3
    classes on the pooled embedding (for `discovery`)."""
    from saejax import fidelity, sae, site

    ae = sae.relu(readout.bb.d_model, 24)
    other = site.Site(readout.bb, readout.bb_params, layer=1, ae=ae,
                      sae_params=ae.init(jax.random.key(1)).replace(b_enc=jax.numpy.full((24,), 0.05)))
    w = np.random.default_rng(2).standard_normal((readout.bb.d_model, 3)).astype(np.float32)
    return other, fidelity.linear_probe_head(jax.numpy.asarray(w), jax.numpy.zeros(3))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_of_process():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                PYTHONPATH=os.pathsep.join(filter(None, [ROOT, HERE, os.environ.get("PYTHONPATH")])))


def start_pair(make_command):
    """Start processes 0 and 1 of one run; `make_command(port, process_id)` -> argv."""
    port = free_port()
    return [subprocess.Popen(make_command(port, i), cwd=ROOT, env=env_of_process(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish_pair(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outs


def test_each_process_reads_its_share_and_the_stream_equals_one_process(tmp_path):
    procs = start_pair(lambda port, i: [sys.executable, os.path.join(HERE, "multihost_checks.py"), "stream",
                                        str(port), str(i), str(tmp_path)])
    codes, outs = finish_pair(procs)
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    results = [np.load(tmp_path / f"stream_{i}.npz") for i in range(2)]

    bb, params, images, args = stream_args()
    s = stream.ActivationStream(bb, params, data.ArraySource(images), **args)
    want = np.stack([np.concatenate([np.asarray(b[1]), np.asarray(b[2])], 1) for b in (next(s) for _ in range(6))])
    fill_start = s.position()["fill_start"]
    s.close()
    for r in results:  # both processes see the whole global batch, equal to one process's
        np.testing.assert_allclose(r["batches"], want, rtol=1e-5, atol=1e-5)
        assert int(r["fill_start"]) == fill_start
    # Global image batch g (8 images) is process 0's 4 images then process 1's 4: disjoint shares.
    reads = [r["read"].reshape(-1, 4) for r in results]
    passes = min(len(r) for r in reads)  # the host threads may have read ahead by different amounts
    assert passes >= 6
    got = np.concatenate([reads[0][:passes], reads[1][:passes]], axis=1)
    order = data.batches(data.ArraySource(images), 8, seed=3)
    np.testing.assert_array_equal(got, np.stack([next(order).ids for _ in range(passes)]))


def test_spliced_fidelity_on_two_processes_reads_each_share_once_and_equals_one_process(tmp_path):
    from saejax import fidelity

    procs = start_pair(lambda port, i: [sys.executable, os.path.join(HERE, "multihost_checks.py"), "fidelity",
                                        str(port), str(i), str(tmp_path)])
    codes, outs = finish_pair(procs)
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    results = [np.load(tmp_path / f"fidelity_{i}.npz") for i in range(2)]
    site, images, labels, kwargs = fidelity_args()
    want = fidelity.spliced_fidelity(site, data.ArraySource(images, labels=labels), **kwargs)
    values = np.asarray([[r[k] for k in sorted(r) if isinstance(r[k], float)] for r in want])
    for r in results:  # both processes hold the whole result, one process's numbers
        assert list(r["n_images"]) == [10, 10]
        np.testing.assert_allclose(r["values"], values, rtol=2e-5, atol=1e-6)
    # Global batches of 8: process 0 reads images 0-3, process 1 images 4-7; then the 2 left
    # are split evenly, one each; no image is read twice.
    assert sorted(results[0]["read"].tolist() + results[1]["read"].tolist()) == list(range(10))
    assert results[0]["read"].tolist() == [0, 1, 2, 3, 8] and results[1]["read"].tolist() == [4, 5, 6, 7, 9]


def test_browser_semprobe_compare_and_discovery_on_two_processes_equal_one_process(tmp_path):
    import json

    from saejax import browser, compare, discovery
    from saejax.studies.concepts import run_semprobe

    procs = start_pair(lambda port, i: [sys.executable, os.path.join(HERE, "multihost_checks.py"), "collect",
                                        str(port), str(i), str(tmp_path)])
    codes, outs = finish_pair(procs)
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    readout, images, labels, classes = collect_args()
    source = data.ArraySource(images, labels=labels, classes=classes)
    want = browser.collect(readout, source, k=4, batch_size=4, limit=22, heatmaps=False)
    table = run_semprobe({"clip": readout}, source, str(tmp_path / "semprobe_one"), n_permutations=20, n_random=10,
                         batch_size=4)
    got = [np.load(tmp_path / f"collect_{i}.npz") for i in range(2)]
    for r in got:  # both processes hold the merged statistics of the 22 images
        assert int(r["images"]) == want["images"] == 22
        for key in ("frequency", "mean", "max", "hist", "top_values", "top_ids", "label_counts"):
            np.testing.assert_allclose(r[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Global batches of 8: each process reads 4 of every 8, the two together each image once
    # (the last global batch also reads 22 and 23, which the limit leaves out of the counts).
    assert sorted(got[0]["read"].tolist() + got[1]["read"].tolist()) == list(range(24))
    assert got[0]["read"].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    for i in range(2):
        assert json.load(open(tmp_path / f"table_{i}.json")) == json.loads(json.dumps(table))
    # Correlations (each process shifts by its own first batch) and attribution sums, merged.
    other, head = findings_args(readout)
    sums = compare.correlations(readout, other, source, limit=22, batch_size=4)
    scores = discovery.attribution_scores(readout, head, source, n_classes=3, limit=22, batch_size=4)
    for r in got:
        assert float(r["pairs_n"]) == 22 * readout.bb.layout.n_patches
        np.testing.assert_allclose(r["correlation"], sums.correlation(), atol=1e-4)
        np.testing.assert_array_equal(r["pair_top_ids"], sums.top_a_ids)
        np.testing.assert_allclose(r["attribution"], scores.sums, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(r["class_images"], scores.images)
    assert os.path.isfile(tmp_path / "semprobe_0" / "semprobe.json")  # process 0 writes the files
    assert not os.path.exists(tmp_path / "semprobe_1" / "semprobe.json")


def test_binary_on_two_processes_checkpoints_resumes_and_equals_one_process(tmp_path):
    from test_train_sae import command, final_params, run

    # The evaluation at the end runs sharded too (its fidelity over both processes), on few images.
    backbone, steps_40 = str(tmp_path / "backbone"), ("--config.total_tokens=10240", "--config.eval_images=16",
                                                      "--config.fidelity.images=16")
    out = run(tmp_path / "one", backbone, *steps_40)  # one process, one device
    assert out.returncode == 0, out.stderr[-3000:]

    def binary(port, i):
        return command(tmp_path / "two", backbone, *steps_40, f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}")

    # A preemption notice (SIGTERM) to one process stops both at the same step, after a checkpoint.
    procs, ckpts = start_pair(binary), tmp_path / "two" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 10 for d in os.listdir(ckpts)):
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    codes, outs = finish_pair(procs)
    assert codes == [128 + signal.SIGTERM] * 2, [err[-3000:] for _, err in outs]
    stopped = [int(out.split("SIGTERM at step ")[1].split(":")[0]) for out, _ in outs]
    assert stopped[0] == stopped[1] < 40 and stopped[0] in {int(d) for d in os.listdir(ckpts) if d.isdigit()}

    codes, outs = finish_pair(start_pair(binary))
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    assert all(f"resuming from step {stopped[0]}" in out for out, _ in outs)
    # Equal up to float reassociation: the halves of each batch are harvested and their gradients
    # summed on two devices, and 40 Adam steps carry the rounding (seen: 1.5e-4 relative on
    # 0.5% of the weights); a wrong share of the data would differ everywhere, by far more.
    for got, want in zip(final_params(tmp_path / "two"), final_params(tmp_path / "one")):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=5e-4, atol=1e-5)


def _left_behind_pair(check, tmp_path):
    return start_pair(lambda port, i: [sys.executable, os.path.join(HERE, "multihost_checks.py"), check,
                                       str(port), str(i), str(tmp_path)])


def _wait_for_line(proc, line, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.stdout.readline().strip() == line:
            return
    raise AssertionError(f"no {line!r} within {timeout} s")


def test_a_peer_that_is_alive_but_stuck_ends_the_others_naming_it(tmp_path):
    """Process 1 stays at step 1 (its watchdog thread still ticks) while process 0 waits for it
    in a barrier at step 2: process 0 ends with exit 75, naming process 1, after about the 3 s
    timeout instead of waiting in the collective for good."""
    from saejax.run.peers import PEER_LOST_EXIT

    procs = _left_behind_pair("stuck_peer", tmp_path)
    _wait_for_line(procs[1], "stuck")
    began = time.time()
    code = procs[0].wait(timeout=120)
    waited = time.time() - began
    err = procs[0].stderr.read()
    procs[1].kill()
    procs[1].communicate()
    assert code == PEER_LOST_EXIT, err[-3000:]
    assert "saejax: process 1 of 2 stopped answering (alive but stuck at step 1" in err, err[-3000:]
    assert "this is process 0" in err and "rerun the same command on every host to resume" in err
    assert 3 <= waited < 30  # the behaviour under test is the bound: not before the timeout, not long after


def test_a_dead_peer_ends_the_others_naming_it(tmp_path):
    from saejax.run.peers import PEER_LOST_EXIT

    procs = _left_behind_pair("dead_peer", tmp_path)
    _wait_for_line(procs[1], "stuck")
    procs[1].send_signal(signal.SIGKILL)
    began = time.time()
    code = procs[0].wait(timeout=120)
    waited = time.time() - began
    err = procs[0].stderr.read()
    procs[1].communicate()
    assert code == PEER_LOST_EXIT, err[-3000:]
    assert "saejax: process 1 of 2 stopped answering (no sign of life for" in err, err[-3000:]
    assert 3 <= waited < 30



_COMMAND = """
import sys
from saejax.cli import entry

def trains(config, workdir, *, step_hooks=()):
    (hook,) = step_hooks
    print("trains:", type(hook.__self__).__name__, hook.__name__)

def browses(config, workdir):
    print("browses:", workdir)

entry.run_binary(sys.argv[1], {"trains": trains, "browses": browses}[sys.argv[1]], "synthetic.py",
                 argv=["saejax", "--workdir=" + sys.argv[2]])
"""


@pytest.mark.parametrize(("command", "printed"), [("trains", "trains: PeerWatchdog progress"),
                                                  ("browses", "browses: {workdir}")])
def test_the_training_command_gives_its_loop_the_watchdogs_progress(tmp_path, command, printed):
    """`run_binary` hands a command that trains (its `run` takes `step_hooks`) the watchdog's
    `progress`, so a stuck peer is seen by its steps; other commands' `run` is called as before."""
    done = subprocess.run([sys.executable, "-c", _COMMAND, command, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == printed.format(workdir=tmp_path)
