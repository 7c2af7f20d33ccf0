"""A disk that fills up: a checkpoint, activation shards, the sweep report and the browser's
pages each end in one clear OSError, keep the previous checkpoint / page intact, and leave no
half-written file a later run would trust.

The disk is a tmpfs of a few hundred KiB mounted for the test (ENOSPC, as on a real disk);
where the machine does not allow mounting, a file-size limit on this process stands in for it
(EFBIG at the same writes)."""

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import data, loop, sae, train
from saejax.checkpoint import TrainCheckpointer
from saejax.core.losses import Objective
from saejax.data import shards
from saejax.run import report
from test_loop import Stream

FULL = (errno.ENOSPC, errno.EFBIG)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


@contextlib.contextmanager
def small_disk(directory, size_bytes=512 * 1024):
    """Yields `disk`: after `disk.fill(leave_bytes)`, writing more than `leave_bytes` more fails;
    `disk.free()` makes room again."""
    os.makedirs(directory)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)

    def fill(leave_bytes):
        if mounted:
            with open(os.path.join(directory, "filler"), "wb") as f:
                free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
                f.write(b"\0" * max(0, free - leave_bytes))
        else:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (leave_bytes, limit[1]))

    def free():
        if mounted:
            os.remove(os.path.join(directory, "filler"))
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    try:
        yield types.SimpleNamespace(fill=fill, free=free)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
        if mounted:  # lazily: a file still open (a failed writer's) must not leave the mount behind
            subprocess.run(["umount", "--lazy", str(directory)], check=True)


def _setup():
    trainer = train.make_trainer(sae.topk(8, 256, k=3), objective=Objective(sparsity="none"), warmup_steps=2)
    states = trainer.init_sweep(jax.random.key(0), train.Hparams.grid([1e-3, 3e-3]))
    return trainer, states, jax.random.normal(jax.random.key(1), (20, 32, 8))


def test_a_checkpoint_on_a_full_disk_is_one_error_and_the_previous_one_resumes(tmp_path):
    trainer, states, xs = _setup()
    copy = lambda: {3: jax.tree.map(jnp.copy, states)}  # noqa: E731  (fit donates its states)
    straight = loop.fit(trainer, copy(), Stream(xs), steps=20)
    with small_disk(tmp_path / "disk") as disk:
        ckpt = TrainCheckpointer(tmp_path / "disk" / "checkpoints")
        done = loop.fit(trainer, copy(), Stream(xs), steps=10, checkpointer=ckpt, checkpoint_every=10)
        disk.fill(leave_bytes=8 * 1024)  # less than a checkpoint
        with pytest.raises(Exception) as raised:
            loop.fit(trainer, done, Stream(xs, 10), steps=20, start_step=10, checkpointer=ckpt, checkpoint_every=5)
        chain, cause = [], raised.value
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        assert any(isinstance(e, OSError) and e.errno in FULL for e in chain) or \
            any(s in str(raised.value) for s in ("No space left", "File too large")), repr(raised.value)
        with contextlib.suppress(Exception):  # its manager still holds the failed save's error
            ckpt.close()
        assert f"saejax: the newest complete checkpoint is step 10 in {ckpt.directory}" in raised.value.__notes__
        assert ckpt.all_steps() == [10]  # the failed step is not listed, so nothing trusts it
        disk.free()  # the user makes room, then resumes (a new process: a new checkpointer)
        with TrainCheckpointer(tmp_path / "disk" / "checkpoints") as again:
            assert again.all_steps() == [10]
            run = again.restore({"3": states})
        assert run.step == 10 and run.extra == {"stream": {"t": 10}}
        resumed = loop.fit(trainer, {3: run.state["3"]}, Stream(xs, 10), steps=20, start_step=10)
    for a, b in zip(jax.tree.leaves(resumed[3].params), jax.tree.leaves(straight[3].params)):
        np.testing.assert_array_equal(a, b)


def test_shards_on_a_full_disk_are_one_error_and_never_read_as_complete(tmp_path):
    from saejax import backbones

    bb, params = backbones.load(os.path.join(FIXTURES, "clip_vision"), cache_dir=False)
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    with small_disk(tmp_path / "disk") as disk:
        disk.fill(leave_bytes=8 * 1024)  # less than one shard: 3 examples x 2 layers x 17 tokens x 32 x 4 bytes
        with pytest.raises(OSError, match=r"acts000000.bin: cannot reserve 13,056 bytes \((No space left on device|"
                                          r"File too large)\); the shards folder stays incomplete") as raised:
            shards.write_shards(tmp_path / "disk" / "shards", bb, params, data.ArraySource(images), layers=(0, 2),
                                patches_per_shard=110, batch_size=8)
        assert raised.value.errno in FULL
        (folder,) = [f.path for f in os.scandir(tmp_path / "disk" / "shards")]
        assert not os.path.exists(os.path.join(folder, "shards.json"))
        with pytest.raises(FileNotFoundError, match="shards.json: missing"):
            shards.ShardStream(folder, layers=(0,), batch_size=8)


def test_the_report_and_the_browser_on_a_full_disk_keep_their_previous_pages(tmp_path):
    from saejax.checkpoint.staging import write_atomically

    with small_disk(tmp_path / "disk") as disk:
        workdir = tmp_path / "disk" / "run"
        os.makedirs(workdir)
        with open(workdir / "eval.json", "w") as f:
            json.dump({"members": [{"layer": 1, "member": 0, "l0": 4.0, "nmse": 0.2, "explained_variance": 0.8,
                                    "dead_fraction": 0.0, "dense_fraction": 0.0, "learning_rate": 1e-3,
                                    "sparsity_coeff": 0.0}], "steps": 10}, f)
        page = report.write_sweep_report(str(workdir))
        before = open(page).read()
        disk.fill(leave_bytes=1024)  # less than the page
        with pytest.raises(OSError, match=r"report.html: could not write it \((No space left on device|File too "
                                          r"large)\); the previous file, if any, is unchanged") as raised:
            report.write_sweep_report(str(workdir))
        assert raised.value.errno in FULL
        assert open(page).read() == before  # intact
        assert sorted(os.listdir(workdir)) == ["eval.json", "report.html"]  # no temporary file left
        index = os.path.join(workdir, "index.html")  # the browser's pages are written the same way
        with pytest.raises(OSError, match=r"index.html: could not write it"):
            write_atomically(index, "<html>" + "x" * 4096)
        assert not os.path.exists(index)
