"""saejax.data: sources (arrays, image folders, tfds without TensorFlow) and the batch iterator."""

import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from saejax import data


def _id_images(n, h=4, w=5):
    """uint8 [n, h, w, 3] whose pixels all equal the image's index (mod 256)."""
    return np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()


def _ids(batch_list):
    return [b.ids.tolist() for b in batch_list]


# --------------------------------------------------------------------------------------------
# Order, determinism, resumption


def test_permutation_is_stable_and_seeded():
    order = data.permutation(10, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(10)) and order.dtype == np.int64
    np.testing.assert_array_equal(order, data.permutation(10, seed=0, epoch=0))
    assert not np.array_equal(order, data.permutation(10, seed=0, epoch=1))
    assert not np.array_equal(order, data.permutation(10, seed=1, epoch=0))
    # Pinned: the order must not move between numpy versions, or checkpointed positions break.
    assert order.tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]


def test_array_source_batches_cover_each_epoch_with_the_right_content():
    n = 10
    labels = np.arange(n) * 7
    masks = np.arange(n, dtype=np.int32)[:, None, None] * np.ones((1, 4, 5), np.int32)
    source = data.ArraySource(_id_images(n), labels=labels, masks=masks)
    got = list(data.batches(source, 4, seed=3, drop_remainder=False, epochs=2))
    assert [len(b.ids) for b in got] == [4, 4, 2, 4, 4, 2]
    assert [b.position for b in got] == [4, 8, 10, 14, 18, 20]
    for epoch in range(2):
        ids = np.concatenate([b.ids for b in got[3 * epoch:3 * epoch + 3]])
        np.testing.assert_array_equal(ids, data.permutation(n, seed=3, epoch=epoch))
    for b in got:
        assert b.images.dtype == np.uint8 and b.images.shape[1:] == (4, 5, 3) and b.ids.dtype == np.int64
        np.testing.assert_array_equal(b.images[:, 0, 0, 0], b.ids)
        np.testing.assert_array_equal(b.labels, b.ids * 7)
        np.testing.assert_array_equal(b.masks[:, 2, 3], b.ids)
    # Same seed, same batches; another seed, another order; no shuffling: index order.
    again = list(data.batches(source, 4, seed=3, drop_remainder=False, epochs=2))
    assert _ids(again) == _ids(got)
    assert _ids(data.batches(source, 4, seed=4, drop_remainder=False, epochs=2)) != _ids(got)
    plain = list(data.batches(source, 4, shuffle=False, drop_remainder=False, epochs=1))
    assert _ids(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_drop_remainder_ends_epochs_on_a_multiple_of_n():
    source = data.ArraySource(_id_images(10))
    got = list(data.batches(source, 4, seed=0, epochs=3))
    assert [b.position for b in got] == [4, 10, 14, 20, 24, 30]
    assert all(len(b.ids) == 4 for b in got)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_resume_from_any_position_gives_the_same_batches(drop_remainder):
    source = data.ArraySource(_id_images(11))
    full = list(data.batches(source, 3, seed=7, drop_remainder=drop_remainder, epochs=3))
    for k, b in enumerate(full):
        resumed = list(data.batches(source, 3, seed=7, start=b.position, drop_remainder=drop_remainder, epochs=3))
        assert _ids(resumed) == _ids(full[k + 1:])
        assert [r.position for r in resumed] == [f.position for f in full[k + 1:]]
    # An infinite iterator resumed midway agrees with the uninterrupted one.
    it = data.batches(source, 3, seed=7, drop_remainder=drop_remainder)
    head = list(itertools.islice(it, 5))
    tail = list(itertools.islice(it, 6))
    resumed = list(itertools.islice(data.batches(source, 3, seed=7, start=head[-1].position,
                                                 drop_remainder=drop_remainder), 6))
    assert _ids(resumed) == _ids(tail)


def test_positions_count_examples_so_the_batch_size_can_change():
    source = data.ArraySource(_id_images(12))
    small = np.concatenate([b.ids for b in data.batches(source, 2, seed=1, epochs=2)])
    large = np.concatenate([b.ids for b in data.batches(source, 6, seed=1, epochs=2)])
    np.testing.assert_array_equal(small, large)
    first = next(data.batches(source, 2, seed=1))  # consumed 2 examples, then resume with 5
    rest = np.concatenate([b.ids for b in data.batches(source, 5, seed=1, start=first.position,
                                                       drop_remainder=False, epochs=1)])
    np.testing.assert_array_equal(np.concatenate([first.ids, rest]), data.permutation(12, seed=1, epoch=0))


@pytest.mark.parametrize("n,drop_remainder", [(20, True), (20, False), (13, False), (25, True)])
def test_process_shards_are_disjoint_and_make_the_single_process_batch(n, drop_remainder):
    source = data.ArraySource(_id_images(n), labels=np.arange(n))
    count, per_process = 3, 2
    single = list(data.batches(source, per_process * count, seed=5, drop_remainder=drop_remainder, epochs=2))
    shards = [list(data.batches(source, per_process, seed=5, drop_remainder=drop_remainder, epochs=2,
                                process_index=i, process_count=count)) for i in range(count)]
    assert all(len(s) == len(single) for s in shards)
    for g, whole in enumerate(single):
        parts = [s[g] for s in shards]
        assert all(p.position == whole.position for p in parts)
        np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), whole.ids)
        np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), whole.images)
        assert len(set(np.concatenate([p.ids for p in parts]).tolist())) == len(whole.ids)
        if drop_remainder:
            assert all(len(p.ids) == per_process for p in parts)


