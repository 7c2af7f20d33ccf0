import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

@pytest.fixture
def rng():
    return np.random.default_rng(0)

def sparse_data(key, n, d_model=16, n_features=48, p_fire=0.06, noise=0.01):
    """Inputs made of a few planted unit directions: what an SAE should recover."""
    k_dict, k_fire, k_mag, k_noise = jax.random.split(key, 4)
    features = jax.random.normal(k_dict, (n_features, d_model))
    features = features / jnp.linalg.norm(features, axis=1, keepdims=True)
    fires = jax.random.bernoulli(k_fire, p_fire, (n, n_features))
    mags = jax.random.exponential(k_mag, (n, n_features)) + 0.5
    x = (fires * mags) @ features + noise * jax.random.normal(k_noise, (n, d_model))
    return x, features
