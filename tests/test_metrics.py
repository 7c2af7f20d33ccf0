import jax
import jax.numpy as jnp
import numpy as np

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
