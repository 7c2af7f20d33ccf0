"""One process of a two-process run on localhost (4 fake CPU devices each, gloo collectives),
started by tests/test_multihost.py: `python multihost_checks.py CHECK PORT PROCESS_ID OUT_DIR`."""

import os
import sys

check, port, process_id, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

import jax  # noqa: E402

jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from saejax import data, stream  # noqa: E402


class RecordingSource(data.ArraySource):
    """Remembers which images this process read."""

    def __init__(self, images):
        super().__init__(images)
        self.read = []

    def _take(self, indices):
        self.read.extend(int(i) for i in indices)
        return super()._take(indices)


def check_stream():
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    from test_multihost import stream_args

    bb, params, images, args = stream_args()
    source = RecordingSource(images)
    s = stream.ActivationStream(bb, params, source, **args)
    batches = []
    for _ in range(6):
        batch = next(s)
        batches.append(np.concatenate([multihost_utils.process_allgather(batch[i], tiled=True) for i in (1, 2)], 1))
    position = s.position()
    s.close()
    np.savez(os.path.join(out_dir, f"stream_{process_id}.npz"), read=np.asarray(source.read),
             batches=np.stack(batches), fill_start=position["fill_start"])


def check_fidelity():
    from saejax import fidelity, sharding
    from test_multihost import fidelity_args

    site, images, labels, kwargs = fidelity_args()
    source = RecordingSource(images)
    source.labels = labels
    results = fidelity.spliced_fidelity(site, source, mesh=sharding.make_mesh(), **kwargs)
    np.savez(os.path.join(out_dir, f"fidelity_{process_id}.npz"), read=np.asarray(source.read),
             values=np.asarray([[r[k] for k in sorted(r) if isinstance(r[k], float)] for r in results]),
             n_images=[r["n_images"] for r in results])


def check_collect():
    """The browser's statistics, semprobe's table, compare's correlations and discovery's
    attribution sums, each process reading its share."""
    import json

    from saejax import browser, compare, discovery
    from saejax.studies.concepts import run_semprobe
    from test_multihost import collect_args, findings_args

    readout, images, labels, classes = collect_args()
    source = RecordingSource(images)
    source.labels, source.classes, source.has_labels = labels, classes, True
    collected = browser.collect(readout, source, k=4, batch_size=4, limit=22, heatmaps=False)
    read_by_collect = list(source.read)
    table = run_semprobe({"clip": readout}, source, os.path.join(out_dir, f"semprobe_{process_id}"),
                         n_permutations=20, n_random=10, batch_size=4)
    other, head = findings_args(readout)
    sums = compare.correlations(readout, other, source, limit=22, batch_size=4)
    scores = discovery.attribution_scores(readout, head, source, n_classes=3, limit=22, batch_size=4)
    np.savez(os.path.join(out_dir, f"collect_{process_id}.npz"), read=np.asarray(read_by_collect),
             **{k: v for k, v in collected.items() if isinstance(v, np.ndarray)}, images=collected["images"],
             pairs_n=sums.n, correlation=sums.correlation(), pair_top_ids=sums.top_a_ids, attribution=scores.sums,
             class_images=scores.images)
    with open(os.path.join(out_dir, f"table_{process_id}.json"), "w") as f:
        json.dump(table, f)


def _peer_left_behind():
    """Process 0 reaches step 2 and waits for process 1 in a barrier; process 1 stays at step 1,
    alive, until the test kills it (dead_peer) or for good (stuck_peer)."""
    import time

    from saejax.run import peers

    with peers.PeerWatchdog(timeout_s=3) as watchdog:
        if process_id == 1:
            watchdog.progress(1)
            print("stuck", flush=True)
            time.sleep(600)
        watchdog.progress(2)
        multihost_utils.sync_global_devices("step 2")


check_dead_peer = check_stuck_peer = _peer_left_behind


if __name__ == "__main__":
    globals()[f"check_{check}"]()
    print("ok", flush=True)
