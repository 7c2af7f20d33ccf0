"""The shapes world (saejax.datasets.shapes) and its ViT (saejax.studies.shapes_vit, saejax.backbones.create)."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax.traverse_util import unflatten_dict

import saejax
from saejax import backbones, data
from saejax.backbones import convert
from saejax.studies import shapes_vit as vit_training
from saejax.backbones.create import create_vit_classifier
from saejax.datasets import shapes

N_SHAPES, N_COLOURS = len(shapes.SHAPES), len(shapes.COLOURS)
BG = shapes.CONCEPTS.index("background")


@pytest.fixture(scope="module")
def world():
    return shapes.generate(400, seed=7)  # 40 x 40 px


def _fields(w):
    return {k: getattr(w, k) for k in ("images", "labels", "pixel_labels", "object_ids", "n_objects", "shapes",
                                       "colours", "rgb", "sizes", "box_sizes", "boxes", "areas", "textures",
                                       "concepts")}


# --------------------------------------------------------------------------------------------
# Generation


def test_deterministic_from_the_seed_and_prefix_stable(world):
    again = shapes.generate(400, seed=7)
    for name, value in _fields(world).items():
        np.testing.assert_array_equal(value, getattr(again, name), err_msg=name)
    # Images come in seeded chunks: a shorter run is a prefix, a longer one extends it.
    longer = shapes.generate(shapes.CHUNK + 5, seed=7)
    for name, value in _fields(world).items():
        np.testing.assert_array_equal(value, getattr(longer, name)[:400], err_msg=name)
    assert not np.array_equal(world.images, shapes.generate(400, seed=8).images)
    train, val = shapes.source("train", 50, seed=7), shapes.source("validation", 50, seed=7)
    assert not np.array_equal(train.images, val.images)
    np.testing.assert_array_equal(train.images, shapes.source("train", 50, seed=7).images)


def test_shapes_dtypes_and_ranges(world):
    n, s = 400, 40
    assert world.images.shape == (n, s, s, 3) and world.images.dtype == np.uint8
    assert world.pixel_labels.shape == (n, s, s) and world.pixel_labels.dtype == np.uint8
    assert world.labels.dtype == np.int64 and set(np.unique(world.labels)) <= set(range(len(shapes.CLASSES)))
    assert world.concepts.shape == (n, len(shapes.CONCEPTS)) and world.concepts.dtype == bool
    assert set(np.unique(world.n_objects)) == {1, 2, 3}
    assert set(np.unique(world.textures)) == set(range(len(shapes.TEXTURES)))
    present = np.arange(shapes.MAX_OBJECTS)[None] < world.n_objects[:, None]
    assert (world.shapes >= 0).tolist() == present.tolist() and (world.colours >= 0).tolist() == present.tolist()
    # The task: shape and colour of the target in slot 0, the largest object by far (in area).
    np.testing.assert_array_equal(world.labels, world.shapes[:, 0] * N_COLOURS + world.colours[:, 0])
    assert np.all(world.sizes[:, 0][:, None] > np.where(present[:, 1:], world.sizes[:, 1:], 0))
    assert np.all(world.areas[:, :1] >= 1.5 * np.where(present[:, 1:], world.areas[:, 1:], 0))
    assert np.all((world.areas > 0) == present)
    assert shapes.CLASSES[5] == "green square" and shapes.PIXEL_CLASSES[0] == "background"


def test_other_image_sizes_and_options():
    w = shapes.generate(64, seed=0, image_size=32, textures=("stripes",), max_objects=2)
    assert w.images.shape == (64, 32, 32, 3) and np.all(w.sizes[:, 0] >= 11)
    assert np.all(w.textures == shapes.TEXTURES.index("stripes")) and w.n_objects.max() <= 2
    with pytest.raises(ValueError, match="textures"):
        shapes.generate(4, seed=0, textures=("plaid",))
    with pytest.raises(ValueError, match="target_sizes"):
        shapes.generate(4, seed=0, target_sizes=(5, 6), distractor_sizes=(6, 9))
    with pytest.raises(ValueError, match="split"):
        shapes.source("val", 4)


# --------------------------------------------------------------------------------------------
# Ground truth agrees with the pixels


def test_object_pixels_have_the_objects_colour_and_background_is_grey(world):
    images = world.images.astype(np.int32)
    for k in range(shapes.MAX_OBJECTS):
        for n in range(len(world)):
            inside = world.object_ids[n] == k + 1
            if k >= world.n_objects[n]:
                assert not inside.any()
                continue
            assert inside.any(), (n, k)
            np.testing.assert_array_equal(images[n][inside], np.broadcast_to(world.rgb[n, k], (inside.sum(), 3)))
            assert np.all(world.pixel_labels[n][inside] == 1 + world.shapes[n, k] * N_COLOURS + world.colours[n, k])
            # The object's pixels lie in its bounding box; the box is in the image.
            top, left = world.boxes[n, k]
            size = world.box_sizes[n, k]
            rows, cols = np.nonzero(inside)
            assert top <= rows.min() and rows.max() < top + size and left <= cols.min() and cols.max() < left + size
            assert top >= 0 and left >= 0 and top + size <= 40 and left + size <= 40
            assert world.areas[n, k] == inside.sum()
            # Each object's colour is near its named colour, far from grey.
            base = shapes.COLOUR_RGB[world.colours[n, k]]
            assert np.all(np.abs(world.rgb[n, k].astype(int) - base) <= shapes.COLOUR_JITTER)
    background = world.pixel_labels == 0
    np.testing.assert_array_equal(background, world.object_ids == 0)
    spread = images.max(-1) - images.min(-1)  # 0 for pure grey
    assert spread[background].max() <= 16
    assert spread[~background].min() >= 80  # saturated: far from any background pixel
    assert images[background].min() >= 45 - 6 and images[background].max() <= 205 + 6


def test_masks_have_the_right_shapes(world):
    """Each shape's pixel count relative to its box matches its geometry; its area is about size**2."""
    for k in range(shapes.MAX_OBJECTS):
        for n in range(len(world)):
            if k < world.n_objects[n]:
                name = shapes.SHAPES[world.shapes[n, k]]
                area = np.count_nonzero(world.object_ids[n] == k + 1)
                assert abs(area / world.box_sizes[n, k] ** 2 - shapes.FILL[name]) < 0.1, (n, k, name)
                assert abs(area / world.sizes[n, k] ** 2 - 1) < 0.25, (n, k, name)
                assert world.box_sizes[n, k] == round(world.sizes[n, k] / np.sqrt(shapes.FILL[name]))
    # Spot checks of the geometry: a square fills its box; a triangle's apex row is its narrowest.
    for n in range(len(world)):
        if shapes.SHAPES[world.shapes[n, 0]] == "triangle":
            rows = (world.object_ids[n] == 1).sum(axis=1)
            rows = rows[rows > 0]
            assert rows[0] <= rows[-1] and np.all(np.diff(rows) >= 0)


