"""Finding features: top activating exemplars, latent-vs-concept F1, and latent proposals.

All accumulators are pytrees with pure `update` methods, so they stream over any number of
batches under `jit`:

>>> ex = TopExemplars.empty(d_sae=F, k=16, n_patches=P)
>>> for acts_BPF, ids_B in stream:            # latents per patch of each image
...     ex = jax.jit(TopExemplars.update)(ex, acts_BPF, ids_B)
>>> ex.image_ids[i], ex.maps[i]                # latent i's top images and their [P] activation maps

The paper's semantic probing (REFERENCE.md section 4) predicts "present" where a latent is
non-zero and scores F1 against concept labels; `ConceptF1` does it at whatever granularity
the labels have (per image after summing over patches, or per patch). When one concept is
split across several latents (feature splitting), `greedy_latent_union` scores the best
"any of these latents fired" detector of up to m latents.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from saejax.core.metrics import DENSE_FREQUENCY


@flax.struct.dataclass
class TopExemplars:
    """Per latent, the `k` images where its maximum over patches is largest, with their maps.

    Attributes:
        values: [F, k] each exemplar's maximum activation, descending (-inf: empty slot).
        image_ids: [F, k] int32 image ids (-1: empty slot).
        maps: [F, k, P] the latent's activation on every patch of the exemplar.
    """

    values: jax.Array
    image_ids: jax.Array
    maps: jax.Array

    @classmethod
    def empty(cls, d_sae: int, k: int, n_patches: int, dtype=jnp.float32) -> TopExemplars:
        return cls(jnp.full((d_sae, k), -jnp.inf, dtype), jnp.full((d_sae, k), -1, jnp.int32),
                   jnp.zeros((d_sae, k, n_patches), dtype))

    def update(self, acts_BPF: jax.Array, image_ids_B: jax.Array) -> TopExemplars:
        """Merge a batch: `acts_BPF` [B, P, F] latent values per patch, `image_ids_B` [B]."""
        k = self.values.shape[1]
        batch_max_FB = jnp.max(acts_BPF, axis=1).T
        values = jnp.concatenate([self.values, batch_max_FB.astype(self.values.dtype)], axis=1)
        ids = jnp.concatenate([self.image_ids, jnp.broadcast_to(image_ids_B.astype(jnp.int32), batch_max_FB.shape)], 1)
        maps = jnp.concatenate([self.maps, jnp.transpose(acts_BPF, (2, 0, 1)).astype(self.maps.dtype)], axis=1)
        top_values, top = jax.lax.top_k(values, k)
        return TopExemplars(top_values, jnp.take_along_axis(ids, top, axis=1),
                            jnp.take_along_axis(maps, top[..., None], axis=1))

    def max_activation(self) -> jax.Array:
        """[F] the largest activation seen per latent (0 if it never fired): the paper's `max_i`."""
        return jnp.maximum(self.values[:, 0], 0.0)


@flax.struct.dataclass
class ConceptF1:
    """Counts for the F1 of "latent j is non-zero" as a detector of concept c.

    Attributes:
        true_positive: [F, C] items where latent j fired and concept c is present.
        predicted: [F] items where latent j fired.
        actual: [C] items where concept c is present.
    """

    true_positive: jax.Array
    predicted: jax.Array
    actual: jax.Array

    @classmethod
    def zeros(cls, d_sae: int, n_concepts: int) -> ConceptF1:
        return cls(jnp.zeros((d_sae, n_concepts)), jnp.zeros((d_sae,)), jnp.zeros((n_concepts,)))

    def update(self, acts_NF: jax.Array, present_NC: jax.Array) -> ConceptF1:
        """Add N items (patches or images): latent values [N, F] and concept labels bool [N, C]."""
        fired = (acts_NF > 0).astype(jnp.float32)
        present = present_NC.astype(jnp.float32)
        return ConceptF1(self.true_positive + fired.T @ present, self.predicted + jnp.sum(fired, 0),
                         self.actual + jnp.sum(present, 0))

    def f1(self) -> jax.Array:
        """[F, C] F1 scores (0 where a latent never fired and the concept never appeared)."""
        denominator = self.predicted[:, None] + self.actual[None, :]
        return jnp.where(denominator > 0, 2 * self.true_positive / jnp.maximum(denominator, 1), 0.0)

    def precision(self) -> jax.Array:
        return self.true_positive / jnp.maximum(self.predicted[:, None], 1)

    def recall(self) -> jax.Array:
        return self.true_positive / jnp.maximum(self.actual[None, :], 1)

    def best(self) -> tuple[jax.Array, jax.Array]:
        """`(latent [C], f1 [C])`: the best latent for each concept and its F1."""
        f1 = self.f1()
        best = jnp.argmax(f1, axis=0)
        return best, jnp.take_along_axis(f1, best[None], axis=0)[0]


def greedy_latent_union(acts_NF: jax.Array, present_N: jax.Array, max_latents: int) -> tuple[jax.Array, jax.Array]:
    """Greedy forward selection of latents whose union ("any of them fired") detects a concept.

    Step s adds the latent that most raises the F1 of the union against `present_N`, so
    `f1[0]` is the best single latent's F1 (as `ConceptF1.best`) and `f1` tells how much a
    concept gains from being read out of several latents. Holds all N items in memory.

    Args:
        acts_NF: [N, F] latent values per item (fired = > 0).
        present_N: [N] bool, where the concept is present.
        max_latents: m, the number of selection steps (static).

    Returns:
        `(latents [m] int32, f1 [m])`: the latents in the order chosen, and the union's F1
        after each step. F1 falls once no remaining latent helps; `argmax(f1) + 1` is the best
        union size.
    """
    if not 1 <= max_latents <= acts_NF.shape[1]:
        raise ValueError(f"max_latents must be in 1..{acts_NF.shape[1]} (the number of latents), got {max_latents}")
    fired = (acts_NF > 0).astype(jnp.float32)
    present = present_N.astype(jnp.float32)
    actual = jnp.sum(present)

    def step(carry, _):
        union_N, chosen_F = carry
        candidates = jnp.maximum(fired, union_N[:, None])
        f1 = 2 * (present @ candidates) / jnp.maximum(jnp.sum(candidates, 0) + actual, 1)
        best = jnp.argmax(jnp.where(chosen_F, -1.0, f1))
        return (candidates[:, best], chosen_F.at[best].set(True)), (best.astype(jnp.int32), f1[best])

    init = (jnp.zeros(fired.shape[0]), jnp.zeros(fired.shape[1], bool))
    _, (latents, f1) = jax.lax.scan(step, init, None, length=max_latents)
    return latents, f1


def propose_latents(acts_PF: jax.Array, selected_P: jax.Array, frequency_F: jax.Array, *, n: int = 3,
                    dense_threshold: float = DENSE_FREQUENCY) -> tuple[jax.Array, jax.Array]:
    """Latents to offer for a selection of patches (the paper's interactive proposal).

    Sums each latent over the selected patches, drops dense latents (frequency >=
    `dense_threshold`), and returns the top `n` as `(latent ids [n], summed values [n])`.
    """
    summed = jnp.sum(jnp.where(selected_P[:, None], acts_PF, 0.0), axis=0)
    summed = jnp.where(frequency_F >= dense_threshold, -jnp.inf, summed)
    values, latents = jax.lax.top_k(summed, n)
    return latents, values
