"""Finding the latents that control a prediction, without being told which: attribution,
ranking, then verification by intervention against matched baselines.

The paper found its manipulable features by hand. `discover` does it for a backbone, an SAE
at one block (`Site`) and a head (the checkpoint's classifier, a linear probe, CLIP zero-shot
logits, or a slice of one of them):

1. **Attribution** (`latent_attribution`, pure and jittable): the residual at the SAE's block
   is rewritten as `decode(z) + error` with the SAE's error held fixed, so the forward pass is
   the clean one, and one backward pass gives, for every image, the gradient of its target's
   score with respect to every latent on every patch token. Activation x gradient, summed over
   the patches, is the latent's attribution: the first-order change of the score if the latent
   were removed from that image. The target is the head's own prediction (or a label).
2. **Ranking** (`AttributionScores`): streamed over a source into per-class sums `[C, F]`
   (bounded memory, merged over processes); a class's candidates are the latents with the
   largest mean attribution on the images of that class, dead and dense latents excluded.
3. **Verification** (`verify`), on other images: each candidate is suppressed where it fires
   (set to `suppress_scale` x its max, the where-active variant of the paper's edit) on the
   images of its class, and amplified (set to `amplify_scale` x its max on every patch) on the
   other images. The effect is the change of the class's margin (its logit minus the best
   other logit) per image. The same edits are made with `draws` random latents matched in
   firing frequency and with `draws` random directions of the same norm on the same tokens; a
   paired sign-flip permutation test of the candidate's per-image effect against each
   baseline's gives a p-value, the larger of the two is the edit's p-value, and Holm's method
   corrects them over every edit tested. A candidate is verified when both its edits are
   significant at `alpha` after the correction: turned down, its class weakens where it fires;
   turned up, its class strengthens elsewhere. Each verified latent gets an effect curve: its
   class's margin (and the share of images predicted as it) as the latent is set to `s` x its
   max on every patch.

>>> head = discovery.logit_slice(fidelity.classifier_head, 0, 4)   # the shapes ViT's colour head
>>> result = discovery.discover(site, head, attribution_source, verify_source, classes=COLOURS)
>>> [(c["name"], c["verified"]) for c in result["classes"]]

Long because it is one protocol, attribution to verified candidates, whose parts (the matched
baselines, the permutation test, Holm) are only meaningful together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from saejax import data
from saejax.analysis import interventions, segmentation
from saejax.analysis.site import Site, accepts_loose_arguments
from saejax.core.metrics import DENSE_FREQUENCY, FiringStats
from saejax.data.batching import gather_over_processes
from saejax.provenance import written_by

__all__ = ["OBJECTIVES", "AttributionScores", "Verification", "attribution_scores", "discover", "holm",
           "latent_attribution", "logit_slice", "margins", "paired_permutation_p", "site_attribution", "verify"]

OBJECTIVES = ("centred_logit", "logit", "log_prob")
CURVE_SCALES = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def logit_slice(head: Callable, start: int, stop: int) -> Callable:
    """`head`'s logits `[start, stop)`: one softmax head of a model trained with several (the
    shapes ViT's colour head is `logit_slice(classifier_head, 0, 4)`)."""
    return lambda tokens, pooled, logits: head(tokens, pooled, logits)[..., start:stop]


def _target_score(logits_BC: jax.Array, targets_B: jax.Array, objective: str) -> jax.Array:
    if objective == "centred_logit":  # blind to a shift of every logit, which changes no prediction
        scores = logits_BC - jnp.mean(logits_BC, axis=-1, keepdims=True)
    elif objective == "log_prob":
        scores = jax.nn.log_softmax(logits_BC, axis=-1)
    elif objective == "logit":
        scores = logits_BC
    else:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")
    return jnp.take_along_axis(scores, targets_B[:, None], axis=1)[:, 0]


