import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import features, probes


def test_top_exemplars_keep_the_k_best_images_with_their_maps():
    rng = np.random.default_rng(0)
    acts = rng.exponential(size=(30, 6, 4)).astype(np.float32)  # images, patches, latents
    acts[:, :, 3] = 0.0  # a latent that never fires
    ex = features.TopExemplars.empty(d_sae=4, k=5, n_patches=6)
    for start in range(0, 30, 7):
        ex = jax.jit(features.TopExemplars.update)(ex, acts[start:start + 7], jnp.arange(start, min(start + 7, 30)) + 100)
    for latent in range(3):
        per_image = acts[:, :, latent].max(axis=1)
        best = np.argsort(-per_image)[:5]
        np.testing.assert_array_equal(ex.image_ids[latent], best + 100)
        np.testing.assert_allclose(ex.values[latent], per_image[best], rtol=1e-6)
        np.testing.assert_allclose(ex.maps[latent], acts[best, :, latent], rtol=1e-6)
    np.testing.assert_allclose(ex.max_activation(), [acts[..., j].max() for j in range(3)] + [0.0], rtol=1e-6)


def test_concept_f1_matches_a_direct_count():
    rng = np.random.default_rng(1)
    acts = rng.exponential(size=(200, 5)) * (rng.random((200, 5)) < 0.3)
    present = rng.random((200, 3)) < 0.4
    present[:, 2] = acts[:, 4] > 0  # latent 4 detects concept 2 perfectly
    counts = features.ConceptF1.zeros(5, 3).update(acts[:100], present[:100]).update(acts[100:], present[100:])
    f1 = np.asarray(counts.f1())[0]  # threshold 0: "the latent fired"
    for j in range(5):
        for c in range(3):
            fired = acts[:, j] > 0
            tp = np.sum(fired & present[:, c])
            expected = 2 * tp / (fired.sum() + present[:, c].sum())
            np.testing.assert_allclose(f1[j, c], expected, rtol=1e-6)
    latent, best_f1, threshold = counts.best()
    assert int(latent[2]) == 4 and float(best_f1[2]) == 1.0 and counts.thresholds[int(threshold[2])] == 0.0
    np.testing.assert_allclose(counts.precision()[0, 4, 2], 1.0)
    np.testing.assert_allclose(counts.max, acts.max(0), rtol=1e-6)
    assert counts.true_positive.dtype == np.int32  # exact counts past float32's 2**24


def test_concept_f1_counts_at_thresholds_merge_and_take_labels():
    rng = np.random.default_rng(3)
    acts = np.where(rng.random((120, 6)) < 0.4, rng.random((120, 6)) * 2, 0.0).astype(np.float32)
    labels = rng.integers(0, 3, 120)
    acts[:, 5] = np.where(labels == 1, 1.5, 0.2)  # fires everywhere, but above 0.3 only on class 1
    thresholds = (0.0, 0.3, 1.0)
    halves = [jax.jit(features.ConceptF1.update_labels)(features.ConceptF1.zeros(6, 3, thresholds), acts[p], labels[p])
              for p in (slice(0, 50), slice(50, None))]
    counts = halves[0].merge(halves[1])
    f1 = np.asarray(counts.f1())
    for t, threshold in enumerate(thresholds):
        for c in range(3):
            fired, present = acts > threshold, (labels == c)[:, None]
            expected = 2 * np.sum(fired & present, 0) / np.maximum(fired.sum(0) + present.sum(), 1)
            np.testing.assert_allclose(f1[t, :, c], expected, rtol=1e-6)
    latent, best_f1, threshold = jax.device_get(counts.best())
    assert (int(latent[1]), float(best_f1[1]), counts.thresholds[threshold[1]]) == (5, 1.0, 0.3)  # the lowest that works
    np.testing.assert_array_equal(counts.actual, np.bincount(labels, minlength=3))


def test_greedy_latent_union_recovers_a_concept_split_over_latents():
    rng = np.random.default_rng(2)
    acts = rng.exponential(size=(400, 6)) * (rng.random((400, 6)) < 0.2)
    part = rng.integers(0, 3, 400)  # the concept is "latent 1 or latent 4 fired"; latent 4 covers more of it
    present = rng.random(400) < 0.5
    acts[:, [1, 4]] = 0.0
    acts[present & (part == 0), 1] = 1.0
    acts[present & (part > 0), 4] = 2.0
    latents, f1 = features.greedy_latent_union(jnp.asarray(acts), jnp.asarray(present), 3)
    assert latents[:2].tolist() == [4, 1]
    single = np.asarray(features.ConceptF1.zeros(6, 1).update(acts, present[:, None]).f1())[0, :, 0]
    np.testing.assert_allclose(f1[0], single.max(), rtol=1e-6)
    np.testing.assert_allclose(f1[1], 1.0)
    # A third latent only adds false positives: its F1 is the exact count for the union of three.
    union = (acts[:, [4, 1, int(latents[2])]] > 0).any(1)
    np.testing.assert_allclose(f1[2], 2 * np.sum(union & present) / (union.sum() + present.sum()), rtol=1e-6)
    assert len(set(latents.tolist())) == 3
    with pytest.raises(ValueError, match="max_latents must be in 1..6"):
        features.greedy_latent_union(jnp.asarray(acts), jnp.asarray(present), 7)


def test_propose_latents_skips_dense_ones():
    acts = jnp.array([[5.0, 1.0, 0.0, 9.0], [4.0, 2.0, 4.0, 9.0], [0.0, 0.0, 8.0, 9.0]])
    selected = jnp.array([True, True, False])
    frequency = jnp.array([0.001, 0.002, 0.003, 0.5])  # latent 3 is dense
    latents, values = features.propose_latents(acts, selected, frequency, n=3)
    np.testing.assert_array_equal(latents, [0, 2, 1])
    np.testing.assert_allclose(values, [9.0, 4.0, 3.0])


def test_linear_probe_learns_a_separable_task():
    key = jax.random.key(0)
    centers = jax.random.normal(key, (4, 8)) * 3
    labels = jnp.arange(800) % 4
    x = centers[labels] + jax.random.normal(jax.random.key(1), (800, 8))
    probe = probes.train_linear_probe(jax.random.key(2), x, labels, 4, epochs=30, batch_size=128, learning_rate=3e-2)
    assert float(jnp.mean(probes.predict(probe, x) == labels)) > 0.97
