import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax import resample, sae, train
from saejax.core.train import Hparams

from conftest import sparse_data


def trained_state_with_dead_latents(dead_ids):
    ae = sae.relu(16, 48)
    trainer = train.make_trainer(ae, warmup_steps=0, dead_after_tokens=64)
    x, _ = sparse_data(jax.random.key(0), 256)
    state = trainer.init(jax.random.key(1), Hparams.of(1e-3, 1e-3))
    # Kill some latents: a huge negative bias keeps them silent while the rest train.
    state = state.replace(params=state.params.replace(b_enc=state.params.b_enc.at[dead_ids].set(-1e4)))
    step = jax.jit(trainer.step)
    for i in range(4):
        state, _ = step(state, x[i * 64:(i + 1) * 64])
    return trainer, state, x


def test_dead_latents_fire_again_and_live_ones_are_untouched():
    dead_ids = jnp.array([0, 7, 30])
    trainer, state, x = trained_state_with_dead_latents(dead_ids)
    dead = trainer.dead_latents(state)
    assert set(np.flatnonzero(dead)) >= {0, 7, 30}
    live = ~dead

    new_state, n = jax.jit(trainer.resample)(state, x)
    assert int(n) == int(jnp.sum(dead))

    # Dead latents fire again on the probe inputs.
    z = trainer.ae.encode(new_state.params, x)
    assert bool(jnp.all(jnp.sum(z[:, dead] > 0, axis=0) > 0))
    p_old, p_new = state.params, new_state.params
    np.testing.assert_allclose(jnp.linalg.norm(p_new.w_dec[dead], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(p_new.b_enc[dead], 0.0)
    live_norm = jnp.mean(jnp.linalg.norm(p_old.w_enc[:, live], axis=0))
    np.testing.assert_allclose(jnp.linalg.norm(p_new.w_enc[:, dead], axis=0), 0.2 * live_norm, rtol=1e-5)
    np.testing.assert_array_equal(new_state.tokens_since_fired[dead], 0)

    # Live latents, and their optimizer state, bit for bit.
    np.testing.assert_array_equal(p_new.w_enc[:, live], p_old.w_enc[:, live])
    np.testing.assert_array_equal(p_new.w_dec[live], p_old.w_dec[live])
    np.testing.assert_array_equal(p_new.b_enc[live], p_old.b_enc[live])
    np.testing.assert_array_equal(p_new.b_dec, p_old.b_dec)
    adam_old, adam_new = state.opt_state[1], new_state.opt_state[1]
    assert isinstance(adam_new, optax.ScaleByAdamState)
    for moments_old, moments_new in ((adam_old.mu, adam_new.mu), (adam_old.nu, adam_new.nu)):
        np.testing.assert_array_equal(moments_new.w_enc[:, live], moments_old.w_enc[:, live])
        np.testing.assert_array_equal(moments_new.w_dec[live], moments_old.w_dec[live])
        np.testing.assert_array_equal(moments_new.b_dec, moments_old.b_dec)
        np.testing.assert_array_equal(moments_new.w_enc[:, dead], 0.0)
        np.testing.assert_array_equal(moments_new.w_dec[dead], 0.0)
        np.testing.assert_array_equal(moments_new.b_enc[dead], 0.0)
    assert int(adam_new.count) == int(adam_old.count)


def test_nothing_dead_changes_nothing():
    trainer, state, x = trained_state_with_dead_latents(jnp.array([], jnp.int32))
    state = state.replace(tokens_since_fired=jnp.zeros_like(state.tokens_since_fired))
    new_state, n = trainer.resample(state, x)
    assert int(n) == 0
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(a, b)


def test_resampling_a_sweep_with_vmap():
    ae = sae.topk(16, 32, k=4)
    trainer = train.make_trainer(ae, warmup_steps=0, dead_after_tokens=1)
    states = trainer.init_sweep(jax.random.key(0), Hparams.grid([1e-3, 2e-3], k=[4]))
    states = states.replace(tokens_since_fired=states.tokens_since_fired.at[0, :5].set(10))
    x = jax.random.normal(jax.random.key(1), (64, 16))
    new_states, n = jax.jit(trainer.sweep_resample)(states, x)
    np.testing.assert_array_equal(n, [5, 0])
    np.testing.assert_array_equal(new_states.params.w_dec[1], states.params.w_dec[1])
    assert not np.array_equal(new_states.params.w_dec[0, :5], states.params.w_dec[0, :5])


def test_resample_schedule():
    trainer = train.make_trainer(sae.relu(4, 8), resample_every=100, resample_until=250)
    assert [s for s in range(1, 400) if trainer.resample_due(s)] == [100, 200]
    assert not any(train.make_trainer(sae.relu(4, 8)).resample_due(s) for s in range(1, 400))


def test_resample_dead_takes_explicit_pieces_from_a_users_own_loop():
    # No Trainer: plain params, a plain optax.adam state, a user-made dead mask.
    ae = sae.relu(8, 16)
    params = ae.init(jax.random.key(0))
    tx = optax.adam(1e-3)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, tx.init(params), params)  # non-zero moments everywhere
    dead = jnp.arange(16) % 5 == 0
    x = jax.random.normal(jax.random.key(1), (32, 8))
    new_params, new_opt, n = jax.jit(resample.resample_dead, static_argnums=(0, 1))(
        ae, tx, params, opt_state, dead, x, jax.random.key(2))
    assert int(n) == 4
    np.testing.assert_allclose(jnp.linalg.norm(new_params.w_dec[dead], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(new_params.w_dec[~dead], params.w_dec[~dead])
    mu = new_opt[0].mu
    np.testing.assert_array_equal(mu.w_enc[:, dead], 0.0)
    np.testing.assert_array_equal(mu.w_enc[:, ~dead], opt_state[0].mu.w_enc[:, ~dead])
    np.testing.assert_array_equal(mu.b_dec, opt_state[0].mu.b_dec)
