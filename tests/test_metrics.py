import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import metrics


def test_batch_metrics_on_known_values():
    x = jnp.array([[1.0, 0.0], [3.0, 2.0]])
    x_hat = jnp.array([[1.0, 1.0], [3.0, 2.0]])
    assert float(metrics.mse(x, x_hat)) == 0.25
    assert float(metrics.normalized_mse(x, x_hat)) == 0.25  # variance around the mean is 1
    # Residual [0,-1],[0,0]: per-dim variance 0 and 0.25, of x 1 and 1.
    np.testing.assert_allclose(metrics.explained_variance(x, x_hat), 1 - 0.25 / 2)
    # A constant offset costs nmse but not explained variance.
    assert float(metrics.explained_variance(x, x + 1.0)) == 1.0
    assert float(metrics.normalized_mse(x, x + 1.0)) == 1.0
    z = jnp.array([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(metrics.l0(z)) == 2.0


def test_firing_stats_accumulate_over_batches():
    z = jnp.abs(jax.random.normal(jax.random.key(0), (300, 8))) * (jax.random.uniform(jax.random.key(1), (300, 8)) < jnp.array([0, 0.001, .5, .5, .5, .5, .5, 1.0]))
    stats = metrics.FiringStats.zeros(8)
    for chunk in jnp.split(z, 3):
        stats = jax.jit(metrics.FiringStats.update)(stats, chunk)
    whole = metrics.FiringStats.zeros(8).update(z)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    freq = np.asarray(stats.frequency())
    np.testing.assert_allclose(freq, np.mean(np.asarray(z) > 0, axis=0))
    fired = np.asarray(z) > 0
    np.testing.assert_allclose(stats.mean_when_firing()[2], np.asarray(z)[fired[:, 2], 2].mean(), rtol=1e-5)
    assert float(stats.mean_when_firing()[0]) == 0.0
    np.testing.assert_allclose(stats.dead_fraction(), np.mean(freq == 0))
    np.testing.assert_allclose(stats.dense_fraction(), np.mean(freq > 1e-2))
    np.testing.assert_allclose(stats.maxes, np.max(np.asarray(z), axis=0))
    assert set(stats.summary()) == {"dead_fraction", "dense_fraction", "frequency", "mean_when_firing", "max"}


def test_weighted_firing_stats_skip_padding_and_stacked_ones_reduce_to_one():
    """Rows of weight 0 (a padded batch) count for nothing, even the largest value; stats
    stacked along an axis (devices, processes) reduce to the stats of all their rows."""
    z = jnp.abs(jax.random.normal(jax.random.key(2), (40, 6))) * (jax.random.uniform(jax.random.key(3), (40, 6)) < 0.4)
    padded = z.at[30:].set(100.0)
    weights = (jnp.arange(40) < 30).astype(jnp.float32)
    got = metrics.FiringStats.zeros(6).update(padded, weights)
    want = metrics.FiringStats.zeros(6).update(z[:30])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(got.n_inputs) == 30 and float(jnp.max(got.maxes)) < 100
    parts = [metrics.FiringStats.zeros(6).update(chunk) for chunk in jnp.split(z, 4)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *parts).reduce()
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(metrics.FiringStats.zeros(6).update(z))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_reconstruction_ratios_by_hand():
    x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    x_hat = jnp.array([[3.0, 4.0], [0.0, 2.0]])  # exact, then orthogonal and twice as long
    assert float(metrics.cosine_similarity(x, x_hat)) == pytest.approx((1.0 + 0.0) / 2)
    assert float(metrics.l2_ratio(x, x_hat)) == pytest.approx((1.0 + 2.0) / 2)
    # gamma = sum ||x_hat||^2 / sum x_hat . x = (25 + 4) / (25 + 0)
    assert float(metrics.relative_reconstruction_bias(x, x_hat)) == pytest.approx(29 / 25)
    shrunk = 0.8 * x
    assert float(metrics.relative_reconstruction_bias(x, shrunk)) == pytest.approx(0.8)
    assert float(metrics.l2_ratio(x, shrunk)) == pytest.approx(0.8)


def test_dictionary_cosines_by_hand():
    w_dec = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, -1.0]])
    w_enc = jnp.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # [D, F]
    np.testing.assert_allclose(metrics.encoder_decoder_cosine(w_enc, w_dec), [1.0, 1.0, 0.0, -1.0], atol=1e-6)
    # latent 2 is 0.6 / 0.8 along latents 0 / 1; latent 3 is orthogonal to all
    for block in (1, 3, 1024):  # blocks that divide F, do not, and exceed it
        np.testing.assert_allclose(metrics.max_decoder_cosine(w_dec, block=block), [0.6, 0.8, 0.8, 0.0], atol=1e-6)


def test_log10_frequency_histogram_by_hand():
    frequency = jnp.array([0.0, 0.0, 1e-9, 1e-3, 0.0011, 0.5, 1.0])
    counts, dead = metrics.log10_frequency_histogram(frequency)
    edges = metrics.LOG10_FREQUENCY_BINS
    assert int(dead) == 2 and int(counts.sum()) == 5 and len(counts) == len(edges) - 1
    expected = np.zeros(len(counts), int)
    expected[0] += 1                     # 1e-9: below the first edge (-8), counted in the first bin
    expected[edges.index(-3.0)] += 2     # 1e-3 and 1.1e-3: [-3, -2.75)
    expected[edges.index(-0.5)] += 1     # 0.5 = 10^-0.30: [-0.5, -0.25)
    expected[-1] += 1                    # 1.0 = 10^0: the last bin
    np.testing.assert_array_equal(counts, expected)


def test_reconstruction_sums_over_batches_equal_the_batch_metrics_on_all_rows():
    """Streamed over three uneven batches (and merged from two windows), `result` is each batch
    function on the concatenated rows: sums, not a mean of per-batch values."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, (70, 6)).astype(np.float32)
    x_hat = (0.8 * x + rng.normal(0, 0.3, x.shape) + 0.1).astype(np.float32)
    pieces = [slice(0, 10), slice(10, 45), slice(45, 70)]
    sums = metrics.ReconstructionSums.zeros(6)
    for piece in pieces:
        sums = jax.jit(metrics.ReconstructionSums.update)(sums, x[piece], x_hat[piece])
    want = {"mse": metrics.mse, "nmse": metrics.normalized_mse, "explained_variance": metrics.explained_variance,
            "cosine": metrics.cosine_similarity, "l2_ratio": metrics.l2_ratio,
            "relative_reconstruction_bias": metrics.relative_reconstruction_bias}
    got = sums.result()
    assert sorted(got) == sorted(want) and float(sums.n) == 70
    for name, fn in want.items():
        np.testing.assert_allclose(got[name], fn(x, x_hat), rtol=2e-5, err_msg=name)
    first = metrics.ReconstructionSums.zeros(6).update(x[:45], x_hat[:45])
    merged = first.merge(metrics.ReconstructionSums.zeros(6).update(x[45:], x_hat[45:]))
    for name in want:
        np.testing.assert_allclose(merged.result()[name], got[name], rtol=2e-5, err_msg=name)
    # A mean of the three batches' NMSEs is not the NMSE of all rows: the test can tell them apart.
    per_batch = np.mean([metrics.normalized_mse(x[p], x_hat[p]) for p in pieces])
    assert abs(per_batch - float(got["nmse"])) > 1e-3
