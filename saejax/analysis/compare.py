"""Features shared and unique across models: latents of two SAEs (on two backbones, or two
blocks, or two runs) matched by how their activations correlate on the same images.

The paper's headline (CLIP learns abstractions DINOv2 does not) came from reading exemplars by
hand. Here both (backbone, SAE) pairs read one image source; every latent's activation is
taken per patch (`level="patch"`, both models must have the same patch grid) or per image (its
max over the patches, `level="image"`, any grids), and `CorrelationSums` accumulates what the
Pearson correlation of every latent of A with every latent of B needs: `[F_a, F_b]` cross sums,
streamed in bounded memory (shifted by the first batch's means, so float32 sums stay accurate)
and merged over processes. Then, for each latent, its best match in the other dictionary and
the correlation; the share of each dictionary's live latents with a match above `threshold`;
and the unmatched live latents with their top images.

>>> result = compare.compare(site_a, site_b, source, names=("clip", "dinov2"), level="image")
>>> result["a"]["shared_share"], result["a"]["unmatched"][:5]
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from saejax import data
from saejax.analysis.site import Site
from saejax.provenance import written_by

__all__ = ["LEVELS", "CorrelationSums", "compare", "correlations", "latent_values", "match", "merge"]

LEVELS = ("patch", "image")


@flax.struct.dataclass
class CorrelationSums:
    """Running sums for the correlation of every latent of A with every latent of B (a pytree).

    Values are shifted by `shift_a` / `shift_b` (the first batch's means) before summing, which
    keeps float32 sums of many samples accurate (the correlation does not change).

    Attributes:
        n: samples seen; shift_a [Fa], shift_b [Fb]; sum_a, sum_b, sq_a, sq_b: sums of the
        shifted values and of their squares; cross [Fa, Fb]: sums of their products;
        top_a [Fa, k], top_a_ids, top_b, top_b_ids: each latent's largest values and the
        images they came from (-1: none yet).
    """

    n: jax.Array
    shift_a: jax.Array
    shift_b: jax.Array
    sum_a: jax.Array
    sum_b: jax.Array
    sq_a: jax.Array
    sq_b: jax.Array
    cross: jax.Array
    top_a: jax.Array
    top_a_ids: jax.Array
    top_b: jax.Array
    top_b_ids: jax.Array

    @classmethod
    def zeros(cls, d_a: int, d_b: int, *, k: int = 8) -> CorrelationSums:
        za, zb = jnp.zeros((d_a,), jnp.float32), jnp.zeros((d_b,), jnp.float32)
        return cls(jnp.zeros((), jnp.float32), za, zb, za, zb, za, zb, jnp.zeros((d_a, d_b), jnp.float32),
                   jnp.full((d_a, k), -jnp.inf), jnp.full((d_a, k), -1, jnp.int32), jnp.full((d_b, k), -jnp.inf),
                   jnp.full((d_b, k), -1, jnp.int32))

    def update(self, a_NF: jax.Array, b_NG: jax.Array, image_max_a: jax.Array, image_max_b: jax.Array,
               image_ids_B: jax.Array) -> CorrelationSums:
        """Add `N` samples (row n of `a` and of `b` is the same patch or image) from `B` images:
        `image_max_*` [B, F] each latent's max over an image's patches, `image_ids_B` their ids."""
        a_NF, b_NG = a_NF.astype(jnp.float32), b_NG.astype(jnp.float32)
        first = self.n == 0
        shift_a = jnp.where(first, a_NF.mean(0), self.shift_a)
        shift_b = jnp.where(first, b_NG.mean(0), self.shift_b)
        da, db = a_NF - shift_a, b_NG - shift_b
        top_a, top_a_ids = _merge_top(self.top_a, self.top_a_ids, image_max_a, image_ids_B)
        top_b, top_b_ids = _merge_top(self.top_b, self.top_b_ids, image_max_b, image_ids_B)
        return CorrelationSums(self.n + a_NF.shape[0], shift_a, shift_b, self.sum_a + da.sum(0),
                               self.sum_b + db.sum(0), self.sq_a + (da * da).sum(0), self.sq_b + (db * db).sum(0),
                               self.cross + jnp.matmul(da.T, db, precision=jax.lax.Precision.HIGHEST),
                               top_a, top_a_ids, top_b, top_b_ids)

    def correlation(self) -> jax.Array:
        """[Fa, Fb] Pearson correlations; 0 where a latent never varied (dead in the sample)."""
        n = jnp.maximum(self.n, 1)
        cov = self.cross / n - jnp.outer(self.sum_a / n, self.sum_b / n)
        var_a = jnp.maximum(self.sq_a / n - (self.sum_a / n) ** 2, 0)
        var_b = jnp.maximum(self.sq_b / n - (self.sum_b / n) ** 2, 0)
        scale = jnp.sqrt(jnp.outer(var_a, var_b))
        return jnp.where(scale > 0, cov / jnp.where(scale > 0, scale, 1), 0.0)

    def active(self) -> tuple[jax.Array, jax.Array]:
        """Whether each latent of A and of B ever fired in the sample."""
        return self.top_a[:, 0] > 0, self.top_b[:, 0] > 0


def _merge_top(values_FK, ids_FK, image_max_BF, image_ids_B):
    """Per latent, the k largest image maxima so far and their image ids."""
    values = jnp.concatenate([values_FK, image_max_BF.T.astype(values_FK.dtype)], axis=1)
    ids = jnp.concatenate([ids_FK, jnp.broadcast_to(image_ids_B.astype(jnp.int32), image_max_BF.T.shape)], axis=1)
    top, pick = jax.lax.top_k(values, values_FK.shape[1])
    return top, jnp.take_along_axis(ids, pick, axis=1)


def latent_values(codes_BPF: jax.Array, level: str) -> jax.Array:
    """The samples one batch gives: every patch `[B * P, F]` or each image's max `[B, F]`."""
    if level == "patch":
        return codes_BPF.reshape(-1, codes_BPF.shape[-1])
    if level == "image":
        return codes_BPF.max(axis=1)
    raise ValueError(f"level {level!r}: expected one of {LEVELS}")


def merge(parts: CorrelationSums) -> CorrelationSums:
    """One `CorrelationSums` from several over disjoint samples, stacked along a leading axis
    (e.g. every process's, from `process_allgather`). Each part was shifted by its own first
    batch; the merged sums use the first part's shift."""
    parts = jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype.kind == "f" else np.asarray(a), parts)
    shift_a, shift_b, n = parts.shift_a[0], parts.shift_b[0], parts.n[:, None]
    da, db = parts.shift_a - shift_a, parts.shift_b - shift_b  # [parts, F]: how far each part's shift is off
    # sum(x - s0) = sum(x - s) + n (s - s0), and likewise for squares and products.
    sq_a = parts.sq_a + 2 * da * parts.sum_a + n * da ** 2
    sq_b = parts.sq_b + 2 * db * parts.sum_b + n * db ** 2
    cross = (parts.cross.sum(0) + np.einsum("pa,pb->ab", parts.sum_a, db) + np.einsum("pa,pb->ab", da, parts.sum_b)
             + np.einsum("p,pa,pb->ab", parts.n, da, db))
    tops = []
    for values, ids in ((parts.top_a, parts.top_a_ids), (parts.top_b, parts.top_b_ids)):
        values, ids = np.concatenate(list(values), 1), np.concatenate(list(ids), 1)
        order = np.argsort(-values, axis=1, kind="stable")[:, :parts.top_a.shape[-1]]
        tops += [np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)]
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return CorrelationSums(f32(parts.n.sum()), f32(shift_a), f32(shift_b), f32((parts.sum_a + n * da).sum(0)),
                           f32((parts.sum_b + n * db).sum(0)), f32(sq_a.sum(0)), f32(sq_b.sum(0)), f32(cross),
                           f32(tops[0]), tops[1], f32(tops[2]), tops[3])