@accepts_loose_arguments
def latent_attribution(site: Site, pixels: jax.Array, targets_B: jax.Array | None = None, *, head: Callable,
                       objective: str = "centred_logit") -> dict[str, jax.Array]:
    """Activation x gradient of each image's target score, per latent (pure; `site` passes
    through `jit` as an argument, `head` and `objective` are static).

    The patch residual at the site's layer is replaced by `decode(z) + error`, where `error` is
    the SAE's reconstruction error held constant, so the forward pass is exactly the clean one;
    the gradient of the target score with respect to `z` flows through the blocks after the
    layer and the head. Images do not interact in a ViT, so one backward pass of the summed
    scores gives every image's own gradient.

    Args:
        site: the backbone and the SAE at its block (`Site`).
        pixels: float [B, S, S, 3] from the backbone's preprocessing.
        targets_B: int [B] class of each image to explain; None (or -1 entries): the head's
            prediction.
        head: `(tokens, pooled, logits) -> [B, C]` class logits (see `saejax.fidelity`).
        objective: what is explained: "centred_logit" (the target's logit minus the mean logit,
            default), "logit" or "log_prob".

    Returns:
        `attribution` [B, F] (summed over patch tokens), `codes` [B, P, F], `logits` [B, C] of
        the clean forward pass, `targets` [B].
    """
    ae, sae_params, norm = site.ae, site.sae_params, site.norm
    encoded = site.encode_pixels(pixels)
    x_in, z = encoded["normalized"], encoded["codes"].astype(jnp.float32)  # [B, P, D], [B, P, F]
    error = x_in - ae.decode(sae_params, z)
    patches = range(*site.bb.layout.patches)

    def class_logits(codes):
        recon = ae.decode(sae_params, codes) + error
        raw = recon if norm is None else norm.invert(recon)
        out = site.finish(interventions.replace_tokens(raw, patches), encoded["at_layer"])
        return head(out["tokens"], out["pooled"], out["logits"]).astype(jnp.float32)

    logits, pullback = jax.vjp(class_logits, z)
    predicted = jnp.argmax(logits, axis=-1)
    targets = predicted if targets_B is None else jnp.where(targets_B < 0, predicted, targets_B.astype(jnp.int32))
    cotangent = jax.grad(lambda lg: jnp.sum(_target_score(lg, targets, objective)))(logits)
    (dz,) = pullback(cotangent)
    return {"attribution": (z * dz).sum(1), "codes": z, "logits": logits, "targets": targets}


@flax.struct.dataclass
class AttributionScores:
    """Per-class attribution sums and per-latent firing statistics, streamed (a pytree).

    Attributes:
        sums: [C, F] attribution summed over the images whose target is each class.
        images: [C] images per class.
        firing: the latents' `saejax.metrics.FiringStats` over the patches seen (`fires`,
            `activation_sums`, `maxes` and `patches` read its fields).
    """

    sums: jax.Array
    images: jax.Array
    firing: FiringStats

    @classmethod
    def zeros(cls, n_classes: int, d_sae: int) -> AttributionScores:
        return cls(jnp.zeros((n_classes, d_sae), jnp.float32), jnp.zeros((n_classes,), jnp.float32),
                   FiringStats.zeros(d_sae))

    def update(self, attribution_BF: jax.Array, targets_B: jax.Array, codes_BPF: jax.Array,
               valid_B: jax.Array | None = None) -> AttributionScores:
        """Add a batch (`valid_B`: 1 for a real image, 0 for padding)."""
        valid = jnp.ones(targets_B.shape, jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)
        onehot = jax.nn.one_hot(targets_B, self.sums.shape[0], dtype=jnp.float32) * valid[:, None]  # [B, C]
        b, p, f = codes_BPF.shape
        firing = self.firing.update(codes_BPF.reshape(b * p, f), jnp.repeat(valid, p))
        return AttributionScores(self.sums + onehot.T @ attribution_BF, self.images + onehot.sum(0), firing)

    fires = property(lambda self: self.firing.counts)  # [F] patches where each latent fired
    activation_sums = property(lambda self: self.firing.sums)  # [F] its summed activation
    maxes = property(lambda self: self.firing.maxes)  # [F] its largest activation
    patches = property(lambda self: self.firing.n_inputs)  # patches seen

    def mean(self) -> jax.Array:
        """[C, F] mean attribution per image of each class (0 for a class with no images)."""
        return self.sums / jnp.maximum(self.images, 1)[:, None]

    def frequency(self) -> jax.Array:
        """[F] share of patches where each latent fired."""
        return self.firing.frequency()

    def candidates(self, n: int, *, max_frequency: float = DENSE_FREQUENCY) -> tuple[np.ndarray, np.ndarray]:
        """The `n` latents with the largest positive mean attribution per class, among those that
        fired and fire on less than `max_frequency` of patches (dense ones say little about any
        class). Returns `(ids int [C, n], scores [C, n])`; -1 / nan pad a class with fewer
        positive ones."""
        mean, frequency = np.asarray(self.mean()), np.asarray(self.frequency())
        eligible = (frequency > 0) & (frequency < max_frequency)
        ranked = np.where(eligible[None] & (mean > 0), mean, -np.inf)
        order = np.argsort(-ranked, axis=1, kind="stable")[:, :n]
        scores = np.take_along_axis(ranked, order, 1)
        return np.where(np.isfinite(scores), order, -1), np.where(np.isfinite(scores), scores, np.nan)


