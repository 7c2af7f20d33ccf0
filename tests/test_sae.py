import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import sae
from saejax.core.sae import SAEParams


def random_params(ae, key, bias_scale=0.1):
    params = ae.init(key)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    return params.replace(b_enc=bias_scale * jax.random.normal(k1, params.b_enc.shape),
                          b_dec=bias_scale * jax.random.normal(k2, params.b_dec.shape))


def test_relu_forward_is_the_reference_expression_bit_for_bit():
    ae = sae.relu(16, 64)
    params = random_params(ae, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (32, 16))
    reference = lambda p, x: jax.nn.relu((x - p.b_dec) @ p.w_enc + p.b_enc)
    np.testing.assert_array_equal(ae.encode(params, x), reference(params, x))
    np.testing.assert_array_equal(jax.jit(ae.encode)(params, x), jax.jit(reference)(params, x))
    np.testing.assert_array_equal(ae.decode(params, ae.encode(params, x)),
                                  reference(params, x) @ params.w_dec + params.b_dec)


def test_centered_matmul_gradients_match_plain_autodiff():
    x = jax.random.normal(jax.random.key(0), (8, 5))
    b = jax.random.normal(jax.random.key(1), (5,))
    w = jax.random.normal(jax.random.key(2), (5, 7))
    cot = jax.random.normal(jax.random.key(3), (8, 7))
    f_custom = lambda x, b, w: jnp.sum(sae.centered_matmul(x, b, w) * cot)
    f_plain = lambda x, b, w: jnp.sum(((x - b) @ w) * cot)
    for got, want in zip(jax.grad(f_custom, (0, 1, 2))(x, b, w), jax.grad(f_plain, (0, 1, 2))(x, b, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_init_follows_torch_kaiming_uniform():
    d, f = 32, 256
    raw = sae.relu(d, f).init(jax.random.key(0), decoder_norm=None)
    # torch sees W_enc [d, f] and W_dec [f, d] with fan_in = size(1): bounds sqrt(6/f), sqrt(6/d).
    for w, fan_in in ((raw.w_enc, f), (raw.w_dec, d)):
        bound = np.sqrt(6 / fan_in)
        assert float(jnp.max(jnp.abs(w))) <= bound
        np.testing.assert_allclose(float(jnp.std(w)), bound / np.sqrt(3), rtol=0.05)
    np.testing.assert_array_equal(raw.b_enc, 0)
    np.testing.assert_array_equal(raw.b_dec, 0)
    unit = sae.relu(d, f).init(jax.random.key(0))
    np.testing.assert_allclose(jnp.linalg.norm(unit.w_dec, axis=1), 1.0, rtol=1e-6)


def test_tied_init_and_b_dec_seed():
    ae = sae.topk(8, 32, k=4)
    b = jnp.arange(8.0)
    params = ae.init(jax.random.key(0), b_dec=b)
    np.testing.assert_array_equal(params.w_enc, params.w_dec.T)
    np.testing.assert_array_equal(params.b_dec, b)
    assert not sae.relu(8, 32).tied_init


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_the_class_the_factory_and_create_build_the_same_sae(architecture):
    """One default per architecture (`Architecture.tied_init`), whichever way the SAE is built."""
    k = {"k": 4} if architecture in ("topk", "batchtopk") else {}
    by_class, by_name = sae.SAE(architecture, 8, 32, **k), sae.create(architecture, 8, 32, **k)
    by_factory = getattr(sae, architecture)(8, 32, **k)
    assert by_class == by_name == by_factory
    assert by_class.tied_init == (architecture in ("topk", "batchtopk", "jumprelu"))
    assert sae.SAE(architecture, 8, 32, tied_init=False, **k).tied_init is False
    assert sae.SAE.from_config(by_class.to_config()) == by_class


def test_topk_keeps_k_largest_and_sparse_decode_equals_dense():
    ae = sae.topk(16, 64, k=5)
    params = random_params(ae, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (10, 16))
    pre = ae.pre_activations(params, x)
    z = ae.encode(params, x)
    for row_pre, row_z in zip(np.asarray(pre), np.asarray(z)):
        top = np.argsort(-row_pre)[:5]
        expected = np.zeros(64, np.float32)
        expected[top] = np.maximum(row_pre[top], 0)
        np.testing.assert_array_equal(row_z, expected)
    enc = ae.encode_train(params, x)
    np.testing.assert_allclose(ae.decode_encoding(params, enc), ae.decode(params, z), rtol=1e-5, atol=1e-5)
    # A dynamic k keeps only the first k slots.
    z3 = ae.encode(params, x, k=3)
    assert int(jnp.max(jnp.sum(z3 > 0, axis=1))) <= 3
    np.testing.assert_array_equal(z3, sae.topk(16, 64, k=3).encode(params, x))


def test_batchtopk_keeps_k_times_batch_in_training_and_uses_threshold_at_inference():
    ae = sae.batchtopk(16, 64, k=4)
    params = random_params(ae, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (12, 16))
    enc = ae.encode_train(params, x)
    assert int(jnp.sum(enc.z > 0)) == 4 * 12
    per_row = jnp.sum(enc.z > 0, axis=1)
    assert int(jnp.max(per_row)) != int(jnp.min(per_row))  # budget is shared across the batch
    np.testing.assert_allclose(enc.batch_threshold, jnp.min(jnp.where(enc.z > 0, enc.z, jnp.inf)))
    # after_update: the first batch sets the threshold, later ones move it by an EMA.
    p1 = ae.after_update(params, enc, jnp.array(0))
    np.testing.assert_allclose(p1.threshold, enc.batch_threshold)
    p2 = ae.after_update(p1.replace(threshold=jnp.ones(64)), enc, jnp.array(5))
    np.testing.assert_allclose(p2.threshold, 0.99 + 0.01 * enc.batch_threshold, rtol=1e-6)
    # Inference: one input's code depends only on the threshold.
    z = ae.encode(p1, x)
    pre = ae.pre_activations(p1, x)
    np.testing.assert_array_equal(z, jnp.where(pre > p1.threshold, pre, 0.0))
    np.testing.assert_array_equal(ae.encode(p1, x[:1]), z[:1])


def test_jumprelu_forward_and_straight_through_threshold_gradient():
    bandwidth = 0.5
    ae = sae.jumprelu(4, 6, threshold_init=0.3, bandwidth=bandwidth)
    pre = jnp.array([[0.1, 0.31, 0.5, 0.2, 0.9, -1.0]])
    theta = jnp.full((6,), 0.3)
    np.testing.assert_array_equal(sae.jump_relu(pre, theta, bandwidth), jnp.where(pre > 0.3, pre, 0.0))
    g_pre, g_theta = jax.grad(lambda p, t: jnp.sum(sae.jump_relu(p, t, bandwidth)), (0, 1))(pre, theta)
    in_window = np.abs((np.asarray(pre) - 0.3) / bandwidth) < 0.5
    np.testing.assert_allclose(g_theta, -(0.3 / bandwidth) * in_window[0], rtol=1e-6)
    np.testing.assert_array_equal(g_pre, (pre > 0.3).astype(jnp.float32))
    g_step = jax.grad(lambda t: jnp.sum(sae.step_function(pre, t, bandwidth)))(theta)
    np.testing.assert_allclose(g_step, -(1 / bandwidth) * in_window[0], rtol=1e-6)
    # after_update keeps thresholds non-negative.
    params = ae.init(jax.random.key(0))
    clipped = ae.after_update(params.replace(threshold=-jnp.ones(6)), None, jnp.array(1))
    np.testing.assert_array_equal(clipped.threshold, 0.0)


def test_geometric_median_minimises_summed_distance():
    x = jax.random.normal(jax.random.key(0), (200, 5)).at[:10].add(50.0)  # outliers pull the mean
    med = sae.geometric_median(x)
    total = lambda m: jnp.sum(jnp.linalg.norm(x - m, axis=1))
    assert float(jnp.linalg.norm(jax.grad(total)(med))) < 1e-2 * x.shape[0] ** 0.5
    assert float(total(med)) < float(total(sae.data_mean(x)))


def test_bad_configs_and_params_are_named():
    with pytest.raises(ValueError, match="unknown SAE architecture 'gelu'"):
        sae.SAE("gelu", 4, 8)
    with pytest.raises(ValueError, match="k <= d_sae=8, got k=9"):
        sae.topk(4, 8, k=9)
    ae = sae.relu(4, 8)
    params = ae.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"'w_dec' has shape \(8, 5\), expected \(8, 4\)"):
        ae.check_params(params.replace(w_dec=jnp.zeros((8, 5))))
    with pytest.raises(ValueError, match="missing 'threshold'"):
        sae.jumprelu(4, 8).check_params(params)
    with pytest.raises(ValueError, match="unknown SAE config keys"):
        sae.SAE.from_config(dict(ae.to_config(), colour="red"))
    assert sae.SAE.from_config(ae.to_config()) == ae


def test_sae_is_a_static_jit_argument_and_params_a_pytree():
    ae = sae.topk(8, 32, k=4)
    params = ae.init(jax.random.key(0))
    x = jnp.ones((3, 8))
    out = jax.jit(lambda ae, p, x: ae(p, x), static_argnums=0)(ae, params, x)
    assert out.shape == (3, 8)
    assert len(jax.tree.leaves(params)) == 4
    assert isinstance(jax.tree.map(lambda a: a * 2, params), SAEParams)


def test_topk_sparse_gradient_matches_dense_autodiff():
    ae = sae.topk(8, 64, k=4)
    params = ae.init(jax.random.key(0))
    params = params.replace(b_dec=jnp.linspace(-0.1, 0.1, 8), b_enc=jnp.linspace(0.0, 0.05, 64))
    x = jax.random.normal(jax.random.key(1), (32, 8))
    cot = jax.random.normal(jax.random.key(2), (32, 4))

    def dense_reference(p, x):  # top_k through plain autodiff
        pre = (x - p.b_dec) @ p.w_enc + p.b_enc
        return jax.nn.relu(jax.lax.top_k(pre, ae.k)[0])

    def sparse(p, x):
        return ae.encode_train(p, x).top_vals

    g_ref = jax.grad(lambda p, x: jnp.sum(dense_reference(p, x) * cot), argnums=(0, 1))(params, x)
    g_new = jax.grad(lambda p, x: jnp.sum(sparse(p, x) * cot), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
