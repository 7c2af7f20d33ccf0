"""saejax.stream: the activation stream is the harvest, mixed; resumable; several layers at once."""

import os

import jax
import numpy as np
import pytest

from saejax import activations, backbones, data, stream
from saejax.core.normalization import Normalization

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


@pytest.fixture(scope="module")
def clip():
    bb, params = backbones.load(FIXTURES + "/clip_vision", cache_dir=False)  # 32 px, 8 px patches: 16 patches
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    return bb, params, data.ArraySource(images)


def make(clip, **kwargs):
    bb, params, source = clip
    args = dict(layers=(1, 2), batch_size=32, image_batch_size=4, buffer_tokens=128, key=jax.random.key(0), seed=3)
    return stream.ActivationStream(bb, params, source, **(args | kwargs))


def rows_of(batches):
    """Batches {layer: [B, D]} -> [N, 2D] rows (layers side by side), sorted."""
    rows = np.concatenate([np.concatenate([np.asarray(b[1]), np.asarray(b[2])], axis=1) for b in batches])
    return rows[np.lexsort(rows.T[::-1])]


def test_each_fill_is_its_images_harvest_every_row_once_layers_together(clip):
    bb, params, source = clip
    s = make(clip)
    assert (s.passes_per_fill, s.batches_per_fill) == (2, 4)  # 2 passes of 4 images x 16 patches; 4 batches of 32
    batches = [next(s) for _ in range(12)]  # three fills
    s.close()
    harvest = activations.make_harvest(bb, (1, 2))
    order = data.batches(source, 4, seed=3)
    for fill in range(3):
        passes = [next(order) for _ in range(2)]
        want = [harvest(params, bb.preprocess(b.images), b.ids).acts for b in passes]
        got = rows_of(batches[fill * 4:(fill + 1) * 4])
        np.testing.assert_allclose(got, rows_of(want), rtol=1e-6, atol=1e-6)
        if fill == 0:  # mixed, not in harvest order
            assert not np.allclose(np.asarray(batches[0][1]), np.asarray(want[0][1][:32]))


def test_resuming_from_a_position_continues_with_the_same_batches(clip):
    s = make(clip)
    straight = [next(s) for _ in range(10)]
    s.close()
    s = make(clip)
    for _ in range(5):
        next(s)
    position = s.position()
    assert position == {"fill_index": 1, "fill_start": 8, "taken": 1, "groups": 1}
    s.close()
    resumed = make(clip, position=position)
    for want in straight[5:]:
        got = next(resumed)
        for layer in (1, 2):
            np.testing.assert_array_equal(got[layer], want[layer])
    resumed.close()
    with pytest.raises(ValueError, match="made with groups=1, this stream has groups=2"):
        make(clip, position=position, groups=2)


def test_normalization_is_applied_per_layer(clip):
    norms = {1: Normalization(np.full(32, 2.0, np.float32), np.float32(4.0)),
             2: Normalization(np.zeros(32, np.float32), np.float32(0.5))}
    raw, normed = make(clip), make(clip, normalization=norms)
    a, b = next(raw), next(normed)
    raw.close(), normed.close()
    np.testing.assert_allclose(b[1], (np.asarray(a[1]) - 2.0) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(b[2], np.asarray(a[2]) / 0.5, rtol=1e-6)


def test_sizes_that_do_not_split_are_named(clip):
    with pytest.raises(ValueError, match="batch_size = 30 does not split over groups=4"):
        make(clip, batch_size=30, groups=4)
    with pytest.raises(ValueError, match="buffer_tokens=32 holds fewer rows than one batch"):
        make(clip, buffer_tokens=32, batch_size=128)