_update_scores = jax.jit(AttributionScores.update)


def _merge_over_processes(scores: AttributionScores) -> AttributionScores:
    if jax.process_count() == 1:
        return scores
    from jax.experimental import multihost_utils  # noqa: PLC0415

    every = jax.tree.map(np.asarray, multihost_utils.process_allgather(scores))  # leading axis: processes
    return AttributionScores(every.sums.sum(0), every.images.sum(0), every.firing.reduce())


# One compiled pass per (site structure, head, objective, shape), however many calls.
_jitted_attribution = jax.jit(latent_attribution, static_argnames=("head", "objective"))


def site_attribution(site: Site, head: Callable, images, targets_B=None, *,
                     objective: str = "centred_logit") -> dict[str, jax.Array]:
    """`latent_attribution` of uint8 `images` at `site` (jitted; `targets_B` None or -1: the
    head's prediction)."""
    targets = np.full(len(images), -1, np.int32) if targets_B is None else np.asarray(targets_B, np.int32)
    return _jitted_attribution(site, site.pixels(images), jnp.asarray(targets), head=head, objective=objective)


def _targets_of(batch, targets: str | Callable) -> np.ndarray:
    if targets == "prediction":
        return np.full(len(batch.ids), -1, np.int32)
    if targets == "label":
        if batch.labels is None:
            raise ValueError("targets='label', but the source has no labels; use targets='prediction'")
        return np.asarray(batch.labels, np.int32)
    if callable(targets):
        return np.asarray(targets(batch), np.int32)
    raise ValueError(f"targets {targets!r}: expected 'prediction', 'label' or a function of a batch")


