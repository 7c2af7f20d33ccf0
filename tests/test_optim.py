import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saejax import optim, sae


def test_parallel_component_removed_and_rows_renormalised():
    ae = sae.relu(8, 16)
    params = ae.init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    projected, _ = optim.remove_parallel_decoder_grad().update(grads, optax.EmptyState(), params)
    np.testing.assert_allclose(jnp.sum(projected.w_dec * params.w_dec, axis=1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(projected.w_enc, grads.w_enc)

    updates = jax.tree.map(lambda g: 0.3 * g, grads)
    renormed, _ = optim.renormalize_decoder_rows().update(updates, optax.EmptyState(), params)
    new = optax.apply_updates(params, renormed)
    np.testing.assert_allclose(jnp.linalg.norm(new.w_dec, axis=1), 1.0, rtol=1e-6)
    direction = params.w_dec + updates.w_dec
    np.testing.assert_allclose(new.w_dec, direction / jnp.linalg.norm(direction, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="needs the current params"):
        optim.renormalize_decoder_rows().update(updates, optax.EmptyState())


def test_warmup_matches_the_reference_scheduler():
    # saev's Warmup(0, lr, n): lr * t / n during warmup (t = steps taken), then lr.
    schedule = optim.learning_rate_schedule(1e-3, warmup_steps=4)
    np.testing.assert_allclose([float(schedule(t)) for t in range(7)],
                               [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_cosine_decay_after_warmup():
    schedule = optim.learning_rate_schedule(1.0, warmup_steps=2, decay_steps=10, final_fraction=0.1)
    assert float(schedule(2)) == pytest.approx(1.0)
    assert float(schedule(7)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(schedule(12)) == pytest.approx(0.1, rel=1e-5)
    assert float(optim.learning_rate_schedule(2.0, warmup_steps=0)(0)) == 2.0


def test_make_optimizer_with_traced_learning_rate():
    ae = sae.relu(4, 8)
    params = ae.init(jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, params)

    def one_step(lr):
        tx = optim.make_optimizer(lr, warmup_steps=0)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates).b_enc

    # Adam's first step moves each coordinate by about lr.
    np.testing.assert_allclose(jax.vmap(one_step)(jnp.array([0.1, 0.2]))[:, 0], [-0.1, -0.2], rtol=1e-4)
