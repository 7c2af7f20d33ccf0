import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saejax import sae, train
from saejax.core.losses import Objective
from saejax.core.train import Hparams

from conftest import sparse_data

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def run(trainer, state, batches):
    step = jax.jit(trainer.step)
    for x in batches:
        state, metrics = step(state, x)
    return state, metrics


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_training_recovers_planted_features(architecture):
    x, features = sparse_data(jax.random.key(0), 8192, n_features=24, p_fire=0.08)
    ae = sae.relu(16, 64) if architecture == "relu" else sae.topk(16, 64, k=3)
    objective = Objective(sparsity="l1" if architecture == "relu" else "none")
    trainer = train.make_trainer(ae, objective=objective, warmup_steps=20)
    state = trainer.init(jax.random.key(1), Hparams.of(1e-2, 3e-2), b_dec=sae.data_mean(x))
    state, metrics = run(trainer, state, x.reshape(32, 256, 16)[jnp.arange(1000) % 32])
    assert float(metrics["nmse"]) < 0.1
    best_cosine = jnp.abs(features @ state.params.w_dec.T).max(axis=1)
    assert float(jnp.min(best_cosine)) > 0.9, np.asarray(best_cosine)


def test_relu_trainer_reproduces_the_saev_recipe():
    """Six steps against saev 0.1.0's own loop (tests/fixtures/make_saev_fixture.py)."""
    golden = np.load(FIXTURES / "saev_golden.npz")
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)
    ae = sae.relu(16, 64)
    trainer = train.make_trainer(ae, warmup_steps=int(golden["train_n_lr_warmup"]),
                                 eps=float(golden["train_adam_eps"]))
    state = trainer.init(jax.random.key(0), Hparams.of(float(golden["train_lr_final"]),
                                                       float(golden["train_sparsity_coeff"])))
    params = state.params.replace(w_enc=jnp.asarray(golden["train_init_W_enc"]), b_enc=jnp.asarray(golden["train_init_b_enc"]),
                                  w_dec=jnp.asarray(unit(golden["train_init_W_dec"])), b_dec=jnp.asarray(golden["train_init_b_dec"]))
    state = state.replace(params=params, opt_state=trainer.optimizer(state.hparams.learning_rate).init(params))
    step = jax.jit(trainer.step)
    for t, x in enumerate(golden["train_x"]):
        state, metrics = step(state, jnp.asarray(x))
        np.testing.assert_allclose(metrics["learning_rate"], golden["train_lr"][t], rtol=1e-6)
        for name in ("loss", "mse", "sparsity", "l0"):
            np.testing.assert_allclose(metrics[name], golden[f"train_{name}"][t], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(metrics["penalty"], golden["train_l1"][t], rtol=1e-5)
        # saev renormalises W_dec at the start of the next step; saejax right after the update.
        np.testing.assert_allclose(state.params.w_dec, unit(golden["train_W_dec"][t]), atol=2e-6)
        np.testing.assert_allclose(state.params.w_enc, golden["train_W_enc"][t], atol=2e-6)
        np.testing.assert_allclose(state.params.b_enc, golden["train_b_enc"][t], atol=2e-6)
        np.testing.assert_allclose(state.params.b_dec, golden["train_b_dec"][t], atol=2e-6)


def test_sparsity_warmup_really_applies():
    ae = sae.relu(16, 64)
    x = jax.random.normal(jax.random.key(0), (32, 16))
    warm = train.make_trainer(ae, objective=Objective(sparsity_warmup_steps=10), warmup_steps=0)
    cold = train.make_trainer(ae, warmup_steps=0)
    hp = Hparams.of(1e-3, 0.5)
    s_warm, m_warm = warm.step(warm.init(jax.random.key(1), hp), x)
    s_zero, _ = cold.step(cold.init(jax.random.key(1), Hparams.of(1e-3, 0.0)), x)
    assert float(m_warm["sparsity_coeff"]) == 0.0
    np.testing.assert_array_equal(s_warm.params.w_enc, s_zero.params.w_enc)
    _, m_warm2 = warm.step(s_warm, x)
    np.testing.assert_allclose(m_warm2["sparsity_coeff"], 0.05, rtol=1e-6)


def test_dead_counters_count_inputs_since_last_firing():
    ae = sae.relu(8, 16)
    trainer = train.make_trainer(ae, warmup_steps=0, dead_after_tokens=20)
    state = trainer.init(jax.random.key(0), Hparams.of(0.0, 0.0))
    never = jnp.arange(16) < 4
    state = state.replace(params=state.params.replace(b_enc=jnp.where(never, -1e6, 1e3)))
    x = jax.random.normal(jax.random.key(1), (8, 8))
    for expected in (8, 16, 24):
        state, metrics = trainer.step(state, x)
        np.testing.assert_array_equal(state.tokens_since_fired, jnp.where(never, expected, 0))
    np.testing.assert_array_equal(trainer.dead_latents(state), never)
    assert float(metrics["dead_fraction"]) == 0.25


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_sweep_member_equals_training_alone(architecture):
    ae = {"relu": sae.relu(16, 64), "topk": sae.topk(16, 64, k=8), "batchtopk": sae.batchtopk(16, 64, k=8),
          "jumprelu": sae.jumprelu(16, 64)}[architecture]
    sparsity = {"relu": "l1", "jumprelu": "l0"}.get(architecture, "none")
    trainer = train.make_trainer(ae, objective=Objective(sparsity=sparsity, auxk_coeff=1 / 32 if ae.k else 0.0),
                                 warmup_steps=2, dead_after_tokens=64)
    hparams = Hparams.stack([Hparams.of(1e-3, 1e-3, 8), Hparams.of(3e-3, 4e-3, 4), Hparams.of(2e-3, 2e-3, 6)])
    x, _ = sparse_data(jax.random.key(0), 6 * 32)
    batches = x.reshape(6, 32, 16)
    key = jax.random.key(7)
    states = trainer.init_sweep(key, hparams)
    sweep_step = jax.jit(trainer.sweep_step)
    for b in batches:
        states, sweep_metrics = sweep_step(states, b)
    member_keys = jax.random.split(key, 3)
    for i in range(3):
        alone, metrics = run(trainer, trainer.init(member_keys[i], train.member(hparams, i)), batches)
        for got, want in zip(jax.tree.leaves(train.member(states, i)), jax.tree.leaves(alone)):
            if jnp.issubdtype(got.dtype, jax.dtypes.prng_key):
                got, want = jax.random.key_data(got), jax.random.key_data(want)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(sweep_metrics["loss"][i], metrics["loss"], rtol=2e-5)
    if architecture == "topk":  # members really ran with their own k
        np.testing.assert_allclose(sweep_metrics["l0"], [8.0, 4.0, 6.0])


def test_an_optax_transformation_of_ones_own_replaces_the_recipe():
    """`Trainer(tx=optax.sgd(lr), unit_norm_decoder=False)` takes exactly the SGD step on the
    objective's gradient; with the unit-norm decoder the rows stay on the sphere; a function of
    the learning rate gives each sweep member its own rate."""
    ae, objective = sae.relu(16, 64), Objective(sparsity="l1")
    x, _ = sparse_data(jax.random.key(0), 64)
    sgd = train.make_trainer(ae, objective=objective, tx=optax.sgd(0.1), unit_norm_decoder=False)
    state = sgd.init(jax.random.key(1), Hparams.of(0.0, 1e-2))
    grads = jax.grad(lambda p: objective(ae, p, x, sparsity_coeff=jnp.float32(1e-2), k=None,
                                         dead_F=jnp.zeros(64, bool))[0])(state.params)
    stepped, metrics = jax.jit(sgd.step)(state, x)
    for got, before, grad in zip(jax.tree.leaves(stepped.params), jax.tree.leaves(state.params), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, before - 0.1 * grad, rtol=1e-5, atol=1e-7)
    assert "learning_rate" not in metrics and float(metrics["sparsity_coeff"]) == pytest.approx(1e-2)

    clipped = train.make_trainer(ae, objective=objective,
                                 tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    state, _ = run(clipped, clipped.init(jax.random.key(1), Hparams.of(1e-3, 1e-2)), [x] * 5)
    np.testing.assert_allclose(jnp.linalg.norm(state.params.w_dec, axis=1), 1.0, rtol=1e-5)

    per_rate = train.make_trainer(ae, objective=objective, tx=lambda lr: optax.adamw(lr, weight_decay=0.1))
    states = per_rate.init_sweep(jax.random.key(2), Hparams.grid([1e-3, 1e-2], [1e-2]))
    states, _ = jax.jit(per_rate.sweep_step)(states, x)
    for i, rate in enumerate([1e-3, 1e-2]):
        alone = train.make_trainer(ae, objective=objective, tx=optax.adamw(rate, weight_decay=0.1))
        alone_state, _ = run(alone, alone.init(jax.random.split(jax.random.key(2), 2)[i], Hparams.of(rate, 1e-2)), [x])
        np.testing.assert_allclose(train.member(states, i).params.w_enc, alone_state.params.w_enc, rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="this sweep varies learning_rate, but Trainer\\(tx=...\\) was given one optax "
                                         "transformation"):
        clipped.init_sweep(jax.random.key(0), Hparams.grid([1e-3, 1e-2]))
    with pytest.raises(TypeError, match="Trainer\\(tx=...\\) takes an optax.GradientTransformation or a function "
                                        "learning_rate -> GradientTransformation, not float"):
        train.make_trainer(ae, tx=1e-3)


def test_hparams_grid_order():
    grid = Hparams.grid(learning_rate=[1e-3, 3e-3], sparsity_coeff=[4e-4, 8e-4, 1.6e-3])
    assert grid.learning_rate.shape == (6,)
    np.testing.assert_allclose(grid.learning_rate, [1e-3] * 3 + [3e-3] * 3)
    np.testing.assert_allclose(grid.sparsity_coeff, [4e-4, 8e-4, 1.6e-3] * 2)


def _dot_macs(hlo_text):
    """Multiply-adds of every dot in optimized HLO (operand shapes looked up by name)."""
    shapes = {name: tuple(int(d) for d in dims.split(",") if d)
              for name, dims in re.findall(r"%([\w.\-]+) = f32\[([\d,]*)\]", hlo_text)}
    macs = []
    for line in hlo_text.splitlines():
        match = re.search(r"= f32\[([\d,]*)\]\S* dot\(%([\w.\-]+), ", line)
        if match:
            out = [int(d) for d in match.group(1).split(",") if d]
            lhs = shapes[match.group(2)]
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
            macs.append(int(np.prod(out)) * int(np.prod([lhs[int(i)] for i in contracting.split(",")])))
    return macs


def test_relu_step_has_five_big_matmuls_not_six():
    n, d, f = 64, 24, 96
    ae = sae.relu(d, f)
    trainer = train.make_trainer(ae)
    state = trainer.init(jax.random.key(0), Hparams.of(1e-3, 1e-3))
    hlo = jax.jit(trainer.step).lower(state, jnp.ones((n, d))).compile().as_text()
    macs = _dot_macs(hlo)
    big = [m for m in macs if m == n * d * f]
    assert len(big) == 5, sorted(macs)
    assert sum(macs) - 5 * n * d * f <= 4 * d * f  # the rest is vector-matrix work



def test_the_old_trainer_jit_sweep_still_works_for_one_release_and_says_so():
    from saejax.core.sweep_step import jit_sweep_step
    from saejax import sharding

    trainer = train.make_trainer(sae.relu(16, 64), objective=Objective(sparsity="l1"))
    states = trainer.init_sweep(jax.random.key(0), Hparams.grid([1e-3]))
    mesh = sharding.make_mesh()
    with pytest.warns(DeprecationWarning, match=r"Trainer.jit_sweep is deprecated: use saejax.core.sweep_step"):
        old = trainer.jit_sweep(states, mesh)
    assert old == jit_sweep_step(trainer, states, mesh)  # the same cached, compiled functions
