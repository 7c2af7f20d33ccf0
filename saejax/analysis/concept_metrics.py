"""Concept metrics per latent, and the trivial dictionaries an SAE must beat (pure, jitted).

The saev follow-up (arXiv 2511.17735) scores each latent against each concept with a 1-D
logistic probe: a logistic fit of the concept on that latent's value alone, the best latent per
concept being the one with the lowest training loss. On held-out data it reports (`summarize_scores`):

- Probe R: `1 - mean probe cross-entropy / mean cross-entropy of the prevalence-only baseline`
  (a pseudo-R^2 over concepts);
- mAP: the mean over concepts of the best latent's average precision;
- Purity@k: the precision of the k highest-scoring patches of the best latent (k = 16);
- Coverage@tau: the share of concepts whose best latent's AP is at least tau (0.3).

The same scores are computed here for two baselines on the same activations, so a reader sees
whether the SAE beats trivial dictionaries:

- k-means with as many centroids as latents, a "latent" firing on the inputs nearest its centroid;
- PCA: the top components' projections, positive and negative halves as separate features.

>>> w, b, loss = probe_1d(codes_NF, present_N)          # [F] each
>>> best = jnp.argmin(loss); ap = average_precision(codes_NF[:, best] * w[best] + b[best], present_N)
>>> purity = purity_at_k(codes_NF, labels_N, k=16, n_labels=L)   # [F]
>>> km = kmeans_codes(x_ND, n_centroids=F, key=key)     # [N, F] one-hot, to score like an SAE
>>> summarize_scores(concept_scores(train_codes, val_codes, train_present_NC, val_present_NC))
{'probe_r': ..., 'map': ..., 'purity': ..., 'coverage': ..., 'mean_f1': ...}
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis.features import f1_from_counts

__all__ = ["average_precision", "baseline_dictionaries", "concept_scores", "correlations", "kmeans", "kmeans_codes", "pca_codes",
           "probe_1d", "probe_ceiling_f1", "purity_at_k", "summarize_scores"]


@functools.partial(jax.jit, static_argnames=("iterations",))
def probe_1d(values_NF: jax.Array, present_N: jax.Array, *, iterations: int = 25,
             l2: float = 1e-4) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A logistic fit `p = sigmoid(w * value + b)` of the concept on each latent alone.

    Newton's method on the mean cross-entropy plus `l2 * w**2`, all latents at once. Each
    latent's values are scaled to at most 1 in magnitude for the fit and every Newton step is
    clipped, so separable latents (a latent that fires exactly on the concept) stay finite
    instead of diverging.

    Returns:
        `(w [F], b [F], loss [F])`: the fitted weights (for the unscaled values) and the mean
        cross-entropy they reach (without the penalty). The concept's best latent has the
        lowest loss.
    """
    x = values_NF.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=0), 1e-12)
    xs = x / scale
    y = present_N.astype(jnp.float32)[:, None]
    prior = jnp.clip(jnp.mean(y), 1e-6, 1 - 1e-6)
    w = jnp.zeros(x.shape[1])
    b = jnp.full(x.shape[1], jnp.log(prior / (1 - prior)))

    def newton(_, wb):
        w, b = wb
        p = jax.nn.sigmoid(xs * w + b)
        r = p - y
        g_w, g_b = jnp.mean(r * xs, 0) + 2 * l2 * w, jnp.mean(r, 0)
        s = p * (1 - p)
        h_ww, h_wb, h_bb = jnp.mean(s * xs * xs, 0) + 2 * l2, jnp.mean(s * xs, 0), jnp.mean(s, 0) + 1e-6
        det = jnp.maximum(h_ww * h_bb - h_wb**2, 1e-12)
        step_w = jnp.clip((h_bb * g_w - h_wb * g_b) / det, -4.0, 4.0)
        step_b = jnp.clip((h_ww * g_b - h_wb * g_w) / det, -4.0, 4.0)
        return w - step_w, b - step_b

    w, b = jax.lax.fori_loop(0, iterations, newton, (w, b))
    logits = xs * w + b
    loss = jnp.mean(jnp.logaddexp(0.0, logits) - y * logits, axis=0)
    return w / scale, b, jnp.where(jnp.isfinite(loss), loss, jnp.inf)


@jax.jit
def average_precision(scores_N: jax.Array, present_N: jax.Array) -> jax.Array:
    """Average precision of ranking by `scores` (the mean precision at each positive, ties
    broken by order); nan when there are no positives."""
    order = jnp.argsort(-scores_N, stable=True)
    hits = present_N[order].astype(jnp.float32)
    precision = jnp.cumsum(hits) / jnp.arange(1, hits.shape[0] + 1)
    n_pos = jnp.sum(hits)
    return jnp.where(n_pos > 0, jnp.sum(precision * hits) / jnp.maximum(n_pos, 1), jnp.nan)


