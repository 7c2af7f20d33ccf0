"""The library pieces of the paper's three experiments: semantic probing with its baselines,
slider curves through an SAE edit, segmentation metrics and the change-rate protocol."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import backbones, probe_edits, sae, segmentation, semprobe, site, viz
from saejax.analysis.probes import LinearProbe

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


def test_a_planted_latent_is_found_and_its_p_value_is_small():
    rng = np.random.default_rng(0)
    present = np.arange(40) < 20
    sums = np.where(rng.random((40, 64)) < 0.3, rng.random((40, 64)), 0.0).astype(np.float32)
    sums[:, 7] = np.where(present, 1.0, 0.0)        # fires on exactly the positives
    sums[:, 9] = np.where(present | (np.arange(40) < 24), 0.5, 0.0)  # nearly
    result = semprobe.score_concept(jnp.asarray(sums), jnp.asarray(present), jax.random.key(0), top=2,
                                    n_permutations=200, n_random=100)
    assert result["latents"].tolist() == [7, 9] and float(result["f1"][0]) == 1.0
    assert float(result["p_value"]) == pytest.approx(1 / 201)
    assert float(jnp.mean(result["random_f1"])) < 0.6
    # No signal: shuffled labels do as well, so the p-value is large.
    noise = semprobe.score_concept(jnp.asarray(sums[:, 10:]), jnp.asarray(present), jax.random.key(1), top=1,
                                   n_permutations=200, n_random=10)
    assert float(noise["p_value"]) > 0.05


def test_latent_f1_by_hand():
    fires = jnp.asarray([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    present = jnp.asarray([1, 1, 0, 0], bool)
    np.testing.assert_allclose(semprobe.latent_f1(fires, present), [1.0, 0.5])


@pytest.fixture(scope="module")
def clip():
    bb, params = backbones.load(os.path.join(FIXTURES, "clip_vision"), cache_dir=False)
    ae = sae.relu(bb.d_model, 64)
    sae_params = ae.init(jax.random.key(0)).replace(b_enc=jnp.full((64,), 0.3))
    probe = LinearProbe(0.05 * jax.random.normal(jax.random.key(1), (bb.d_model, 5)), jnp.zeros(5))
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    return bb, params, ae, sae_params, probe, jnp.asarray(bb.preprocess(images))


def test_slider_curve_vmaps_like_separate_calls_and_moves_the_probabilities(clip):
    bb, params, ae, sae_params, probe, pixels = clip
    curve = probe_edits.slider_curve(site.Site(bb, params, layer=0, ae=ae, sae_params=sae_params), probe)
    mask = jnp.asarray(probe_edits.patch_token_mask(bb, [0, 1, 5]))
    latents, maxima = jnp.asarray([3, 11]), jnp.asarray([2.0, 1.5])
    sliders = jnp.asarray([-20.0, -2.0, 0.0, 5.0])
    together = curve(pixels, mask, latents, maxima, sliders)
    assert together.shape == (4, 5)
    for i in range(4):
        np.testing.assert_allclose(together[i], curve(pixels, mask, latents, maxima, sliders[i:i + 1])[0], atol=1e-6)
    assert float(jnp.max(jnp.abs(together[0] - together[2]))) > 1e-3  # a strong edit moves them
    np.testing.assert_allclose(jnp.sum(together, axis=-1), 1.0, rtol=1e-5)


def test_an_edit_the_probe_does_not_read_changes_nothing(clip):
    """Patch tokens edited after the last block never reach the pooled CLS the probe reads."""
    bb, params, ae, sae_params, probe, pixels = clip
    curve = probe_edits.slider_curve(site.Site(bb, params, layer=bb.n_layers - 1, ae=ae, sae_params=sae_params), probe)
    mask = jnp.asarray(probe_edits.patch_token_mask(bb, np.arange(bb.layout.n_patches)))
    probs = curve(pixels, mask, jnp.asarray([3]), jnp.asarray([5.0]), jnp.asarray([-20.0, 0.0, 20.0]))
    np.testing.assert_array_equal(probs[0], probs[1])
    np.testing.assert_array_equal(probs[2], probs[1])
    with pytest.raises(ValueError, match="patch 16 is outside the 16-patch grid"):
        probe_edits.patch_token_mask(bb, [16])
    with pytest.raises(ValueError, match="latent id 64 is out of range"):
        probe_edits.check_choice(ae, [3, 64])


def test_before_after_figure_is_a_png(clip):
    png = viz.before_after_png(np.zeros((32, 32, 3), np.uint8), np.eye(4, dtype=bool), np.array([0.5, 0.3, 0.2]),
                               np.array([0.1, 0.2, 0.7]), ["a", "b", "c"], title="image 0")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_segmentation_metrics_by_hand():
    labels = np.array([[[1, 1], [2, 0]]])
    pred = np.array([[[1, 2], [2, 2]]])
    out = segmentation.segmentation_metrics(pred, labels, n_classes=3, ignore=0)
    # class 1: tp 1, union 2 -> 0.5; class 2: tp 1, union 2 -> 0.5 (the ignored pixel counts for nothing)
    assert out["miou"] == pytest.approx(0.5) and out["pixel_accuracy"] == pytest.approx(2 / 3)
    assert np.isnan(out["iou"][0])
    # uint8 masks (as PNGs give them) with many classes: no overflow in the confusion matrix
    big = segmentation.segmentation_metrics(pred.astype(np.uint8) + 148, labels.astype(np.uint8) + 148, 151, ignore=148)
    assert big["miou"] == pytest.approx(0.5) and big["pixel_accuracy"] == pytest.approx(2 / 3)


def test_upsampling_is_bilinear_with_half_pixel_centres():
    logits = jnp.asarray([[[[0.0], [4.0]]]])  # 1 x 2 grid
    up = segmentation.upsample_logits(logits, (1, 4))
    np.testing.assert_allclose(up[0, 0, :, 0], [0.0, 1.0, 3.0, 4.0])


def test_change_rates_and_best_f1_latent():
    before = np.array([1, 1, 2, 2, 0, 3])
    after = np.array([2, 1, 2, 1, 3, 3])
    labels = np.array([1, 1, 2, 2, 0, 3])
    rates = segmentation.change_rates(before, after, labels, target=1, ignore=0, background=3)
    assert rates == {"target_change_rate": 0.5, "other_change_rate": pytest.approx(1 / 3), "other_to_background": 0.0}
    codes = jnp.asarray(np.random.default_rng(0).random((50, 8)) * 0.2)
    present = np.arange(50) < 10
    codes = codes.at[:, 5].set(jnp.where(present, 2.0, 0.05))
    latent, f1, threshold = segmentation.best_f1_latent(codes, jnp.asarray(present))
    assert (latent, f1) == (5, 1.0) and threshold == 0.1


def test_streamed_patch_statistics_equal_the_in_memory_search():
    """The ADE20K search streams `features.ConceptF1` over batches; it picks what the search over
    all patches at once picks."""
    from saejax.analysis.features import ConceptF1

    rng = np.random.default_rng(1)
    codes = np.where(rng.random((90, 16)) < 0.3, rng.random((90, 16)) * 2, 0.0).astype(np.float32)
    labels = rng.integers(0, 4, 90)
    codes[:, 11] = np.where(labels == 2, 1.5, 0.2)
    stats = ConceptF1.zeros(16, 4, thresholds=(0.0, 0.1, 0.3, 1.0))
    for part in np.array_split(np.arange(90), 3):
        stats = stats.update_labels(jnp.asarray(codes[part]), jnp.asarray(labels[part]))
    np.testing.assert_allclose(stats.max, codes.max(0))
    latent, f1, threshold = jax.device_get(stats.best())
    for c in range(4):
        assert (int(latent[c]), float(f1[c]), stats.thresholds[threshold[c]]) == pytest.approx(
            segmentation.best_f1_latent(jnp.asarray(codes), jnp.asarray(labels == c)))
    assert (int(latent[2]), float(f1[2])) == (11, 1.0)



def test_a_streamed_probe_is_the_in_memory_probe_and_reads_its_pieces_lazily():
    """The ADE20K probe trains from tokens encoded on the fly: with a buffer that holds them
    all it is `train_linear_probe` bit for bit; with a smaller one it learns as well, while
    never holding more than the buffer and one piece."""
    from saejax.analysis import probes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(16, 5)), 1)
    held = []

    def chunks(epoch):
        for start in range(0, 3000, 700):
            held.append(start)  # how far the data was read when each piece was asked for
            yield x[start:start + 700], y[start:start + 700]

    settings = dict(epochs=3, batch_size=256, learning_rate=1e-2, weight_decay=1e-4)
    in_memory = probes.train_linear_probe(jax.random.key(0), jnp.asarray(x), jnp.asarray(y), 5, **settings)
    whole = probes.train_linear_probe_streamed(jax.random.key(0), chunks, 16, 5, buffer_rows=3000, **settings)
    np.testing.assert_array_equal(whole.w, in_memory.w)
    np.testing.assert_array_equal(whole.b, in_memory.b)
    assert held == [0, 700, 1400, 2100, 2800] * 3  # the pieces are read lazily, once per epoch

    small = probes.train_linear_probe_streamed(jax.random.key(0), chunks, 16, 5, buffer_rows=1024, **settings)

    def accuracy(p):
        return float(np.mean(np.asarray(probes.predict(p, jnp.asarray(x))) == y))

    assert abs(accuracy(small) - accuracy(in_memory)) < 0.03 and accuracy(small) > 0.5
    with pytest.raises(ValueError, match="buffer_rows=100 must hold at least one batch"):
        probes.train_linear_probe_streamed(jax.random.key(0), chunks, 16, 5, buffer_rows=100, **settings)
