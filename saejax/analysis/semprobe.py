"""Semantic probing (the paper's CLIP vs DINOv2 comparison), with the baselines the reference
designed but never coded.

Per concept: its positive images and shared negatives. A latent "says present" for an image
when its activation summed over the image's patches is above 0; its F1 against the labels
scores it, and the best latents stand for the concept. Two baselines say what an F1 means:

- the F1 of random live latents (a distribution: what a latent picked blindly reaches);
- a permutation test: the best latent's F1 when the labels are shuffled, B times, gives the
  p-value of the observed best F1 (best over all latents, so the search is accounted for).

>>> sums_NF = image_sums(codes_NPF)                      # [images, latents]
>>> result = score_concept(sums_NF, present_N, key, top=5, n_permutations=1000)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from saejax.analysis.features import ConceptF1

__all__ = ["image_sums", "latent_f1", "score_concept"]


def image_sums(codes_NPF: jax.Array) -> jax.Array:
    """[N, P, F] per-patch codes -> [N, F] sums over each image's patches."""
    return jnp.sum(codes_NPF, axis=1)


def latent_f1(fires_NF: jax.Array, present_N: jax.Array) -> jax.Array:
    """[F] F1 of each latent's "fires on this image" against the labels (`features.ConceptF1`;
    0 when it never fires and the concept is absent, as F1 has no positives then)."""
    counts = ConceptF1.zeros(fires_NF.shape[1], 1).update(fires_NF, present_N[:, None])
    return counts.f1()[0, :, 0]


@functools.partial(jax.jit, static_argnames=("top", "n_permutations", "n_random"))
def score_concept(sums_NF: jax.Array, present_N: jax.Array, key: jax.Array, *, top: int = 5,
                  n_permutations: int = 1000, n_random: int = 1000) -> dict[str, jax.Array]:
    """The best latents for one concept and their baselines.

    Args:
        sums_NF: [N, F] per-image sums (`image_sums`) over the concept's positives and the
            negatives.
        present_N: [N] bool, True for the positives.
        key: randomness for the baselines.
        top: how many best latents to return.
        n_permutations: label shuffles for the p-value.
        n_random: random live latents for the baseline distribution.

    Returns:
        `latents [top]`, `f1 [top]` (best first); `p_value` of the best F1 under shuffled labels;
        `random_f1 [n_random]`: F1 of random latents that fire on some image here.
    """
    fires = sums_NF > 0
    f1 = latent_f1(fires, present_N)
    best_f1, best = jax.lax.top_k(f1, top)
    perm_key, random_key = jax.random.split(key)

    def shuffled_best(k):
        return jnp.max(latent_f1(fires, jax.random.permutation(k, present_N)))

    null = jax.vmap(shuffled_best)(jax.random.split(perm_key, n_permutations))
    p_value = (1 + jnp.sum(null >= best_f1[0])) / (1 + n_permutations)
    live = jnp.any(fires, axis=0)
    weights = live / jnp.maximum(jnp.sum(live), 1)
    picks = jax.random.choice(random_key, f1.shape[0], (n_random,), p=weights)
    return {"latents": best, "f1": best_f1, "p_value": p_value, "random_f1": f1[picks]}
