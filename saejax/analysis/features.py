"""Finding features: top activating exemplars, latent-vs-concept F1, and latent proposals.

All accumulators are pytrees with pure `update` methods, so they stream over any number of
batches under `jit`:

>>> ex = TopExemplars.empty(d_sae=F, k=16, n_patches=P)
>>> for acts_BPF, ids_B in stream:            # latents per patch of each image
...     ex = jax.jit(TopExemplars.update)(ex, acts_BPF, ids_B)
>>> ex.image_ids[i], ex.maps[i]                # latent i's top images and their [P] activation maps

The paper's semantic probing (REFERENCE.md section 4) predicts "present" where a latent is
non-zero and scores F1 against concept labels; `ConceptF1` does it at whatever granularity
the labels have (per image after summing over patches, or per patch), at one threshold or
several, and it is the one F1 accumulator: semprobe, segmentation's feature search, the
demo and the concept metrics all count with it. When one concept is
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


def f1_from_counts(true_positive, predicted, actual) -> jax.Array:
    """F1 = 2 TP / (predicted + actual), broadcasting; 0 where a detector never fired and the
    concept never appeared (F1 has no positives then). The one F1 formula of the package."""
    denominator = predicted + actual
    return jnp.where(denominator > 0, 2 * true_positive / jnp.maximum(denominator, 1), 0.0)


@flax.struct.dataclass
class ConceptF1:
    """Counts for the F1 of "latent j > threshold t" as a detector of concept c, with each
    latent's max: everything a latent-vs-concept search needs, accumulated batch by batch in
    bounded memory. Counts are int32 (exact past 2**24 items; each batch's counts are exact as
    long as a batch has fewer than 2**24 items); two accumulators over different items add
    with `merge` (devices, processes).

    Attributes:
        true_positive: [T, F, C] items where latent j fired above threshold t and concept c is present.
        predicted: [T, F] items where latent j fired above threshold t.
        actual: [C] items where concept c is present.
        max: [F] each latent's largest value (-inf before any item).
        thresholds: the T thresholds, static ((0.0,): "the latent is non-zero", the paper's).
    """

    true_positive: jax.Array
    predicted: jax.Array
    actual: jax.Array
    max: jax.Array
    thresholds: tuple[float, ...] = flax.struct.field(pytree_node=False, default=(0.0,))

    @classmethod
    def zeros(cls, d_sae: int, n_concepts: int, thresholds=(0.0,)) -> ConceptF1:
        t = len(thresholds)
        return cls(jnp.zeros((t, d_sae, n_concepts), jnp.int32), jnp.zeros((t, d_sae), jnp.int32),
                   jnp.zeros((n_concepts,), jnp.int32), jnp.full((d_sae,), -jnp.inf, jnp.float32),
                   tuple(float(t) for t in thresholds))

    def update(self, acts_NF: jax.Array, present_NC: jax.Array) -> ConceptF1:
        """Add N items (patches or images): latent values [N, F] and concept labels bool [N, C]."""
        present = present_NC.astype(jnp.float32)
        acts = acts_NF.astype(jnp.float32)

        def at(threshold):  # one [N, F] mask at a time
            fired = (acts > threshold).astype(jnp.float32)
            return (fired.T @ present).astype(jnp.int32), jnp.sum(fired, 0).astype(jnp.int32)

        true_positive, predicted = jax.lax.map(at, jnp.asarray(self.thresholds, jnp.float32))
        return ConceptF1(self.true_positive + true_positive, self.predicted + predicted,
                         self.actual + jnp.sum(present, 0).astype(jnp.int32), jnp.maximum(self.max, acts.max(0)),
                         self.thresholds)

    def update_labels(self, acts_NF: jax.Array, labels_N: jax.Array) -> ConceptF1:
        """`update` with one class label per item (int [N], one concept each, as patch labels)."""
        return self.update(acts_NF, jax.nn.one_hot(labels_N, self.actual.shape[0], dtype=jnp.bool_))

    def merge(self, other: ConceptF1) -> ConceptF1:
        """The counts of both item sets (the same latents, concepts and thresholds)."""
        return ConceptF1(self.true_positive + other.true_positive, self.predicted + other.predicted,
                         self.actual + other.actual, jnp.maximum(self.max, other.max), self.thresholds)

    def f1(self) -> jax.Array:
        """[T, F, C] F1 scores (`f1_from_counts`)."""
        return f1_from_counts(self.true_positive, self.predicted[..., None], self.actual)

    def precision(self) -> jax.Array:
        return self.true_positive / jnp.maximum(self.predicted[..., None], 1)

    def recall(self) -> jax.Array:
        return self.true_positive / jnp.maximum(self.actual, 1)

    def best(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`(latent [C], f1 [C], threshold_index [C])`: per concept the latent and threshold
        (`thresholds[i]`) with the best F1 (on ties the lowest threshold, then the lowest latent)."""
        f1 = self.f1()
        t, f, c = f1.shape
        flat = jnp.argmax(f1.reshape(t * f, c), axis=0)
        return (flat % f).astype(jnp.int32), jnp.max(f1.reshape(t * f, c), axis=0), (flat // f).astype(jnp.int32)


def greedy_latent_union(acts_NF: jax.Array, present_N: jax.Array, max_latents: int) -> tuple[jax.Array, jax.Array]:
    """Greedy forward selection of latents whose union ("any of them fired") detects a concept.

    Step s adds the latent that most raises the F1 of the union against `present_N`, so
    `f1[0]` is the best single latent's F1 (as `ConceptF1.best` at threshold 0) and `f1` tells how much a
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
        f1 = f1_from_counts(present @ candidates, jnp.sum(candidates, 0), actual)
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