def attribution_scores(site: Site, head: Callable, source: data.Source, *, n_classes: int, limit: int | None = None,
                       batch_size: int = 64, objective: str = "centred_logit",
                       targets: str | Callable = "prediction") -> AttributionScores:
    """`latent_attribution` streamed over the first `limit` images of `source` (each process
    reads its share; the sums are merged, so every process returns the same scores).

    `targets`: "prediction" (explain what the head predicts), "label" (the source's labels) or
    a function `batch -> int [B]` (e.g. the colour of the largest object in the shapes world).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")
    scores = AttributionScores.zeros(n_classes, site.ae.d_sae)
    for batch in data.process_share(source, batch_size, limit):
        if not len(batch.ids):
            continue
        out = site_attribution(site, head, batch.images, _targets_of(batch, targets), objective=objective)
        if out["logits"].shape[-1] != n_classes:
            raise ValueError(f"the head gives {out['logits'].shape[-1]} logits, but n_classes={n_classes}")
        scores = _update_scores(scores, out["attribution"], out["targets"], out["codes"])
    scores = _merge_over_processes(scores)
    if float(np.sum(np.asarray(scores.images))) == 0:
        raise ValueError(f"attribution_scores: {source!r} gave no images")
    return jax.tree.map(np.asarray, scores)


@dataclasses.dataclass(frozen=True)
class Verification:
    """How candidates are tested (see the module docstring).

    Attributes:
        suppress_scale: a candidate is set to this x its max where it fires, on images of its class.
        amplify_scale: ... and to this x its max on every patch, on the other images.
        draws: random latents (matched in firing frequency) and random directions per edit.
        permutations: sign flips in each permutation test; None: 10,000, or more where the
            number of edits needs them (2 x edits / alpha, so the smallest p survives Holm).
        alpha: significance level after Holm's correction.
        max_frequency: latents firing on at least this share of patches are dense: never
            candidates, never baselines. 0.1 by default; the paper's browser calls 1% dense,
            which here would exclude whole concepts of a small world (each colour of the shapes
            world covers 5-8% of its patches).
        curve_scales: the latent values (x its max, on every patch) of the effect curves.
        seed: seeds the baselines' draws and the permutations.
    """

    suppress_scale: float = -2.0
    amplify_scale: float = 2.0
    draws: int = 3
    permutations: int | None = None
    alpha: float = 0.01
    max_frequency: float = 0.1
    curve_scales: tuple[float, ...] = CURVE_SCALES
    seed: int = 0


def margins(logits_NC: np.ndarray, classes) -> np.ndarray:
    """Each row's logit of `classes[n]` minus its largest other logit (> 0: that class is predicted)."""
    logits_NC = np.asarray(logits_NC, np.float64)
    classes = np.broadcast_to(np.asarray(classes), logits_NC.shape[:1])
    own = np.take_along_axis(logits_NC, classes[:, None], 1)[:, 0]
    others = logits_NC.copy()
    np.put_along_axis(others, classes[:, None], -np.inf, 1)
    return own - others.max(1)


def paired_permutation_p(effect_N: np.ndarray, baseline_N: np.ndarray, *, permutations: int, rng) -> float:
    """One-sided p-value that `effect` exceeds `baseline` on the same items: the mean paired
    difference against `permutations` random sign flips of the differences (the observed
    arrangement counted, so p >= 1 / (permutations + 1)). 1.0 for no items."""
    diff = np.asarray(effect_N, np.float64) - np.asarray(baseline_N, np.float64)
    if diff.size == 0:
        return 1.0
    observed, as_extreme = diff.mean(), 0
    for start in range(0, permutations, 10_000):  # in chunks: [chunk, N] signs at a time
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(10_000, permutations - start), diff.size))
        # A null mean equal to the observed one (every difference 0) counts as "as extreme".
        as_extreme += int(np.sum(signs @ diff / diff.size >= observed - 1e-12 * max(1.0, abs(observed))))
    return float((1 + as_extreme) / (1 + permutations))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def _matched_latents(latent: int, frequency: np.ndarray, exclude: set[int], draws: int, max_frequency: float,
                     rng) -> np.ndarray:
    """`draws` random live, non-dense latents among the 4 x draws nearest to `latent` in log frequency."""
    pool = np.flatnonzero((frequency > 0) & (frequency < max_frequency))
    pool = pool[~np.isin(pool, list(exclude | {latent}))]
    if pool.size < draws:
        raise ValueError(f"only {pool.size} other live, non-dense latents to draw {draws} random baselines from")
    distance = np.abs(np.log(frequency[pool]) - np.log(frequency[latent]))
    nearest = pool[np.argsort(distance, kind="stable")[:4 * draws]]
    return rng.choice(nearest, draws, replace=False)