def test_concept_masks_agree_with_image_level_labels(world):
    masks = shapes.concept_masks(world.pixel_labels)
    assert masks.shape == (400, 40, 40, len(shapes.CONCEPTS)) and masks.dtype == bool
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), world.concepts)
    np.testing.assert_array_equal(world.concept_masks([3, 5]), masks[[3, 5]])
    assert world.concepts[:, BG].all()
    # Every pixel is exactly one shape and one colour, or background.
    np.testing.assert_array_equal(masks[..., :N_SHAPES].sum(-1), ~masks[..., BG])
    np.testing.assert_array_equal(masks[..., N_SHAPES:N_SHAPES + N_COLOURS].sum(-1), ~masks[..., BG])
    for n in range(len(world)):  # the image-level labels list exactly the objects' shapes and colours
        k = world.n_objects[n]
        expected = np.zeros(len(shapes.CONCEPTS), bool)
        expected[world.shapes[n, :k]] = True
        expected[N_SHAPES + world.colours[n, :k]] = True
        expected[BG] = True
        np.testing.assert_array_equal(world.concepts[n], expected)


def test_patch_concepts_and_patch_labels_match_a_direct_count(world):
    labels = world.pixel_labels[:20]
    masks = shapes.concept_masks(labels)
    for p in (5, 8):
        got = shapes.patch_concepts(labels, p)
        majority = shapes.patch_labels(labels, p)
        g = 40 // p
        assert got.shape == (20, g, g, len(shapes.CONCEPTS)) and majority.shape == (20, g, g)
        for n in range(20):
            for i in range(g):
                for j in range(g):
                    block = masks[n, i * p:(i + 1) * p, j * p:(j + 1) * p]
                    np.testing.assert_array_equal(got[n, i, j], block.mean(axis=(0, 1)) >= 0.5)
                    counts = np.bincount(labels[n, i * p:(i + 1) * p, j * p:(j + 1) * p].ravel(),
                                         minlength=len(shapes.PIXEL_CLASSES))
                    assert majority[n, i, j] == np.argmax(counts)
    # A patch concept implies the concept is in the image; any-pixel rule via a tiny threshold.
    assert not np.any(shapes.patch_concepts(labels, 8) & ~world.concepts[:20, None, None, :])
    np.testing.assert_array_equal(shapes.patch_concepts(labels, 8, min_fraction=1 / 64).any(axis=(1, 2)),
                                  world.concepts[:20])
    with pytest.raises(ValueError, match="divide"):
        shapes.patch_concepts(labels, 6)


