import jax

from saejax.datasets import synthetic


def sparse_data(key, n, d_model=16, n_features=48, p_fire=0.06, noise=0.01):
    """`(inputs [n, d_model], planted features)`: what an SAE should recover."""
    world_key, sample_key = jax.random.split(key)
    world = synthetic.make_world(world_key, d_model=d_model, n_features=n_features, mean_active=p_fire * n_features,
                                 noise=noise)
    return world.sample(sample_key, n), world.features