class _Edits:
    """The edits of a verification, built once (every SAE edit shares one compiled pass)."""

    def __init__(self, site: Site, scores: AttributionScores, settings: Verification):
        self.site, self.settings = site, settings
        t = site.bb.layout.n_tokens
        mask = np.zeros(t, bool)
        mask[slice(*site.bb.layout.patches)] = True
        self.patch_mask = jnp.asarray(mask)
        self.maxes, self.frequency = np.asarray(scores.maxes), np.asarray(scores.frequency())
        fires = np.maximum(np.asarray(scores.fires), 1)
        self.mean_active = np.asarray(scores.activation_sums) / fires  # mean activation where it fires
        self.mean_all = np.asarray(scores.activation_sums) / max(float(scores.patches), 1.0)
        scalar = 1.0 if site.norm is None else float(site.norm.scalar)
        self.decoder_norms = np.linalg.norm(np.asarray(site.sae_params.w_dec), axis=1) * scalar

    def latent(self, latent: int, kind: str, scale: float | None = None):
        s = self.settings
        value = (scale if scale is not None else s.suppress_scale if kind == "suppress" else s.amplify_scale)
        return self.site.edit(interventions.set_to(latent, value * float(self.maxes[latent]), self.patch_mask,
                                                   where_active=kind == "suppress"))

    def direction(self, latent: int, kind: str, direction: np.ndarray):
        """A unit `direction` moved as far as the latent's edit moves a token, on the same tokens."""
        s, m = self.settings, float(self.maxes[latent])
        if kind == "suppress":  # |v - f| = |v| + f where it fires (v < 0)
            distance = (abs(s.suppress_scale) * m + self.mean_active[latent]) * self.decoder_norms[latent]
            return interventions.DirectionWhereFiring(self.latent(latent, kind), jnp.asarray(latent),
                                                      jnp.asarray(direction, jnp.float32),
                                                      jnp.asarray(distance, jnp.float32), self.patch_mask)
        distance = abs(s.amplify_scale * m - self.mean_all[latent]) * self.decoder_norms[latent]
        return interventions.direction_edit(direction, distance, self.patch_mask)


def _edited_logits(site: Site, head: Callable, edits: Sequence, source: data.Source, limit: int, batch_size: int):
    """Clean logits [N, C] and the logits after each edit [E, N, C] on the first `limit`
    images (each process its share, gathered in id order)."""
    capture = jax.jit(lambda pixels: site.bb.forward(site.bb_params, pixels, capture=(site.layer,),
                                                     full=False).captured[site.layer])

    @jax.jit
    def finish(edit, at_layer):
        return head(*site.bb.finish(site.bb_params, edit(at_layer), site.layer)).astype(jnp.float32)

    identity = interventions.direction_edit(np.zeros(site.bb.d_model, np.float32), 0.0)
    ids, clean, edited = [], [], []
    for batch in data.process_share(source, batch_size, limit):
        if not len(batch.ids):
            continue
        at_layer = capture(site.pixels(batch.images))
        ids.append(batch.ids)
        clean.append(np.asarray(finish(identity, at_layer)))
        edited.append(np.stack([np.asarray(finish(edit, at_layer)) for edit in edits], 1) if edits else
                      np.zeros((len(batch.ids), 0, clean[-1].shape[-1]), np.float32))
    if not ids:
        raise ValueError(f"verify: {source!r} gave no images")
    _, clean, edited = gather_over_processes(np.concatenate(ids), np.concatenate(clean), np.concatenate(edited))
    return clean, np.moveaxis(edited, 1, 0)


