"""saev's activation shards (protocol 2.1): written from a harvest, read back exactly, streamed
in a resumable order that visits every row once per epoch, and trained on by loop.fit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import backbones, data, loop, sae, shards, train
from saejax.core.losses import Objective

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    bb, params = backbones.load(os.path.join(FIXTURES, "clip_vision"), cache_dir=False)  # 16 patches + CLS
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    masks = rng.integers(0, 5, (20, 32, 32)).astype(np.uint8)
    source = data.ArraySource(images, masks=masks)
    # 3 examples per shard: 17 tokens x 2 layers x 3 = 102 <= 110
    directory = shards.write_shards(tmp_path_factory.mktemp("shards"), bb, params, source, layers=(0, 2),
                                    patches_per_shard=110, batch_size=8)
    return bb, params, images, masks, directory


def test_the_layout_follows_the_protocol(written):
    bb, params, images, masks, directory = written
    metadata, listed = shards.read_metadata(directory)
    assert os.path.basename(directory) == shards._hash(metadata)  # pylint: disable=protected-access
    assert (metadata["protocol"], metadata["layers"], metadata["content_tokens_per_example"], metadata["cls_token"],
            metadata["n_examples"], metadata["max_tokens_per_shard"]) == ("2.1", [0, 2], 16, True, 20, 110)
    assert [s["n_examples"] for s in listed] == [3] * 6 + [2]
    assert json.load(open(os.path.join(directory, "shards.json")))[0]["name"] == "acts000000.bin"
    # Example 7 sits in shard 2, row 1: CLS then patches, per layer, equal to the forward pass.
    acts = np.fromfile(os.path.join(directory, "acts000002.bin"), np.float32).reshape(3, 2, 17, 32)
    out = bb.forward(params, jnp.asarray(bb.preprocess(images[7:8])), capture=(0, 2))
    for j, layer in enumerate((0, 2)):
        np.testing.assert_allclose(acts[1, j], np.asarray(out.captured[layer][0]), rtol=1e-5, atol=1e-5)
    labels = np.fromfile(os.path.join(directory, "labels.bin"), np.uint8).reshape(20, 16)
    np.testing.assert_array_equal(labels, data.patch_mode_labels(masks, 8, ignore=None).reshape(20, 16))


def test_the_stream_visits_every_row_once_per_epoch_and_resumes(written):
    *_, directory = written
    stream = shards.ShardStream(directory, layers=(2,), batch_size=32, seed=1)
    per_epoch = stream.rows // 32  # 320 patch rows -> 10 batches
    rows = np.concatenate([stream.rows_of(t) for t in range(per_epoch)])
    np.testing.assert_array_equal(np.sort(rows), np.arange(320))
    assert not np.array_equal(stream.rows_of(0), stream.rows_of(per_epoch))  # a new order next epoch
    batches = [np.asarray(next(stream)[2]) for _ in range(4)]
    resumed = shards.ShardStream(directory, layers=(2,), batch_size=32, seed=1, position={"step": 2})
    np.testing.assert_array_equal(np.asarray(next(resumed)[2]), batches[2])
    # A row is the stored activation of its (example, patch).
    example, token = divmod(int(stream.rows_of(0)[5]), 16)
    shard, row = divmod(example, 3)
    acts = np.fromfile(os.path.join(directory, f"acts{shard:06d}.bin"), np.float32).reshape(-1, 2, 17, 32)
    np.testing.assert_array_equal(batches[0][5], acts[row, 1, 1 + token])
    with pytest.raises(ValueError, match=r"layers \[1\] are not stored; stored layers: \[0, 2\]"):
        shards.ShardStream(directory, layers=(1,), batch_size=32)


def test_many_saes_train_from_one_harvest(written):
    *_, directory = written
    for ae in (sae.relu(32, 64), sae.topk(32, 64, k=4)):
        trainer = train.make_trainer(ae, objective=Objective(sparsity="l1" if ae.architecture == "relu" else "none"),
                                     warmup_steps=2)
        states = {0: trainer.init_sweep(jax.random.key(0), train.Hparams.grid([3e-3], [1e-4]))}
        losses = []
        loop.fit(trainer, states, shards.ShardStream(directory, layers=(0,), batch_size=32, seed=0), steps=30,
                 hooks=[lambda step, m: losses.append(float(m[0]["loss"][0]))])  # noqa: B023
        assert losses[-1] < losses[0] and np.isfinite(losses).all()


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / os.path.basename(directory))


def _read_everything(directory):
    stream = shards.ShardStream(directory, layers=(0, 2), batch_size=32, seed=0)
    for step in range(stream.rows // 32):
        stream.read(stream.rows_of(step))


def test_checksums_record_the_versions_and_a_newer_major_warns(written, tmp_path):
    import saejax
    from saejax import provenance

    *_, directory = written
    path = os.path.join(directory, "checksums.json")
    assert json.load(open(path))["written_by"] == saejax.written_by()
    copy = _copy(directory, tmp_path)
    table = json.load(open(os.path.join(copy, "checksums.json")))
    table["written_by"]["saejax"] = "99.0.0"
    json.dump(table, open(os.path.join(copy, "checksums.json"), "w"))
    with pytest.warns(provenance.NewerVersionWarning, match=r"checksums.json was written by saejax 99.0.0"):
        shards.ShardStream(copy, layers=(0,), batch_size=4)


def test_a_flipped_bit_in_a_shard_is_named_with_its_file_example_and_offset(written, tmp_path):
    *_, directory = written
    copy = _copy(directory, tmp_path)
    _read_everything(copy)  # intact: every example matches its checksum
    table = json.load(open(os.path.join(copy, "checksums.json")))
    assert table["algorithm"] == "crc32" and [len(v) for v in table["examples"].values()] == [3] * 6 + [2]
    row_bytes = 2 * 17 * 32 * 4
    path = os.path.join(copy, "acts000004.bin")
    with open(path, "r+b") as f:  # the lowest mantissa bit of one value of example 1: still finite
        f.seek(row_bytes + 400)
        byte = f.read(1)
        f.seek(row_bytes + 400)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(shards.ShardCorruptError,
                       match=rf"acts000004.bin: example 1 \(bytes {row_bytes} to {2 * row_bytes}\) does not match "
                             r"its checksum in checksums.json"):
        _read_everything(copy)


def test_nan_in_a_shard_without_checksums_is_named_with_its_offset(written, tmp_path):
    *_, directory = written
    copy = _copy(directory, tmp_path)
    os.remove(os.path.join(copy, "checksums.json"))  # as saev writes them
    acts = np.memmap(os.path.join(copy, "acts000001.bin"), np.float32, "r+", shape=(3, 2, 17, 32))
    acts[2, 1, 5, 7] = np.nan  # layer 2 (stored second), token 5 (CLS is token 0)
    acts.flush()
    offset = ((2 * 2 + 1) * 17 + 5) * 32 * 4  # the token's row within the file
    stream = shards.ShardStream(copy, layers=(2,), batch_size=32, seed=0)
    with pytest.raises(shards.ShardCorruptError,
                       match=rf"acts000001.bin: example 2 layer 2 token 5 holds NaN or infinity \(its row starts "
                             rf"at byte {offset}\)"):
        for step in range(stream.rows // 32):
            stream.read(stream.rows_of(step))