def _merge_over_processes(sums: CorrelationSums) -> CorrelationSums:
    if jax.process_count() == 1:
        return sums
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return merge(multihost_utils.process_allgather(sums))


def correlations(site_a: Site, site_b: Site, source: data.Source, *, level: str = "patch", limit: int | None = None,
                 batch_size: int = 64, k: int = 8) -> CorrelationSums:
    """`CorrelationSums` of the two sites' codes over the first `limit` images of `source`
    (each process reads its share; merged, so every process returns the same sums).

    Raises:
        ValueError: `level="patch"` with different patch grids (use `level="image"`).
    """
    latent_values(jnp.zeros((1, 1, 1)), level)  # checks the level
    if level == "patch" and tuple(site_a.bb.grid) != tuple(site_b.bb.grid):
        raise ValueError(f"level='patch' needs the same patch grid, but model A has {tuple(site_a.bb.grid)} and "
                         f"model B {tuple(site_b.bb.grid)}; use level='image' (each latent's max per image)")

    @jax.jit
    def update(sums, codes_a, codes_b, ids):
        return sums.update(latent_values(codes_a, level), latent_values(codes_b, level), codes_a.max(1),
                           codes_b.max(1), ids)

    sums = CorrelationSums.zeros(site_a.ae.d_sae, site_b.ae.d_sae, k=k)
    for batch in data.process_share(source, batch_size, limit):
        if not len(batch.ids):
            continue
        sums = update(sums, site_a.encode(batch.images)["codes"], site_b.encode(batch.images)["codes"],
                      jnp.asarray(batch.ids, jnp.int32))
    sums = _merge_over_processes(sums)
    if float(sums.n) == 0:
        raise ValueError(f"correlations: {source!r} gave no images")
    return jax.tree.map(np.asarray, sums)