def verify(site: Site, head: Callable, source: data.Source, candidates: Mapping[int, Sequence[int]],
           scores: AttributionScores, *, limit: int = 500, batch_size: int = 64,
           settings: Verification = Verification()) -> dict[str, Any]:
    """Test `candidates` (`{class: [latent, ...]}`) by intervention on the first `limit` images
    of `source` (not the images they were ranked on); see the module docstring.

    The images of a class are those the head predicts as that class before any edit.

    Returns:
        `{"images": images tested, "classes": {class: [candidate, ...]}}`, each candidate
        `{"latent", "suppress": {...}, "amplify":
        {...}, "verified", "curve"}`. An edit's entry: `effect` (mean margin change on its
        images: the class's margin lost for "suppress", gained for "amplify"),
        `random_latent` / `random_direction` (the baselines' mean effects, with their
        `latents`), `p_random_latent`, `p_random_direction`, `p` (the larger), `p_adjusted`
        (Holm), `images`, and change rates: `target_change_rate` / `other_change_rate` for
        "suppress" (images of the class whose prediction changed / other images whose
        prediction changed), `flip_rate` for "amplify" (other images now predicted as the
        class). `curve` (a verified latent's, else None): at each of `scales`, the class's mean
        margin on its images and on the others (`class_margin`, `other_margin`) and the share
        of each predicted as the class (`class_share`, `other_share`).
    """
    rng = np.random.default_rng(settings.seed)
    edits, plan = _Edits(site, scores, settings), []
    for c, latents in candidates.items():
        for latent in latents:
            latent = int(latent)
            interventions.check_latent_ids(interventions.set_to(latent, 0.0), site.ae.d_sae)
            for kind in ("suppress", "amplify"):
                others = _matched_latents(latent, edits.frequency, {int(x) for x in latents}, settings.draws,
                                          settings.max_frequency, rng)
                directions = rng.standard_normal((settings.draws, site.bb.d_model))
                directions /= np.linalg.norm(directions, axis=1, keepdims=True)
                plan.append({"class": int(c), "latent": latent, "kind": kind, "others": others,
                             "edits": [edits.latent(latent, kind)] + [edits.latent(int(o), kind) for o in others]
                             + [edits.direction(latent, kind, d) for d in directions]})
    permutations = settings.permutations or max(10_000, int(np.ceil(2 * len(plan) / settings.alpha)))
    if plan and len(plan) / (permutations + 1) >= settings.alpha:
        raise ValueError(f"{permutations} permutations cannot make any of {len(plan)} edits significant at "
                         f"alpha={settings.alpha} after Holm's correction (the smallest p is 1 / (permutations + 1), "
                         f"times {len(plan)}); use at least {int(np.ceil(len(plan) / settings.alpha))} permutations")
    clean, after = _edited_logits(site, head, [e for p in plan for e in p["edits"]], source, limit, batch_size)
    predicted = clean.argmax(1)
    results: dict[int, list[dict]] = {int(c): [] for c in candidates}
    by_latent: dict[tuple[int, int], dict] = {}
    position, p_values = 0, []
    for p in plan:
        c, kind, n = p["class"], p["kind"], len(p["edits"])
        logits = after[position:position + n]
        position += n
        images = predicted == c if kind == "suppress" else predicted != c
        before = margins(clean[images], c)
        effect = [(before - margins(lg[images], c)) * (1 if kind == "suppress" else -1) for lg in logits]
        random_latent = np.mean(effect[1:1 + settings.draws], 0) if images.any() else np.zeros(0)
        random_direction = np.mean(effect[1 + settings.draws:], 0) if images.any() else np.zeros(0)
        p_latent = paired_permutation_p(effect[0], random_latent, permutations=permutations, rng=rng)
        p_direction = paired_permutation_p(effect[0], random_direction, permutations=permutations, rng=rng)
        entry = {"images": int(images.sum()), "effect": _mean(effect[0]),
                 "random_latent": {"latents": p["others"].tolist(), "effect": _mean(random_latent)},
                 "random_direction": {"effect": _mean(random_direction)},
                 "p_random_latent": p_latent, "p_random_direction": p_direction, "p": max(p_latent, p_direction)}
        after_pred = logits[0].argmax(1)
        if kind == "suppress":
            rates = segmentation.change_rates(predicted, after_pred, predicted, c)
            entry.update(target_change_rate=rates["target_change_rate"], other_change_rate=rates["other_change_rate"])
        else:
            entry["flip_rate"] = _mean(after_pred[images] == c)
        p_values.append(entry["p"])
        key = (c, p["latent"])
        if key not in by_latent:
            by_latent[key] = {"latent": p["latent"]}
            results[c].append(by_latent[key])
        by_latent[key][kind] = entry
    for entry, adjusted in zip((e[k] for e in by_latent.values() for k in ("suppress", "amplify")),
                               holm(p_values) if p_values else []):
        entry["p_adjusted"] = float(adjusted)
    for candidate in by_latent.values():
        candidate["verified"] = all(candidate[k]["p_adjusted"] < settings.alpha for k in ("suppress", "amplify"))
    _add_curves(site, head, source, limit, batch_size, edits, results, predicted, settings)
    return {"images": len(clean), "classes": results, "permutations": permutations}


