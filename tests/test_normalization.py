import jax
import jax.numpy as jnp
import numpy as np

from saejax import sae
from saejax.core.normalization import Normalization, estimate_normalization, fold_normalization


def test_estimated_statistics_give_mean_norm_sqrt_d():
    x = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (4096, 32))
    norm = estimate_normalization(x)
    np.testing.assert_allclose(norm.mean, jnp.mean(x, axis=0), rtol=1e-6)
    np.testing.assert_allclose(jnp.mean(jnp.linalg.norm(norm.apply(x), axis=1)), np.sqrt(32), rtol=1e-5)
    np.testing.assert_allclose(norm.invert(norm.apply(x)), x, rtol=1e-5, atol=1e-5)


def test_folded_parameters_act_on_raw_activations():
    raw = 4.0 + 2.5 * jax.random.normal(jax.random.key(0), (64, 16))
    norm = estimate_normalization(raw)
    for ae in (sae.relu(16, 48), sae.topk(16, 48, k=6), sae.jumprelu(16, 48, threshold_init=0.05)):
        params = ae.init(jax.random.key(1))
        params = params.replace(b_dec=0.3 * jax.random.normal(jax.random.key(2), (16,)))
        folded = fold_normalization(params, norm)
        z_norm = ae.encode(params, norm.apply(raw))
        np.testing.assert_allclose(ae.encode(folded, raw), z_norm, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ae(folded, raw), norm.invert(ae(params, norm.apply(raw))), rtol=1e-4, atol=1e-4)


def test_identity_normalization():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    np.testing.assert_array_equal(Normalization.identity(8).apply(x), x)