def match(correlation: np.ndarray, active_a: np.ndarray, active_b: np.ndarray, *, threshold: float) -> dict:
    """Best matches both ways from a `[Fa, Fb]` correlation matrix: per latent its best partner
    among the other side's live latents and the correlation (-1 and 0 for a dead latent), and per
    side the share of live latents whose best correlation is at least `threshold`."""
    corr = np.where(active_a[:, None] & active_b[None, :], np.asarray(correlation, np.float64), -np.inf)
    out = {}
    for side, c, active in (("a", corr, active_a), ("b", corr.T, active_b)):
        best = np.argmax(c, axis=1)
        score = np.take_along_axis(c, best[:, None], 1)[:, 0]
        live = np.asarray(active, bool) & np.isfinite(score)
        best, score = np.where(live, best, -1), np.where(live, score, 0.0)
        matched = live & (score >= threshold)
        out[side] = {"best": best, "score": score, "live": live, "matched": matched,
                     "shared_share": float(matched.sum() / max(live.sum(), 1))}
    return out


def compare(site_a: Site, site_b: Site, source: data.Source, *, names: tuple[str, str] = ("a", "b"),
            level: str = "patch", threshold: float = 0.5, limit: int | None = None, batch_size: int = 64,
            exemplars: int = 8) -> dict[str, Any]:
    """Match the latents of two SAEs on one image source; returns what `compare.json` holds.

    Returns:
        `{"names", "level", "threshold", "images", "samples", "a": side, "b": side}`, each side
        `{"d_sae", "live", "shared_share", "matches": [{"latent", "best", "score"}, ...] (every
        live latent), "unmatched": [{"latent", "best", "score", "exemplars": [image ids]}, ...]
        (live latents without a match at `threshold`, most active first)}`.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: a correlation in (0, 1]")
    sums = correlations(site_a, site_b, source, level=level, limit=limit, batch_size=batch_size, k=exemplars)
    active_a, active_b = sums.active()
    matched = match(sums.correlation(), active_a, active_b, threshold=threshold)
    samples = int(sums.n)
    result: dict[str, Any] = {"names": list(names), "level": level, "threshold": threshold, "samples": samples,
                              "written_by": written_by(),
                              "images": samples // (site_a.bb.layout.n_patches if level == "patch" else 1)}
    for side, top, top_ids, d_sae in (("a", sums.top_a, sums.top_a_ids, site_a.ae.d_sae),
                                      ("b", sums.top_b, sums.top_b_ids, site_b.ae.d_sae)):
        m = matched[side]
        live = np.flatnonzero(m["live"])
        unmatched = live[~m["matched"][live]]
        unmatched = unmatched[np.argsort(-top[unmatched, 0], kind="stable")]
        result[side] = {
            "d_sae": d_sae, "live": int(live.size), "shared_share": m["shared_share"],
            "matches": [{"latent": int(i), "best": int(m["best"][i]), "score": float(m["score"][i])} for i in live],
            "unmatched": [{"latent": int(i), "best": int(m["best"][i]), "score": float(m["score"][i]),
                           "exemplars": [int(j) for j in top_ids[i] if j >= 0]} for i in unmatched]}
    return result
