"""saejax.data.HfDatasetSource: Hugging Face data sets (save_to_disk folders, parquet files, a
stream of shards) made here with `datasets` itself, images of mixed sizes and pixel formats."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

from saejax import data
from saejax.data.huggingface import STRIDE
from saejax.datasets import real_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_VAL = 20, 16
CLASSES = ("negative", "red", "blue")


def _cells(directory, n, seed, unreadable=()):
    """`n` encoded images (mixed sizes, every pixel format of `real_files`) as undecoded Image
    cells, the files they came from, and labels; the indices in `unreadable` hold a truncated JPEG."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    cells, files = [], []
    for i in range(n):
        w, h = real_files.photo_size(rng, 24)
        kind = real_files.FORMATS[i % len(real_files.FORMATS)]
        path = os.path.join(directory, f"{i:03d}.{'png' if kind == 'png_rgba' else 'jpg'}")
        if i in unreadable:
            real_files.save_truncated(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:
            real_files.save_photo(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), kind)
        cells.append({"bytes": open(path, "rb").read(), "path": None})
        files.append(path)
    return cells, files, [int(x) for x in rng.integers(0, len(CLASSES), n)]


def _dataset(cells, labels):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    return datasets.Dataset.from_dict({"image": cells, "label": labels}, features=features)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """`{layout: path}` of one data set (train with one unreadable image at index 5, validation)
    saved three ways, and the files and labels it was made from."""
    root = tmp_path_factory.mktemp("hf")
    train_cells, train_files, train_labels = _cells(root / "files_train", N_TRAIN, 0, unreadable=(5,))
    val_cells, val_files, val_labels = _cells(root / "files_val", N_VAL, 1)
    train, val = _dataset(train_cells, train_labels), _dataset(val_cells, val_labels)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root / "dict"))
    train.save_to_disk(str(root / "saved"))
    os.makedirs(root / "parquet")
    for k in range(4):  # four shards of 5, for the stream
        train.select(range(5 * k, 5 * k + 5)).to_parquet(str(root / "parquet" / f"train-{k:05d}-of-00004.parquet"))
    return dict(dict=str(root / "dict"), saved=str(root / "saved"), parquet=str(root / "parquet" / "*.parquet"),
                train_files=train_files, train_labels=train_labels, val_files=val_files)


@pytest.mark.parametrize("layout", ["dict", "saved", "parquet"])
def test_every_layout_reads_the_images_by_the_read_image_policy(tree, layout):
    source = data.HfDatasetSource(tree[layout], "train")
    assert len(source) == N_TRAIN and source.classes == CLASSES and source.has_labels
    np.testing.assert_array_equal(source.labels, tree["train_labels"])
    for i in range(N_TRAIN):
        if i == 5:
            with pytest.raises(data.UnreadableImageError, match=r"train\[5\]"):
                source[i]
            continue
        example = source[i]
        np.testing.assert_array_equal(example.image, data.read_image(tree["train_files"][i]), err_msg=str(i))
        assert example.label == tree["train_labels"][i]
    sized = data.HfDatasetSource(tree[layout], "train", image_size=16, short_side=20)
    expected = data.Resizing.of(16, short_side=20).apply(data.read_image(tree["train_files"][3]))
    np.testing.assert_array_equal(sized[3].image, expected)


def test_ids_are_the_data_sets_rows_in_a_seeded_resumable_order(tree):
    source = data.HfDatasetSource(tree["dict"], "validation", image_size=16)
    got = list(data.batches(source, 3, seed=7, epochs=2))
    assert [b.position for b in got] == [3, 6, 9, 12, 16, 19, 22, 25, 28, 32]  # each epoch's last, incomplete batch dropped
    np.testing.assert_array_equal(np.concatenate([b.ids for b in got[:2]]), data.permutation(N_VAL, seed=7, epoch=0)[:6])
    for b in got:
        for image, i in zip(b.images, b.ids):
            np.testing.assert_array_equal(image, source[int(i)].image)
    resumed = list(data.batches(source, 3, seed=7, epochs=2, start=got[1].position))
    assert [b.ids.tolist() for b in resumed] == [b.ids.tolist() for b in got[2:]]
    # Two processes split every global batch; together they read the single-process batches.
    halves = [list(data.batches(source, 2, seed=7, epochs=1, process_index=p, process_count=2)) for p in range(2)]
    whole = list(data.batches(source, 4, seed=7, epochs=1))
    assert len(whole) == 4
    for a, b, w in zip(*halves, whole):
        assert a.ids.tolist() + b.ids.tolist() == w.ids.tolist() and a.position == b.position == w.position


def test_unreadable_images_are_skipped_and_counted(tree):
    source = data.HfDatasetSource(tree["saved"], "train", image_size=16, skip_unreadable=True)
    seen = [i for b in data.batches(source, 4, shuffle=False, epochs=1) for i in b.ids.tolist()]
    assert 5 not in seen and len(seen) == N_TRAIN and seen.count(6) == 2  # its slot refilled by the next
    assert list(source.skipped) == [5] and "cannot read image" in source.skipped[5]
    assert data.skipped_report(train=source)["train"]["files"][0].startswith(f"{tree['saved']}/train[5]: ")
    once = [i for b in data.one_pass(data.HfDatasetSource(tree["saved"], "train", image_size=16, skip_unreadable=True), 4)
            for i in b.ids.tolist()]
    assert once == [i for i in range(N_TRAIN) if i != 5]
    strict = data.HfDatasetSource(tree["saved"], "train", image_size=16)
    with pytest.raises(data.UnreadableImageError, match="train\\[5\\]"):
        list(data.batches(strict, 4, shuffle=False, epochs=1))