def test_factor_labels_follow_the_objects_and_backgrounds(world):
    f = shapes.factor_labels(world)
    masks = shapes.concept_masks(world.pixel_labels)
    for c, name in enumerate(shapes.CONCEPTS):  # colour and shape are the concepts' masks
        family, k = shapes.concept_factor(name)
        np.testing.assert_array_equal(f[family] == k, masks[..., c])
    obj = world.object_ids > 0
    for family in ("colour", "shape", "size"):
        np.testing.assert_array_equal(f[family] > 0, obj)
    # Size: the object in slot 0 (object id 1) is the largest and "large", every other one "small".
    np.testing.assert_array_equal(f["size"] == 2, world.object_ids == 1)
    np.testing.assert_array_equal(f["size"] == 1, world.object_ids > 1)
    many = world.n_objects > 1
    assert np.all(world.sizes[many, 0] > world.sizes[many, 1:].max(axis=1))
    # Texture: every background pixel carries its image's texture, object pixels class 0.
    np.testing.assert_array_equal(f["texture"] == 0, obj)
    bg_texture = np.where(~obj, f["texture"].astype(np.int64) - 1, -1).max(axis=(1, 2))
    np.testing.assert_array_equal(bg_texture, world.textures)
    assert set(np.unique(world.textures)) == set(range(len(shapes.TEXTURES)))


def test_factor_patch_concepts_and_labels_by_direct_count(world):
    idx = np.arange(10, 30)
    got = shapes.factor_patch_concepts(world, 8, idx)
    majority = shapes.factor_patch_labels(world, 8, idx)
    assert got.shape == (20, 5, 5, len(shapes.FACTOR_CONCEPTS)) == (20, 5, 5, 15)
    # The colour, shape and background columns are the old patch concepts.
    np.testing.assert_array_equal(got[..., :len(shapes.CONCEPTS)], shapes.patch_concepts(world.pixel_labels[idx], 8))
    f = shapes.factor_labels(world, idx)
    for c, name in enumerate(shapes.FACTOR_CONCEPTS):
        family, k = shapes.concept_factor(name)
        block = (f[family] == k).reshape(20, 5, 8, 5, 8).mean(axis=(2, 4))
        np.testing.assert_array_equal(got[..., c], block >= 0.5)
    for family, labels in f.items():
        counts = np.stack([(labels == k).reshape(20, 5, 8, 5, 8).sum(axis=(2, 4))
                           for k in range(len(shapes.FACTORS[family]))], -1)
        np.testing.assert_array_equal(majority[family], np.argmax(counts, -1))
    with pytest.raises(ValueError, match="unknown concept 'purple'"):
        shapes.concept_factor("purple")