@functools.partial(jax.jit, static_argnames=("k", "n_labels"))
def purity_at_k(values_NF: jax.Array, labels_N: jax.Array, *, k: int, n_labels: int) -> jax.Array:
    """[F] for each latent, the share of its `k` largest activations that carry their most
    common label (saev's purity@k); labels are ints in `[0, n_labels)`."""
    _, top = jax.lax.top_k(values_NF.T, k)  # [F, k]
    counts = jax.vmap(lambda rows: jnp.bincount(labels_N[rows], length=n_labels))(top)
    return jnp.max(counts, axis=1) / k


@functools.partial(jax.jit, static_argnames=("n_centroids", "iterations"))
def kmeans(x_ND: jax.Array, *, n_centroids: int, key: jax.Array, iterations: int = 20) -> jax.Array:
    """[C, D] centroids by Lloyd's iterations from `n_centroids` random inputs (an empty
    cluster keeps its centroid)."""
    centroids = x_ND[jax.random.choice(key, x_ND.shape[0], (n_centroids,), replace=False)]

    def step(_, c):
        nearest = jnp.argmin(_sq_distances(x_ND, c), axis=1)
        onehot = jax.nn.one_hot(nearest, n_centroids, dtype=x_ND.dtype)
        count = onehot.sum(0)[:, None]
        return jnp.where(count > 0, (onehot.T @ x_ND) / jnp.maximum(count, 1), c)

    return jax.lax.fori_loop(0, iterations, step, centroids)


def _sq_distances(x_ND, c_CD):
    return jnp.sum(x_ND**2, 1, keepdims=True) - 2 * x_ND @ c_CD.T + jnp.sum(c_CD**2, 1)


def kmeans_codes(x_ND: jax.Array, *, n_centroids: int, key: jax.Array, iterations: int = 20,
                 centroids: jax.Array | None = None) -> jax.Array:
    """[N, C] codes of the k-means baseline: 1 for each input's nearest centroid, else 0
    (centroids fitted on `x_ND` unless given)."""
    if centroids is None:
        centroids = kmeans(x_ND, n_centroids=n_centroids, key=key, iterations=iterations)
    return jax.nn.one_hot(jnp.argmin(_sq_distances(x_ND, centroids), axis=1), centroids.shape[0], dtype=jnp.float32)