def test_array_source_converts_grayscale_and_rgba():
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for images in (gray, gray[..., None]):
        b = next(data.batches(data.ArraySource(images), 2, shuffle=False))
        np.testing.assert_array_equal(b.images, np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    b = next(data.batches(data.ArraySource(rgba), 2, shuffle=False))
    np.testing.assert_array_equal(b.images, rgba[..., :3])
    assert data.ArraySource(rgba)[1].image.shape == (3, 4, 3)


def test_bad_arguments_raise_clear_errors():
    images = _id_images(5)
    source = data.ArraySource(images)
    with pytest.raises(ValueError, match="larger than the source"):
        data.batches(source, 6, seed=0)
    with pytest.raises(ValueError, match="larger than the source"):
        data.batches(source, 2, seed=0, process_count=3)
    assert _ids(data.batches(source, 6, shuffle=False, drop_remainder=False, epochs=1)) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="seed"):
        data.batches(source, 2)
    with pytest.raises(ValueError, match="process_index"):
        data.batches(source, 1, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start"):
        data.batches(source, 1, seed=0, start=-1)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(source, 0, seed=0)
    with pytest.raises(ValueError, match=r"masks must have shape \[N, H, W\]"):
        data.ArraySource(images, masks=np.zeros((5, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="labels must have shape"):
        data.ArraySource(images, labels=np.zeros(4))
    with pytest.raises(ValueError, match="uint8"):
        data.ArraySource(images.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        data.ArraySource(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(IndexError):
        source[5]


# --------------------------------------------------------------------------------------------
# Image folders

COLORS = {"cat/a.png": (200, 10, 10), "cat/sub/b.jpg": (90, 90, 90), "dog/c.png": (10, 200, 10),
          "dog/d.png": (10, 10, 200)}


def _make_folder(root, corrupt=True):
    for rel, color in COLORS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".jpg"):  # grayscale JPEG, 20x12
            Image.new("L", (20, 12), color[0]).save(path, quality=95)
        elif rel == "dog/c.png":  # RGBA, 9x7
            Image.new("RGBA", (9, 7), color + (77,)).save(path)
        else:
            Image.new("RGB", (16, 16), color).save(path)
    (root / "cat" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_image_folder_labels_conversion_and_resize(tmp_path):
    source = data.ImageFolderSource(_make_folder(tmp_path, corrupt=False), image_size=8)
    assert source.classes == ("cat", "dog") and len(source) == 4
    rel = [os.path.relpath(p, tmp_path) for p in source.paths]
    assert rel == ["cat/a.png", "cat/sub/b.jpg", "dog/c.png", "dog/d.png"]
    np.testing.assert_array_equal(source.labels, [0, 0, 1, 1])
    seen = set()
    for b in data.batches(source, 3, seed=0, drop_remainder=False, epochs=2, num_threads=2):
        assert b.images.shape[1:] == (8, 8, 3) and b.images.dtype == np.uint8
        for image, i, label in zip(b.images, b.ids, b.labels):
            expected = np.array(COLORS[rel[i]], np.int64)
            assert np.abs(image.astype(np.int64) - expected).max() <= 2, rel[i]  # JPEG rounding
            assert label == source.labels[i]
            seen.add(int(i))
    assert seen == {0, 1, 2, 3}
    assert source.skipped == {}


def test_image_folder_flat_and_resize_geometry(tmp_path):
    bands = np.zeros((10, 30, 3), np.uint8)  # three vertical bands: red, green, blue
    bands[:, :10, 0] = bands[:, 10:20, 1] = bands[:, 20:, 2] = 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "small.PNG")
    crop = data.ImageFolderSource(tmp_path, image_size=(10, 10))
    assert crop.classes is None and crop.labels is None and len(crop) == 2
    centre = crop[0].image
    assert centre.shape == (10, 10, 3) and (centre[:, 2:8, 1] == 255).all() and (centre[:, 2:8, [0, 2]] == 0).all()
    stretch = data.ImageFolderSource(tmp_path, image_size=(10, 10), resize="stretch")[0].image
    assert stretch[5, 0, 0] == 255 and stretch[5, 5, 1] == 255 and stretch[5, 9, 2] == 255
    b = next(data.batches(crop, 2, seed=0))
    assert b.labels is None and b.masks is None
    with pytest.raises(ValueError, match="image_size"):  # different sizes, no resize
        next(data.batches(data.ImageFolderSource(tmp_path), 2, seed=0))


def test_unreadable_image_raises_naming_the_file_or_is_skipped_and_counted(tmp_path):
    _make_folder(tmp_path)
    strict = data.ImageFolderSource(tmp_path, image_size=8)
    bad = strict.paths.index(str(tmp_path / "dog" / "bad.jpg"))
    with pytest.raises(data.UnreadableImageError, match="bad.jpg"):
        strict[bad]
    with pytest.raises(data.UnreadableImageError, match="bad.jpg"):
        list(data.batches(strict, 5, seed=0, epochs=1))

    lenient = data.ImageFolderSource(tmp_path, image_size=8, skip_unreadable=True)
    got = list(data.batches(lenient, 2, seed=0, drop_remainder=False, epochs=3))
    assert list(lenient.skipped) == [bad] and "bad.jpg" in lenient.skipped[bad]
    assert all(bad not in b.ids for b in got) and [len(b.ids) for b in got] == [2, 2, 1] * 3
    # Deterministic and resumable in skip mode too (the filled slot does not depend on history).
    again = data.ImageFolderSource(tmp_path, image_size=8, skip_unreadable=True)
    resumed = list(data.batches(again, 2, seed=0, drop_remainder=False, epochs=3, start=got[3].position))
    assert _ids(resumed) == _ids(got[4:])


def test_image_folder_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        data.ImageFolderSource(tmp_path / "empty")
    (tmp_path / "mixed" / "cls").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "cls" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "y.png")
    with pytest.raises(ValueError, match="both class folders"):
        data.ImageFolderSource(tmp_path / "mixed")
    (tmp_path / "emptyclass" / "a").mkdir(parents=True)
    (tmp_path / "emptyclass" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "emptyclass" / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        data.ImageFolderSource(tmp_path / "emptyclass")
    with pytest.raises(ValueError, match="resize"):
        data.ImageFolderSource(tmp_path / "mixed" / "cls", resize="pad")


# --------------------------------------------------------------------------------------------
# tensorflow-datasets, without TensorFlow


def _shape_example(i):
    """Example `i` of the tiny dataset: a uniform image of colour (i, 2i, 3i), size varying."""
    h, w = 6 + i % 3, 8 + i % 2
    return {"image": Image.new("RGB", (w, h), (i, 2 * i, 3 * i)),
            # PIL images: tfds encodes numpy images with TensorFlow, PIL images without.
            "mask": Image.fromarray(np.full((h, w), i, np.uint8)),
            "label": i % 3, "idx": i}


class SaejaxTinyShapes(tfds.core.GeneratorBasedBuilder):
    """A tiny tfds dataset made in the test, prepared as ArrayRecord without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            "idx": tfds.features.Scalar(np.int64),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(range(9)), "test": self._generate_examples(range(9, 12))}

    def _generate_examples(self, indices):
        for i in indices:
            yield i, _shape_example(i)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = SaejaxTinyShapes(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder, data_dir


@pytest.mark.parametrize("by_name", [True, False])
def test_tfds_source_reads_images_labels_and_masks(tiny_tfds, by_name):
    builder, data_dir = tiny_tfds
    kwargs = dict(mask_key="mask", image_size=(6, 6), resize="stretch")
    source = (data.TfdsSource("saejax_tiny_shapes", "train", data_dir=data_dir, **kwargs) if by_name
              else data.TfdsSource(builder, "train", **kwargs))
    assert len(source) == 9 and source.classes == ("a", "b", "c")
    seen = []
    for b in data.batches(source, 4, seed=0, drop_remainder=False, epochs=1, num_threads=2):
        assert b.images.shape[1:] == (6, 6, 3) and b.masks.shape[1:] == (6, 6) and b.labels.dtype == np.int64
        for image, mask, label, record_id in zip(b.images, b.masks, b.labels, b.ids):
            i = int(source.data_source[int(record_id)]["idx"])  # tfds shuffles records on write
            np.testing.assert_array_equal(image, np.broadcast_to(np.array([i, 2 * i, 3 * i], np.uint8), (6, 6, 3)))
            assert (mask == i).all() and label == i % 3
            seen.append(i)
    assert sorted(seen) == list(range(9))


def test_tfds_source_prepares_a_local_builder_when_asked(tmp_path):
    by_name = data.TfdsSource("saejax_tiny_shapes", "test", data_dir=tmp_path / "a", download=True)
    by_builder = data.TfdsSource(SaejaxTinyShapes(data_dir=os.fspath(tmp_path / "b")), "test", download=True)
    assert len(by_name) == len(by_builder) == 3


def test_tfds_source_slicing_native_sizes_and_errors(tiny_tfds):
    _, data_dir = tiny_tfds
    test = data.TfdsSource("saejax_tiny_shapes", "test[:2]", data_dir=data_dir, label_key=None)
    assert len(test) == 2 and not test.has_labels and test.classes is None
    example = test[0]
    assert example.label is None and example.image.dtype == np.uint8 and example.image.ndim == 3
    with pytest.raises(KeyError, match="features"):
        data.TfdsSource("saejax_tiny_shapes", "train", data_dir=data_dir, label_key="species")
    with pytest.raises(FileNotFoundError, match="array_record"):
        data.TfdsSource("saejax_tiny_shapes", "train", data_dir=data_dir / "nothing-here")


def test_tfds_mock_data_grayscale_is_made_rgb():
    with tfds.testing.mock_data(num_examples=6):
        source = data.TfdsSource("mnist", "train")
        b = next(data.batches(source, 6, seed=0))
    assert b.images.shape == (6, 28, 28, 3) and len(source.classes) == 10
    np.testing.assert_array_equal(b.images[..., 0], b.images[..., 2])
    assert set(b.labels.tolist()) <= set(range(10))


def test_files_read_by_grain_threads_follow_the_same_plan_as_memory(tmp_path):
    """Files are decoded by grain's threads; every start, process split and remainder rule gives
    the batches (ids, images, positions) of the same images held in memory."""
    images = np.random.default_rng(0).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    files, memory = data.ImageFolderSource(tmp_path), data.ArraySource(images)
    for start, count, drop, epochs in ((0, 1, True, 3), (5, 2, True, 4), (13, 2, False, 3), (7, 3, False, None)):
        for index in range(count):
            args = dict(seed=4, start=start, drop_remainder=drop, epochs=epochs, process_index=index,
                        process_count=count)
            got, want = data.batches(files, 2, num_threads=3, prefetch=1, **args), data.batches(memory, 2, **args)
            for _ in range(12):
                g, w = next(got, None), next(want, None)
                if w is None:
                    assert g is None
                    break
                np.testing.assert_array_equal(g.ids, w.ids)
                if len(w.ids):  # (an empty share of a folder without image_size has no known size)
                    np.testing.assert_array_equal(g.images, w.images)
                assert g.position == w.position
