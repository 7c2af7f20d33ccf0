import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import losses, sae
from saejax.core.losses import Objective


def setup(ae, n=24, seed=0):
    params = ae.init(jax.random.key(seed))
    params = params.replace(b_enc=0.1 * jax.random.normal(jax.random.key(seed + 1), params.b_enc.shape))
    x = jax.random.normal(jax.random.key(seed + 2), (n, ae.d_model))
    return params, x


def test_paper_objective_terms():
    ae = sae.relu(8, 32)
    params, x = setup(ae)
    loss, (enc, terms) = Objective(sparsity="l1")(ae, params, x, sparsity_coeff=0.01)
    z = jax.nn.relu((x - params.b_dec) @ params.w_enc + params.b_enc)
    x_hat = z @ params.w_dec + params.b_dec
    np.testing.assert_allclose(terms.mse, jnp.mean((x_hat - x) ** 2), rtol=1e-6)
    np.testing.assert_allclose(terms.penalty, jnp.mean(jnp.sum(z, axis=1)), rtol=1e-6)
    np.testing.assert_allclose(terms.sparsity, 0.01 * terms.penalty, rtol=1e-6)
    np.testing.assert_allclose(terms.l0, jnp.mean(jnp.sum(z > 0, axis=1)), rtol=1e-6)
    np.testing.assert_allclose(loss, terms.mse + terms.sparsity, rtol=1e-6)


def test_l1_decoder_norm_penalty_weights_by_row_norm():
    ae = sae.relu(8, 32)
    params, x = setup(ae)
    params = params.replace(w_dec=params.w_dec * jnp.linspace(0.5, 2.0, 32)[:, None])
    _, (enc, terms) = Objective(sparsity="l1_decoder_norm")(ae, params, x, sparsity_coeff=1.0)
    expected = jnp.mean(enc.z @ jnp.linalg.norm(params.w_dec, axis=1))
    np.testing.assert_allclose(terms.penalty, expected, rtol=1e-5)
    # Sparse (TopK) code gives the same penalty as its dense form.
    topk = sae.topk(8, 32, k=4)
    enc_sparse = topk.encode_train(params, x)
    dense = enc_sparse._replace(z=enc_sparse.dense())
    np.testing.assert_allclose(losses.l1_decoder_norm_penalty(enc_sparse, params),
                               losses.l1_decoder_norm_penalty(dense, params), rtol=1e-5)
    np.testing.assert_allclose(losses.l1_penalty(enc_sparse), losses.l1_penalty(dense), rtol=1e-5)


def test_l0_penalty_counts_and_pushes_thresholds():
    ae = sae.jumprelu(8, 32, threshold_init=0.2, bandwidth=0.1)
    params, x = setup(ae)
    _, (enc, terms) = Objective(sparsity="l0")(ae, params, x, sparsity_coeff=1.0)
    np.testing.assert_allclose(terms.penalty, jnp.mean(jnp.sum(enc.pre_acts > 0.2, axis=1)), rtol=1e-6)
    g = jax.grad(lambda p: losses.l0_penalty(ae.encode_train(p, x), p, ae.bandwidth))(params)
    in_window = jnp.sum(jnp.abs(enc.pre_acts - 0.2) < 0.05, axis=0)
    np.testing.assert_allclose(g.threshold, -in_window / 0.1 / x.shape[0], rtol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_matryoshka_prefixes_reconstruct_from_prefix_latents(architecture):
    ae = sae.relu(8, 32) if architecture == "relu" else sae.topk(8, 32, k=6)
    params, x = setup(ae)
    enc = ae.encode_train(params, x)
    z = enc.dense()
    bounds = losses.matryoshka_bounds((4, 16), 32)
    assert bounds == (4, 16, 32)
    recon = losses.prefix_reconstructions(ae, params, enc, bounds)
    for g, m in enumerate(bounds):
        np.testing.assert_allclose(recon[g], z[:, :m] @ params.w_dec[:m] + params.b_dec, rtol=1e-5, atol=1e-5)
    _, (_, terms) = Objective(sparsity="none", matryoshka_prefixes=(4, 16))(ae, params, x, sparsity_coeff=0.0)
    per_prefix = [jnp.mean((recon[g] - x) ** 2) for g in range(3)]
    np.testing.assert_allclose(terms.reconstruction, np.mean(per_prefix), rtol=1e-5)
    np.testing.assert_allclose(terms.mse, per_prefix[-1], rtol=1e-5)
    # The whole dictionary as the only prefix is the plain objective.
    plain = Objective(sparsity="none")(ae, params, x, sparsity_coeff=0.0)[0]
    whole = Objective(sparsity="none", matryoshka_prefixes=(32,))(ae, params, x, sparsity_coeff=0.0)[0]
    np.testing.assert_allclose(whole, plain, rtol=1e-6)


def test_auxk_uses_only_dead_latents():
    ae = sae.topk(8, 32, k=4)
    params, x = setup(ae)
    objective = Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=3)
    none_dead = jnp.zeros(32, bool)
    assert float(objective(ae, params, x, sparsity_coeff=0.0, dead_F=none_dead)[1][1].auxk) == 0.0

    dead = jnp.zeros(32, bool).at[jnp.array([1, 5, 9, 20])].set(True)
    _, (enc, terms) = objective(ae, params, x, sparsity_coeff=0.0, dead_F=dead)
    x_hat = ae.decode_encoding(params, enc)
    error = x - x_hat
    pre_dead = jnp.where(dead, enc.pre_acts, -jnp.inf)
    vals, idx = jax.lax.top_k(pre_dead, 3)
    error_hat = jnp.einsum("nk,nkd->nd", jax.nn.relu(vals), params.w_dec[idx])
    expected = jnp.mean((error_hat - error) ** 2) / jnp.mean((error - error.mean(0)) ** 2)
    np.testing.assert_allclose(terms.auxk, expected / 32, rtol=1e-5)

    grad = jax.grad(lambda p: losses.auxk_loss(ae, p, ae.encode_train(p, x), x, ae.decode_encoding(p, ae.encode_train(p, x)),
                                               dead, 3))(params)
    touched = np.flatnonzero(np.any(np.asarray(grad.w_dec) != 0, axis=1))
    assert set(touched) <= {1, 5, 9, 20} and len(touched) > 0


def test_sparsity_warmup_schedule():
    objective = Objective(sparsity_warmup_steps=4)
    got = [float(objective.sparsity_schedule(jnp.float32(2.0), jnp.int32(s))) for s in range(6)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.5, 2.0, 2.0])
    assert float(Objective().sparsity_schedule(jnp.float32(2.0), jnp.int32(0))) == 2.0


def test_objective_errors():
    with pytest.raises(ValueError, match="unknown sparsity penalty 'l2'"):
        Objective(sparsity="l2")
    with pytest.raises(ValueError, match=r"l0 penalty needs an SAE with a trained threshold \(jumprelu\), got relu"):
        Objective(sparsity="l0").check(sae.relu(4, 8))
    with pytest.raises(ValueError, match="prefixes must lie in 1..d_sae=8"):
        Objective(matryoshka_prefixes=(0, 4)).check(sae.relu(4, 8))
    ae = sae.topk(4, 8, k=2)
    params = ae.init(jax.random.key(0))
    with pytest.raises(ValueError, match="needs dead_F"):
        Objective(sparsity="none", auxk_coeff=0.1)(ae, params, jnp.ones((2, 4)), sparsity_coeff=0.0)
