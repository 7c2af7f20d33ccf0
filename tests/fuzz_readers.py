"""Fuzzes every reader saejax has with broken copies of valid files, driven by hypothesis (run
by tests/test_fuzz_readers.py in its own process, so that its peak memory is its own).

    python tests/fuzz_readers.py OUT_JSON CASES_PER_FILE

Mutations: truncation, bit flips, overwritten runs of random bytes, 0xff runs where sizes live
(huge declared lengths), and whole random files; positions are weighted to the first 512 bytes,
where the headers are. For each case the reader must either raise its one documented error
type with a message naming the file's directory, or return a result that passes the file's
`same` check (equal to the valid file's where the format carries a checksum; the same shapes
and architecture where it cannot, as saev's and SAELens' files do not). Each case runs under a
10 s alarm (a hang fails), and the process's peak memory is reported against its peak before
fuzzing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from saejax import backbones, data, sae
from saejax.checkpoint import CheckpointError, TrainCheckpointer, import_saev, load_sae, save_sae
from saejax.checkpoint.export import import_saelens
from saejax.core.normalization import estimate_normalization
from saejax.data import shards
from saejax.run.logs import read_metrics
from saejax.run.training import cached_normalization, read_normalization

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
CASE_SECONDS = 10


def mutations(n: int):
    """Strategies of edits to a file of `n` bytes."""
    hot = max(1, min(n, 512))
    position = st.one_of(st.integers(0, hot - 1), st.integers(0, max(0, n - 1)))
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, max(0, n - 1))),
        st.tuples(st.just("flip"), st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8)),
        st.tuples(st.just("overwrite"), position, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("huge"), st.integers(0, hot - 1)),
        st.tuples(st.just("random"), st.binary(max_size=4096)),
    )


def mutate(valid: bytes, edit) -> bytes:
    kind = edit[0]
    if kind == "truncate":
        return valid[:edit[1]]
    if kind == "random":
        return edit[1]
    buf = bytearray(valid)
    if kind == "flip":
        for at, bit in edit[1]:
            if at < len(buf):
                buf[at] ^= 1 << bit
    elif kind == "overwrite":
        buf[edit[1]:edit[1] + len(edit[2])] = edit[2][:max(0, len(buf) - edit[1])]
    else:
        buf[edit[1]:edit[1] + 8] = b"\xff" * len(buf[edit[1]:edit[1] + 8])
    return bytes(buf)


@dataclass
class Reader:
    """A file to break, how to read it, the error it documents, and what a result that loads
    must satisfy (raises AssertionError if it is silently different)."""
    file: str
    read: Callable[[], object]
    errors: type | tuple[type, ...]
    same: Callable[[object], None]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case ran longer than {CASE_SECONDS} s")


def fuzz(name: str, reader: Reader, cases: int) -> dict[str, int]:
    valid = open(reader.file, "rb").read()
    counts = {"cases": 0, "loaded": 0, "refused": 0}
    where = os.path.dirname(reader.file)

    @settings(max_examples=cases, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(mutations(len(valid)))
    def case(edit):
        broken = mutate(valid, edit)
        with open(reader.file, "wb") as f:
            f.write(broken)
        counts["cases"] += 1
        signal.alarm(CASE_SECONDS)
        try:
            result = reader.read()
        except reader.errors as e:
            if where not in str(e):
                raise AssertionError(f"{name}: {type(e).__name__} does not name the file: {e}") from e
            counts["refused"] += 1
        else:
            if broken != valid:
                reader.same(result)
            counts["loaded"] += 1
        finally:
            signal.alarm(0)
            with open(reader.file, "wb") as f:
                f.write(valid)

    try:
        case()
    except Exception as e:
        raise AssertionError(f"{name} ({reader.file}): {type(e).__name__}: {e}") from e
    return counts


def _equal_trees(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _same_architecture(want):
    def check(result):
        ae, params, _ = result
        want_ae, want_params, _ = want
        assert ae.to_config() == want_ae.to_config(), (ae.to_config(), want_ae.to_config())
        assert [np.shape(x) for x in jax.tree.leaves(params)] == [np.shape(x) for x in jax.tree.leaves(want_params)]
    return check


def build(tmp: str) -> dict[str, Reader]:
    readers = {}

    # saev checkpoints of every era (no checksum in the format: shapes and architecture must hold).
    saev_files = {"0.1.0": os.path.join(FIXTURES, "saev_sae.pt")}
    for schema in ("relu_schema1a", "topk_schema1b", "relu_matryoshka_schema3", "batchtopk_schema5",
                   "batchtopk_unset_threshold_schema4"):
        saev_files[schema] = os.path.join(FIXTURES, "saev_schemas", f"{schema}.pt")
    for name, fixture in saev_files.items():
        path = os.path.join(tmp, f"saev_{name}", "sae.pt")
        os.makedirs(os.path.dirname(path))
        shutil.copy(fixture, path)
        readers[f"import_saev {name}"] = Reader(path, lambda path=path: import_saev(path), CheckpointError,
                                                _same_architecture(import_saev(path)))

    # SAELens (no checksum either).
    saelens_dir = shutil.copytree(os.path.join(FIXTURES, "gated_saelens"), os.path.join(tmp, "saelens"))
    want = import_saelens(saelens_dir)
    for file in ("cfg.json", "sae_weights.safetensors"):
        readers[f"import_saelens {file}"] = Reader(os.path.join(saelens_dir, file), lambda: import_saelens(saelens_dir),
                                                   CheckpointError, _same_architecture(want))

    # saejax's portable SAE: config.json carries the tensors' SHA-256, so what loads is what was saved.
    ae = sae.jumprelu(16, 64)
    norm = estimate_normalization(jax.random.normal(jax.random.key(1), (64, 16)))
    sae_dir = save_sae(os.path.join(tmp, "sae"), ae, ae.init(jax.random.key(0)), normalization=norm)
    want_sae = load_sae(sae_dir)

    def same_sae(result):
        _same_architecture(want_sae)(result)
        _equal_trees(result[1], want_sae[1])
        _equal_trees(result[2]["normalization"], want_sae[2]["normalization"])

    for file in ("sae.safetensors", "config.json"):
        readers[f"load_sae {file}"] = Reader(os.path.join(sae_dir, file), lambda: load_sae(sae_dir), CheckpointError,
                                             same_sae)

    # Activation shards: checksums.json covers every example's bytes.
    bb, bb_params = backbones.load(os.path.join(FIXTURES, "backbones", "clip_vision"), cache_dir=False)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    shards_dir = shards.write_shards(os.path.join(tmp, "shards"), bb, bb_params, data.ArraySource(images),
                                     layers=(0, 2), patches_per_shard=110, batch_size=8)

    def read_all_rows():
        stream = shards.ShardStream(shards_dir, layers=(0, 2), batch_size=8, seed=0)
        return stream.read(np.arange(stream.rows))

    want_rows = read_all_rows()
    for file in ("metadata.json", "shards.json", "checksums.json", "acts000001.bin"):
        readers[f"shards {file}"] = Reader(os.path.join(shards_dir, file), read_all_rows, (ValueError, FileNotFoundError),
                                           lambda rows: np.testing.assert_array_equal(rows, want_rows))

    # normalization.npz (a zip: each member has a CRC-32).
    norm_dir = os.path.join(tmp, "normalization")
    os.makedirs(norm_dir)
    norm_path = os.path.join(norm_dir, "normalization.npz")
    identity = {"backbone": "tiny", "layers": [1, 2]}
    norms = {i: estimate_normalization(jax.random.normal(jax.random.key(i), (32, 8))) for i in (1, 2)}
    cached_normalization(norm_path, identity, (1, 2), lambda: norms)
    readers["normalization.npz"] = Reader(norm_path, lambda: read_normalization(norm_path), ValueError,
                                          lambda got: (_equal_trees(got[1], norms), assert_equal(got[0], identity)))

    # Orbax training checkpoints: a broken newest step falls back to the older one, whose state,
    # config and stream position must be what was saved (checksums cover all three).
    ckpt_dir = os.path.join(tmp, "checkpoints")
    states = {step: {"w": jnp.arange(12.0).reshape(3, 4) * step, "step": jnp.asarray(step)} for step in (10, 20)}
    with TrainCheckpointer(ckpt_dir) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, config={"lr": 1e-3, "layers": [1]}, extra={"stream": {"step": step}})

    def restore():
        with TrainCheckpointer(ckpt_dir) as ckpt:
            return ckpt.restore(jax.eval_shape(lambda: states[10]))

    def same_run(run):
        _equal_trees(run.state, states[run.step])
        assert run.config == {"lr": 1e-3, "layers": [1]} and run.extra == {"stream": {"step": run.step}}, run

    newest = os.path.join(ckpt_dir, "20")
    for root, _, files in sorted(os.walk(newest)):
        for file in sorted(files):
            path = os.path.join(root, file)
            readers[f"orbax {os.path.relpath(path, newest)}"] = Reader(path, restore, CheckpointError, same_run)

    # metrics.jsonl: plain text, so a damaged line that still parses reads as it stands; the
    # reader never fails and gives only well-formed rows.
    metrics_dir = os.path.join(tmp, "metrics")
    os.makedirs(metrics_dir)
    with open(os.path.join(metrics_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, 21):
            f.write(json.dumps({"step": step, "layer": 1, "member": 0, "loss": 1.0 / step}) + "\n")

    def well_formed(rows):
        assert all(isinstance(r, dict) and type(r["step"]) is int for r in rows), rows

    readers["metrics.jsonl"] = Reader(os.path.join(metrics_dir, "metrics.jsonl"), lambda: read_metrics(metrics_dir),
                                      (), well_formed)

    # HF backbone directories (weights without a checksum: shapes must hold). Names the model
    # does not use are ignored, as transformers ignores them, so a damaged head name reads as
    # no head: the encoder must be all there.
    backbone_dir = shutil.copytree(os.path.join(FIXTURES, "backbones", "vit"), os.path.join(tmp, "backbone"))
    want_bb = backbones.load(backbone_dir, cache_dir=False)

    def same_backbone(result):
        assert (result[0].family, result[0].d_model, result[0].n_layers) == \
            (want_bb[0].family, want_bb[0].d_model, want_bb[0].n_layers)
        want_shapes = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(want_bb[1])}
        got_shapes = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(result[1])}
        encoder = {k: v for k, v in want_shapes.items() if not k.startswith("['classifier']")}
        assert encoder.items() <= got_shapes.items() <= want_shapes.items(), (got_shapes, want_shapes)

    for file in ("model.safetensors", "config.json"):
        readers[f"backbones.load {file}"] = Reader(os.path.join(backbone_dir, file),
                                                   lambda: backbones.load(backbone_dir, cache_dir=False), ValueError,
                                                   same_backbone)
    return readers


def assert_equal(a, b):
    assert a == b, (a, b)


def main(out: str, cases: int) -> None:
    signal.signal(signal.SIGALRM, _alarm)
    tmp = tempfile.mkdtemp()
    readers = build(tmp)
    for reader in readers.values():
        reader.read()  # imports and compilations before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # backbones.load builds the model's shapes each time, orbax restores cost more: fewer of their cases.
    results = {name: fuzz(name, reader, cases // 5 if name.startswith(("backbones", "orbax")) else cases)
               for name, reader in readers.items()}
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump({"results": results, "peak_kib_before": before, "peak_kib_after": after}, open(out, "w"))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
