"""Synthetic activations made of planted sparse features (pure JAX, deterministic from a key).

Each input is `sum_i c_i f_i + noise` over a few active unit directions `f_i` (more directions
than dimensions: superposition). A good SAE's decoder rows recover the `f_i`;
`feature_recovery` measures how well.

>>> world = make_world(jax.random.key(0), d_model=64, n_features=256)
>>> x_ND = world.sample(jax.random.key(1), 1024)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from saejax import sharding as shd


@flax.struct.dataclass
class PlantedFeatures:
    """A ground-truth dictionary and how often and how strongly each feature fires.

    Attributes:
        features: [G, D] unit directions.
        p_fire: [G] probability that each feature is active in an input.
        noise: scalar standard deviation of isotropic noise.
    """

    features: jax.Array
    p_fire: jax.Array
    noise: jax.Array

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """[n, D] inputs. Active features get magnitude 0.5 + Exp(1)."""
        k_fire, k_mag, k_noise = jax.random.split(key, 3)
        g, d = self.features.shape
        active = jax.random.bernoulli(k_fire, self.p_fire, (n, g))
        magnitude = 0.5 + jax.random.exponential(k_mag, (n, g))
        return (active * magnitude) @ self.features + self.noise * jax.random.normal(k_noise, (n, d))


def make_world(key: jax.Array, *, d_model: int, n_features: int, mean_active: float = 3.0,
               zipf_exponent: float = 0.0, noise: float = 0.01) -> PlantedFeatures:
    """Random unit features; feature i fires with probability proportional to
    `(i + 1) ** -zipf_exponent`, scaled so that `mean_active` features fire per input."""
    features = jax.random.normal(key, (n_features, d_model))
    features = features / jnp.linalg.norm(features, axis=1, keepdims=True)
    weights = (jnp.arange(n_features) + 1.0) ** -zipf_exponent
    p_fire = jnp.clip(mean_active * weights / jnp.sum(weights), 0.0, 1.0)
    return PlantedFeatures(features, p_fire, jnp.asarray(noise, jnp.float32))


def feature_recovery(features_GD: jax.Array, w_dec_FD: jax.Array, threshold: float = 0.9) -> tuple[jax.Array, jax.Array]:
    """`(fraction of features with some decoder row at |cosine| > threshold, mean best |cosine|)`."""
    rows = w_dec_FD / jnp.linalg.norm(w_dec_FD, axis=1, keepdims=True)
    best = jnp.max(jnp.abs(features_GD @ rows.T), axis=1)
    return jnp.mean(best > threshold), jnp.mean(best)


class WorldStream:
    """A `saejax.loop.fit` stream of a world's activations: `{layer: [batch_size, D]}`, batch
    `t` a pure function of `(key, t)`, so that resuming from `position()` replays the same data.

    >>> stream = WorldStream(world, jax.random.key(2), 1024, normalization=norm)
    >>> states = saejax.loop.fit(trainer, {0: states}, stream, steps=1000)
    """

    def __init__(self, world: PlantedFeatures, key: jax.Array, batch_size: int, *, normalization=None,
                 layer: int = 0, mesh: Mesh | None = None, position: Mapping[str, int] | None = None):
        self.layer, self.step = layer, int((position or {}).get("step", 0))
        sharding = None if mesh is None else shd.batch_sharding(mesh, 2)

        @functools.partial(jax.jit, out_shardings=sharding)
        def batch_at(step):
            x = world.sample(jax.random.fold_in(key, step), batch_size)
            return x if normalization is None else normalization.apply(x)

        self._batch_at = batch_at

    def __iter__(self):
        return self

    def __next__(self) -> dict[int, jax.Array]:
        x = self._batch_at(self.step)
        self.step += 1
        return {self.layer: x}

    def position(self) -> dict[str, int]:
        return {"step": self.step}