def test_source_goes_through_the_data_api():
    source = shapes.source("train", 100, seed=3)
    assert isinstance(source, data.ArraySource) and source.classes == shapes.CLASSES
    assert source.has_labels and source.has_masks and len(source) == 100
    batch = next(data.batches(source, 16, seed=0))
    np.testing.assert_array_equal(batch.images, source.world.images[batch.ids])
    np.testing.assert_array_equal(batch.labels, source.world.labels[batch.ids])
    np.testing.assert_array_equal(batch.masks, source.world.pixel_labels[batch.ids])
    assert shapes.patch_concepts(batch.masks, 8).shape == (16, 5, 5, len(shapes.CONCEPTS))


# --------------------------------------------------------------------------------------------
# The ViT


TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=40,
                patch_size=8)


def test_heads_loss_and_argmax_by_hand():
    logits = np.array([[2.0, 0.0, 1.0, -1.0, 3.0], [0.0, 1.0, 0.5, 2.0, 0.0]], np.float32)
    heads = (3, 2)  # classes 0..2 from logits[:3], 0..1 from logits[3:]
    targets = np.array([[0, 1], [2, 1]])

    def ce(z, t):
        return np.log(np.sum(np.exp(z))) - z[t]

    expected = np.mean([ce(logits[i, :3], targets[i, 0]) for i in range(2)]) + \
        np.mean([ce(logits[i, 3:], targets[i, 1]) for i in range(2)])
    loss, accuracy = vit_training.heads_loss(logits, targets, heads)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_array_equal(vit_training.heads_argmax(logits, heads), [[0, 1], [1, 0]])
    assert float(accuracy) == 0.5  # row 0 right on both heads, row 1 wrong on both
    one, _ = vit_training.heads_loss(logits, np.array([4, 1]), None)  # one softmax over all five
    assert float(one) == pytest.approx(np.mean([ce(logits[0], 4), ce(logits[1], 1)]), rel=1e-5)