def _add_curves(site, head, source, limit, batch_size, edits: _Edits, results, predicted, settings):
    verified = [(c, cand) for c, cands in results.items() for cand in cands if cand["verified"]]
    curve_edits = [edits.latent(cand["latent"], "amplify", s) for _, cand in verified for s in settings.curve_scales]
    _, after = _edited_logits(site, head, curve_edits, source, limit, batch_size) if curve_edits else (None, None)
    n = len(settings.curve_scales)
    for candidate in (cand for cands in results.values() for cand in cands):
        candidate["curve"] = None
    for i, (c, cand) in enumerate(verified):
        logits = after[i * n:(i + 1) * n]  # [S, N, C]
        own, others = predicted == c, predicted != c
        cand["curve"] = {"scales": list(settings.curve_scales),
                         "class_margin": [_mean(margins(lg[own], c)) for lg in logits],
                         "other_margin": [_mean(margins(lg[others], c)) for lg in logits],
                         "class_share": [_mean(lg[own].argmax(-1) == c) for lg in logits],
                         "other_share": [_mean(lg[others].argmax(-1) == c) for lg in logits]}


def _mean(values) -> float | None:
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else None


def discover(site: Site, head: Callable, source: data.Source, verify_source: data.Source, *,
             classes: Sequence[str], images: int | None = None, verify_images: int = 500, candidates: int = 5,
             batch_size: int = 64, objective: str = "centred_logit", targets: str | Callable = "prediction",
             settings: Verification = Verification()) -> dict[str, Any]:
    """Rank latents by attribution on `source`, verify the top `candidates` per class on
    `verify_source`; returns what `discovery.json` holds.

    Args:
        site: the SAE at its block; head: `(tokens, pooled, logits) -> [B, C]` class logits.
        source: the images latents are ranked on (the first `images`; None: all).
        verify_source: other images, the first `verify_images` of which test the candidates.
        classes: the head's class names, in its order.
        candidates: latents tested per class.
        objective, targets: see `latent_attribution` and `attribution_scores`.
        settings: the verification protocol.

    Returns:
        `{"classes": [{"index", "name", "images", "candidates": [...], "verified": [latent
        ids]}], "settings", "objective", "targets", "images", "verify_images",
        "dense_excluded"}`; each candidate holds its `score` (mean attribution per image of its
        class), `frequency` and `max_activation`, plus `verify`'s results.
    """
    scores = attribution_scores(site, head, source, n_classes=len(classes), limit=images, batch_size=batch_size,
                                objective=objective, targets=targets)
    ids, values = scores.candidates(candidates, max_frequency=settings.max_frequency)
    chosen = {c: [int(i) for i in row if i >= 0] for c, row in enumerate(ids)}
    tested = verify(site, head, verify_source, chosen, scores, limit=verify_images, batch_size=batch_size,
                    settings=settings)
    frequency, maxes = np.asarray(scores.frequency()), np.asarray(scores.maxes)
    out = []
    for c, name in enumerate(classes):
        rows = tested["classes"].get(c, [])
        for row, score in zip(rows, values[c]):
            row.update(score=float(score), frequency=float(frequency[row["latent"]]),
                       max_activation=float(maxes[row["latent"]]))
        out.append({"index": c, "name": str(name), "images": int(scores.images[c]), "candidates": rows,
                    "verified": [row["latent"] for row in rows if row["verified"]]})
    return {"classes": out, "objective": objective, "targets": targets if isinstance(targets, str) else "custom",
            "images": int(np.sum(scores.images)), "verify_images": tested["images"],
            "dense_excluded": int(np.sum(np.asarray(scores.frequency()) >= settings.max_frequency)),
            "settings": dict(dataclasses.asdict(settings), permutations=tested["permutations"]),
            "written_by": written_by()}