def pca_codes(x_ND: jax.Array, *, n_components: int, mean_D: jax.Array | None = None,
              components_KD: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The PCA baseline: projections on the top `n_components` principal directions, split into
    positive and negative halves (`relu(p)`, `relu(-p)`), so each direction gives two
    non-negative "latents" like an SAE's.

    Returns:
        `(codes [N, 2K], mean [D], components [K, D])` (the fitted pieces, to encode other data).
    """
    if mean_D is None or components_KD is None:
        mean_D = jnp.mean(x_ND, axis=0)
        _, _, vt = jnp.linalg.svd(x_ND - mean_D, full_matrices=False)
        components_KD = vt[:n_components]
    p = (x_ND - mean_D) @ components_KD.T
    return jnp.concatenate([jax.nn.relu(p), jax.nn.relu(-p)], axis=1), mean_D, components_KD


def baseline_dictionaries(d_sae: int, train_x: jax.Array, val_x: jax.Array, train_codes: jax.Array,
                          val_codes: jax.Array, *, key: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """`{name: (codes of the training inputs, codes of the evaluation inputs)}` for an SAE and the
    trivial dictionaries it must beat, fitted on the same (normalised) training activations:
    k-means with as many centroids as latents, and PCA's top `min(D, d_sae // 2)` components
    (positive and negative halves)."""
    centroids = kmeans(train_x, n_centroids=d_sae, key=key)
    pca_train, mean, components = pca_codes(train_x, n_components=min(train_x.shape[1], d_sae // 2))
    return {"sae": (train_codes, val_codes),
            "kmeans": tuple(kmeans_codes(x, n_centroids=d_sae, key=key, centroids=centroids) for x in (train_x, val_x)),
            "pca": (pca_train, pca_codes(val_x, n_components=0, mean_D=mean, components_KD=components)[0])}


@functools.partial(jax.jit, static_argnames=("purity_k",))
def _held_out_scores(values_N, present_N, w, b, prevalence, purity_k: int):
    y = present_N.astype(jnp.float32)
    logits = values_N * w + b
    probe_ce = jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)
    p = jnp.clip(prevalence, 1e-6, 1 - 1e-6)
    baseline_ce = -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))
    _, top = jax.lax.top_k(logits, purity_k)
    return average_precision(logits, present_N), probe_ce, baseline_ce, jnp.mean(y[top])


@jax.jit
def correlations(values_NF: jax.Array, present_NC: jax.Array) -> jax.Array:
    """[F, C] the correlation of each latent's value with each concept's presence (0 where
    either is constant), in one matmul. Its square ranks latents as the 1-D probe's first
    Newton step from a zero weight does (the score test), so it picks `probe_1d`'s
    candidates at a fraction of the cost."""
    x, y = values_NF.astype(jnp.float32), present_NC.astype(jnp.float32)
    mean_x, mean_y = jnp.mean(x, 0), jnp.mean(y, 0)
    cov = x.T @ y / x.shape[0] - mean_x[:, None] * mean_y[None]
    var = jnp.maximum(jnp.mean(x * x, 0) - mean_x**2, 0.0)[:, None] * (mean_y * (1 - mean_y))[None]
    return jnp.where(var > 0, cov / jnp.sqrt(jnp.maximum(var, 1e-30)), 0.0)


def concept_scores(train_codes: jax.Array, val_codes: jax.Array, train_present, val_present, *,
                   purity_k: int = 16, candidates: int | None = 32) -> list[dict[str, float]]:
    """Per concept (columns of `*_present`, bool [N, C]), a dictionary's best single feature.

    Two ways of picking it:

    - patch-level F1 on the evaluation inputs (best feature and threshold,
      `segmentation.best_f1_latent`): `f1`;
    - the 1-D probe's pick on the training inputs (lowest logistic loss) among the
      `candidates` latents most correlated with the concept (`correlations`; None: all of
      them, F probes per concept instead of `candidates`), scored on the
      evaluation inputs by the probe's score `w * value + b`: `ap` (average precision),
      `probe_ce` (its cross-entropy), `baseline_ce` (the cross-entropy of predicting the
      training prevalence everywhere) and `purity` (the share of its `purity_k` highest-scoring
      inputs where the concept is present); `latent` is the pick.

    `summarize_scores` turns the list into the follow-up's table row.
    """
    from saejax.analysis import segmentation  # noqa: PLC0415 - segmentation is the heavier module; keep this one light

    scores = []
    n_features = train_codes.shape[1]
    if candidates is not None and candidates < n_features:
        ranked = np.asarray(jax.lax.top_k(correlations(train_codes, jnp.asarray(train_present)).T ** 2, candidates)[1])
    else:
        ranked = np.tile(np.arange(n_features), (train_present.shape[1], 1))
    for c in range(train_present.shape[1]):
        present_val = jnp.asarray(val_present[:, c])
        _, f1, _ = segmentation.best_f1_latent(val_codes, present_val)
        w, b, loss = probe_1d(train_codes[:, ranked[c]], jnp.asarray(train_present[:, c]))
        pick = int(jnp.argmin(loss))
        j = int(ranked[c][pick])
        prevalence = jnp.mean(jnp.asarray(train_present[:, c], jnp.float32))
        ap, probe_ce, baseline_ce, purity = _held_out_scores(val_codes[:, j], present_val, w[pick], b[pick],
                                                             prevalence, purity_k)
        scores.append({"f1": float(f1), "latent": j, "ap": float(ap), "probe_ce": float(probe_ce),
                       "baseline_ce": float(baseline_ce), "purity": float(purity)})
    return scores


def probe_ceiling_f1(train_x, train_present, eval_x, eval_present, *, epochs: int) -> np.ndarray:
    """[C] F1 of a supervised binary linear probe per concept (columns of `*_present`), trained
    on `train_x` and scored on `eval_x`: how well the activations themselves encode each concept,
    the ceiling for any dictionary's single feature."""
    from saejax.analysis import probes  # noqa: PLC0415 - keep this module light

    f1 = []
    for c in range(train_present.shape[1]):
        probe = probes.train_linear_probe(jax.random.key(100 + c), train_x, jnp.asarray(train_present[:, c], jnp.int32),
                                          2, epochs=epochs, batch_size=2048, learning_rate=1e-2)
        predicted = np.asarray(probes.predict(probe, eval_x)) == 1
        present = np.asarray(eval_present[:, c])
        f1.append(float(f1_from_counts(np.sum(predicted & present), predicted.sum(), present.sum())))
    return np.asarray(f1)


def summarize_scores(scores: list[dict[str, float]], *, tau: float = 0.3) -> dict[str, float]:
    """The follow-up's row for one dictionary from `concept_scores`: Probe R
    (`1 - mean probe_ce / mean baseline_ce`), mAP, mean Purity@k, Coverage@tau (share of
    concepts with AP >= tau), and the mean best-feature F1."""
    def mean(key):
        return sum(s[key] for s in scores) / len(scores)

    return {"probe_r": 1 - mean("probe_ce") / mean("baseline_ce"), "map": mean("ap"), "purity": mean("purity"),
            "coverage": sum(s["ap"] >= tau for s in scores) / len(scores), "mean_f1": mean("f1")}