@pytest.mark.parametrize("targets", ["factorised", "conjunction"])
def test_short_training_run_gives_a_checkpoint_that_load_reads(tmp_path, targets):
    kwargs = dict(seed=0, n_train=256, n_val=100, vit=TINY_VIT, steps=3, batch_size=32, warmup_steps=1, targets=targets)
    result = vit_training.train_shapes_vit(tmp_path, **kwargs)
    folder = "vit" if targets == "factorised" else "vit_conjunction"
    assert not result.reused and result.path == os.path.join(tmp_path, folder)
    names = set(os.listdir(result.path))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training.json"} <= names
    assert not any(n.startswith(folder + ".tmp") for n in os.listdir(tmp_path))
    with open(os.path.join(result.path, "config.json")) as f:
        cfg = json.load(f)
    n_labels, heads = (8, (4, 4)) if targets == "factorised" else (16, None)
    assert cfg["model_type"] == "vit"
    assert cfg["id2label"]["5"] == ("shape=square" if targets == "factorised" else "green square")

    bb, params = saejax.backbones.load(result.path, cache_dir=False)
    assert (bb.family, bb.n_classes, bb.image_size, bb.grid, bb.n_layers) == ("vit", n_labels, 40, (5, 5), 2)

    # The training module on the saved params and the backbone give the same logits...
    val = shapes.source("validation", 100, seed=0)
    state = safetensors.numpy.load_file(os.path.join(result.path, "model.safetensors"))  # PyTorch's names
    assert "classifier.weight" in state and "vit.encoder.layer.1.attention.attention.query.weight" in state
    saved = unflatten_dict(convert.to_own(state, backbones.get_family("vit").names(bb.config))[0])
    apply_fn, _ = create_vit_classifier(dict(TINY_VIT, num_labels=n_labels), jax.random.key(1))
    pixels = vit_training.vit_processing(40)(val.images)  # what training fed the model
    np.testing.assert_array_equal(pixels, bb.preprocess(val.images))
    train_logits = np.asarray(jax.jit(apply_fn)(saved, pixels))
    out = jax.jit(lambda p, x: bb.forward(p, x))(params, pixels)
    np.testing.assert_allclose(np.asarray(out.logits), train_logits, atol=1e-5, rtol=1e-5)
    # ... and the accuracy recorded at training time is the backbone's (all heads right).
    predicted = np.asarray(vit_training.heads_argmax(out.logits, heads))
    expected = val.labels if heads is None else np.stack([val.labels % 4, val.labels // 4], -1)
    accuracy = float(np.mean(np.all((predicted == expected).reshape(100, -1), axis=1)))
    assert accuracy == pytest.approx(result.val_accuracy)

    # The same call reuses the checkpoint; other settings retrain.
    again = vit_training.train_shapes_vit(tmp_path, **kwargs)
    assert again.reused and again.val_accuracy == result.val_accuracy
    mtime = os.path.getmtime(os.path.join(result.path, "model.safetensors"))
    other = vit_training.train_shapes_vit(tmp_path, **dict(kwargs, steps=2))
    assert not other.reused and other.info["settings"]["steps"] == 2
    assert os.path.getmtime(os.path.join(result.path, "model.safetensors")) >= mtime


def test_factorised_patch_targets_are_the_factor_labels_of_the_batch():
    train = shapes.source("train", 64, seed=3)
    batch = next(data.batches(train, 16, seed=0))
    heads = vit_training.task_heads("factorised")
    got = heads["patch_targets"](batch, world=train.world, patch_size=8)
    assert got.shape == (16, 5, 5, 4) and heads["patch_heads"] == (5, 5, 3, 5)
    labels = shapes.factor_patch_labels(train.world, 8, batch.ids)
    for g, family in enumerate(shapes.FACTORS):
        np.testing.assert_array_equal(got[..., g], labels[family])
    np.testing.assert_array_equal(heads["image_targets"](batch.labels),
                                  np.stack([train.world.colours[batch.ids, 0], train.world.shapes[batch.ids, 0]], -1))
    with pytest.raises(ValueError, match="unknown targets 'both'"):
        vit_training.task_heads("both")


def test_backbones_see_the_world_at_its_grid(tmp_path):
    from saejax.backbones import create_random
    from saejax.datasets import shapes_backbones

    dinov2 = create_random("dinov2", str(tmp_path / "dinov2"), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, mlp_ratio=2, image_size=70, patch_size=14)
    vit = create_random("vit", str(tmp_path / "vit"), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, image_size=48, patch_size=16)
    assert shapes_backbones.image_sizes(dinov2, grid=8) == (112, 112)
    assert shapes_backbones.image_sizes(vit, grid=8) == (128, 128)  # interpolated to 8 x 8 patches of 16 px
    assert shapes_backbones.image_sizes(vit, grid=3) == (None, 48)  # its own grid
    bb, _ = saejax.backbones.load(dinov2, image_size=112, cache_dir=False)
    world = shapes.generate(2, seed=0, image_size=112)
    assert bb.grid == (8, 8) and bb.preprocess(world.images).shape == (2, 112, 112, 3)
    assert shapes.factor_patch_concepts(world, bb.patch_size).shape[1:3] == bb.grid
    assert [shapes_backbones.default_layer(n) for n in (1, 4, 12, 24)] == [0, 2, 7, 15]
