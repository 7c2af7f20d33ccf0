"""Concept metrics per latent (1-D logistic probes, average precision, purity@k) and the k-means
and PCA baselines, against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import concept_metrics as cm


def test_probe_1d_reaches_the_logistic_optimum_and_finds_the_informative_latent():
    rng = np.random.default_rng(0)
    n = 400
    present = rng.random(n) < 0.3
    values = np.stack([rng.exponential(size=n),                                   # noise
                       np.where(present, 2.0, 0.0) + rng.normal(0, 0.8, n),        # informative, noisy
                       rng.normal(size=n)], axis=1).astype(np.float32)
    w, b, loss = cm.probe_1d(jnp.asarray(values), jnp.asarray(present))
    assert int(jnp.argmin(loss)) == 1 and float(w[1]) > 0
    # At the optimum the gradient of the (penalised) mean cross-entropy vanishes; the penalty
    # is on the weight of the values scaled to a max of 1.
    p = 1 / (1 + np.exp(-(values[:, 1] * float(w[1]) + float(b[1]))))
    scale = np.abs(values[:, 1]).max()
    assert abs(np.mean((p - present) * values[:, 1]) + 2e-4 * scale**2 * float(w[1])) < 1e-5
    assert abs(np.mean(p - present)) < 1e-5
    # An uninformative latent does no better than the prior.
    prior = present.mean()
    assert float(loss[2]) == pytest.approx(-(prior * np.log(prior) + (1 - prior) * np.log(1 - prior)), abs=5e-3)


def test_average_precision_by_hand():
    scores = jnp.asarray([0.9, 0.8, 0.7, 0.6, 0.5])
    present = jnp.asarray([1, 0, 1, 0, 1], bool)
    assert float(cm.average_precision(scores, present)) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(float(cm.average_precision(scores, jnp.zeros(5, bool))))


def test_purity_at_k_by_hand():
    values = jnp.asarray([[5.0, 0.1], [4.0, 0.2], [3.0, 0.3], [0.0, 9.0]])
    labels = jnp.asarray([2, 2, 1, 0])
    np.testing.assert_allclose(cm.purity_at_k(values, labels, k=2, n_labels=3), [1.0, 0.5])
    np.testing.assert_allclose(cm.purity_at_k(values, labels, k=3, n_labels=3), [2 / 3, 1 / 3])


def test_kmeans_recovers_planted_clusters_and_pca_the_top_direction():
    rng = np.random.default_rng(1)
    centres = np.asarray([[5, 0], [-5, 0], [0, 5]], np.float32)
    cluster = rng.integers(0, 3, 300)
    x = jnp.asarray(centres[cluster] + rng.normal(0, 0.3, (300, 2)).astype(np.float32))
    codes = cm.kmeans_codes(x, n_centroids=3, key=jax.random.key(0))
    assert codes.shape == (300, 3) and set(np.asarray(codes.sum(1)).tolist()) == {1.0}
    assigned = np.asarray(codes.argmax(1))
    for c in range(3):  # each planted cluster maps onto one centroid
        assert len(set(assigned[cluster == c].tolist())) == 1
    line = jnp.asarray(np.outer(rng.normal(size=200), [3.0, 4.0]).astype(np.float32) / 5)
    pca, mean, components = cm.pca_codes(line, n_components=1)
    assert pca.shape == (200, 2)
    np.testing.assert_allclose(np.abs(np.asarray(components[0])), [0.6, 0.8], atol=1e-5)
    np.testing.assert_allclose(pca[:, 0] - pca[:, 1], (line - mean) @ components[0], atol=1e-5)


def test_a_separable_latent_stays_finite_and_wins():
    """A sparse latent that fires exactly on the concept (with large values) is the best one,
    and its fit does not diverge; a latent that never fires scores the prior."""
    rng = np.random.default_rng(2)
    present = rng.random(20_000) < 0.05
    values = np.zeros((20_000, 3), np.float32)
    values[:, 0] = np.where(present, 10 + rng.exponential(size=20_000), 0)
    values[:, 1] = np.where(rng.random(20_000) < 0.3, rng.exponential(size=20_000) * 13, 0)
    w, b, loss = cm.probe_1d(jnp.asarray(values), jnp.asarray(present))
    assert np.all(np.isfinite(np.asarray(w))) and np.all(np.isfinite(np.asarray(loss)))
    assert int(jnp.argmin(loss)) == 0 and float(loss[0]) < 0.01
    scores = jnp.asarray(values[:, 0]) * w[0] + b[0]
    assert float(cm.average_precision(scores, jnp.asarray(present))) == 1.0


def test_concept_scores_and_the_follow_ups_summary_by_hand():
    """Two concepts, three latents: latent 0 detects concept 0 (noisily), latent 2 is concept 1
    reversed (it fires where the concept is absent), latent 1 is noise."""
    rng = np.random.default_rng(3)
    n = 600
    present = rng.random((2 * n, 2)) < np.asarray([0.2, 0.4])
    codes = np.stack([np.where(present[:, 0], 3.0, 0.0) + rng.exponential(0.7, 2 * n),
                      rng.exponential(size=2 * n),
                      np.where(present[:, 1], 0.0, 2.0) + rng.exponential(0.3, 2 * n)], 1).astype(np.float32)
    train, val = slice(0, n), slice(n, 2 * n)
    scores = cm.concept_scores(jnp.asarray(codes[train]), jnp.asarray(codes[val]), present[train], present[val],
                               purity_k=16)
    assert [s["latent"] for s in scores] == [0, 2]
    for c, s in enumerate(scores):
        w, b, _ = cm.probe_1d(jnp.asarray(codes[train]), jnp.asarray(present[train, c]))
        j = s["latent"]
        logits = codes[val, j] * float(w[j]) + float(b[j])
        y = present[val, c].astype(np.float64)
        assert s["probe_ce"] == pytest.approx(np.mean(np.logaddexp(0, logits) - y * logits), rel=1e-4)
        p = present[train, c].mean()
        assert s["baseline_ce"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), rel=1e-4)
        assert s["purity"] == pytest.approx(np.mean(y[np.argsort(-logits, kind="stable")[:16]]))
        assert s["ap"] == pytest.approx(float(cm.average_precision(jnp.asarray(logits), jnp.asarray(y > 0))), rel=1e-5)
    assert float(w[2]) < 0  # concept 1's probe reads its latent reversed, and AP follows the probe
    summary = cm.summarize_scores(scores, tau=0.3)
    assert summary["probe_r"] == pytest.approx(1 - (scores[0]["probe_ce"] + scores[1]["probe_ce"]) /
                                               (scores[0]["baseline_ce"] + scores[1]["baseline_ce"]))
    assert 0.5 < summary["probe_r"] < 1 and summary["map"] > 0.9 and summary["coverage"] == 1.0
    assert cm.summarize_scores(scores, tau=max(s["ap"] for s in scores))["coverage"] == 0.5


def test_correlation_candidates_pick_what_the_full_search_picks_on_the_shapes_world():
    """`concept_scores` probes only the 32 latents most correlated with each concept; on the
    shapes world's patches (pixels, and three dictionaries of them: a ReLU dictionary,
    k-means, PCA) that picks, for all 15 concepts, the latent the probe over every latent picks."""
    from saejax.datasets import shapes

    worlds = [shapes.source(split, 120, seed=3, image_size=40).world for split in ("train", "validation")]
    x = [jnp.asarray(w.images.reshape(len(w.images), 5, 8, 5, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 192)
                     / 255.0) for w in worlds]  # each 8 px patch's pixels, row-major like the patch tokens
    present = [shapes.factor_patch_concepts(w, 8).reshape(-1, len(shapes.FACTOR_CONCEPTS)) for w in worlds]
    w_enc = jax.random.normal(jax.random.key(0), (192, 256)) / 14
    relu = [jax.nn.relu((xi - x[0].mean(0)) @ w_enc) for xi in x]
    dictionaries = cm.baseline_dictionaries(256, x[0], x[1], *relu, key=jax.random.key(1))
    for name, (train_codes, val_codes) in dictionaries.items():
        fast = cm.concept_scores(train_codes, val_codes, present[0], present[1], candidates=32)
        full = cm.concept_scores(train_codes, val_codes, present[0], present[1], candidates=None)
        assert [s["latent"] for s in fast] == [s["latent"] for s in full], name
        for a, b in zip(fast, full):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