def test_errors_name_what_exists(tree, monkeypatch):
    with pytest.raises(ValueError, match=r"has no split 'test'; splits: \['train', 'validation'\]"):
        data.HfDatasetSource(tree["dict"], "test")
    with pytest.raises(KeyError, match=r"image_column='img' is not a column .* columns: \['image', 'label'\]"):
        data.HfDatasetSource(tree["saved"], image_column="img")
    with pytest.raises(KeyError, match=r"label_column='class'.*pass label_column=None"):
        data.HfDatasetSource(tree["saved"], label_column="class")
    assert not data.HfDatasetSource(tree["saved"], label_column=None).has_labels
    with pytest.raises(FileNotFoundError, match="no parquet files match"):
        data.HfDatasetSource(os.path.join(os.path.dirname(tree["saved"]), "nothing", "*.parquet"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not open the Hugging Face data set 'ILSVRC/imagenet-1k'.*save_to_disk"):
        data.HfDatasetSource("ILSVRC/imagenet-1k", cache_dir=os.path.dirname(tree["saved"]))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'saejax\[hf\]'"):
        data.HfDatasetSource(tree["saved"])


def test_a_stream_reads_shards_in_a_seeded_order_and_resumes_mid_shard(tree):
    source = data.HfDatasetSource(tree["parquet"], "train", streaming=True, image_size=16, skip_unreadable=True)
    assert source.n_shards == 4
    with pytest.raises(TypeError, match="a streaming source has no length"):
        len(source)
    got = list(data.batches(source, 3, seed=2, epochs=2, drop_remainder=False))
    order = [data.permutation(4, seed=2, epoch=e) for e in range(2)]
    rows = [i // STRIDE * 5 + i % STRIDE for b in got for i in b.ids.tolist()]  # shard k holds rows 5k .. 5k + 4
    stream = [5 * int(k) + j for e in range(2) for k in order[e] for j in range(5)]
    batches = [stream[20 * e + lo:20 * e + min(lo + 3, 20)] for e in range(2) for lo in range(0, 20, 3)]
    # Row 5 is unreadable: its slot takes the next readable row of its batch (wrapping around).
    assert rows == [b[(i + 1) % len(b)] if r == 5 else r for b in batches for i, r in enumerate(b)]
    assert [len(b.ids) for b in got] == [3] * 6 + [2] + [3] * 6 + [2]  # 20 a epoch: the last batch smaller
    first = got[1].position  # after 6 examples: the second shard of epoch 0, one read
    assert divmod(first, STRIDE) == (1, 1)
    assert got[6].position == 4 * STRIDE  # epoch 1 begins
    resumed = list(data.batches(source, 3, seed=2, epochs=2, drop_remainder=False, start=first))
    assert [b.ids.tolist() for b in resumed] == [b.ids.tolist() for b in got[2:]]
    for b in got[:3]:
        for image, i in zip(b.images, b.ids.tolist()):
            np.testing.assert_array_equal(image, data.Resizing.of(16).apply(
                data.read_image(tree["train_files"][i // STRIDE * 5 + i % STRIDE])))
    # Processes decode disjoint rows of each global batch, as for a map-style source.
    halves = [list(data.batches(source, 2, seed=2, epochs=1, process_index=p, process_count=2)) for p in range(2)]
    whole = list(data.batches(source, 4, seed=2, epochs=1))
    assert len(whole) == 5 and [len(h) for h in halves] == [5, 5]
    for a, b, w in zip(*halves, whole):
        assert a.ids.tolist() + b.ids.tolist() == w.ids.tolist() and a.position == b.position == w.position
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(data.batches(source, 32, seed=0))


def test_train_browse_and_semprobe_read_a_local_data_set(tree, tmp_path):
    out = subprocess.run([sys.executable, "-m", "saejax.cli", "train", f"--workdir={tmp_path / 'train'}",
                          "--config=clip_vit_b16:small", "--config.data.kind=hf", f"--config.data.path={tree['dict']}",
                          "--config.data.skip_unreadable=True", "--config.total_tokens=5120", "--config.eval_images=8",
                          "--config.fidelity.images=8", f"--config.backbone.random.directory={tmp_path / 'backbone'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 20 and last["skipped_images"] == 1  # the unreadable training image, counted
    assert "skipped 1 unreadable images" in out.stdout

    from saejax.cli import browse, semprobe
    from saejax.configs import browse as browse_config
    from saejax.configs import semprobe as semprobe_config

    config = browse_config.get_config("small")
    config.data.update(kind="hf", path=tree["dict"])
    config.images = 8
    config.backbone.random.directory = str(tmp_path / "browse_backbone")
    index = browse.run(config, str(tmp_path / "browse"))
    assert any(f'"{name}"' in open(index).read() for name in CLASSES)  # latents' labels: the ClassLabel's names
    config = semprobe_config.get_config("small")
    config.data.update(kind="hf", path=tree["saved"])
    config.n_permutations, config.n_random = 20, 10
    for model in ("clip", "dinov2"):
        config.models[model].backbone.random.directory = str(tmp_path / model)
    assert set(semprobe.run(config, str(tmp_path / "semprobe"))) == {"red", "blue"}
    result = json.loads((tmp_path / "semprobe" / "semprobe.json").read_text())
    assert set(result["concepts"]) == {"red", "blue"} and result["skipped_images"]["count"] == 1
    assert result["skipped_images"]["files"][0].startswith(f"{tree['saved']}/train[5]: ")
