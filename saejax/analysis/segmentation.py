"""Per-patch read-outs and the change-rate protocol: what a residual edit does to a probe's
predictions, patch by patch (the paper's quantitative test; the shapes demo uses it too).

- `segmentation_metrics`: logits on the patch grid, bilinearly upsampled to pixels -> mIoU and
  pixel accuracy, ignoring one label.
- `change_rates`: before/after predictions per patch -> the fraction of the target class's
  patches that changed, and of the other patches.
- `best_f1_latent`: the latent whose firing best matches a class's patches, at a threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis.features import ConceptF1

__all__ = ["best_f1_latent", "change_rates", "mean_change_norm", "quantitative_test", "segmentation_metrics",
           "summarize_change_rates", "upsample_logits"]


def upsample_logits(logits_NhwK: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[N, gh, gw, K] patch-grid logits -> [N, H, W, K], bilinear (half-pixel centres, as
    `torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`)."""
    n, _, _, k = logits_NhwK.shape
    return jax.image.resize(logits_NhwK, (n, *size, k), method="bilinear", antialias=False)


def segmentation_metrics(pred_NHW, labels_NHW, n_classes: int, *, ignore: int | None = 0) -> dict:
    """mIoU and pixel accuracy of predicted labels against true ones (numpy, any N).

    Pixels labelled `ignore` count for nothing; mIoU averages over the classes (other than
    `ignore`) that appear in the labels or the predictions.

    Returns:
        `{"miou", "pixel_accuracy", "iou": [n_classes] (nan for absent classes)}`.
    """
    pred, labels = np.asarray(pred_NHW).ravel().astype(np.int64), np.asarray(labels_NHW).ravel().astype(np.int64)
    keep = labels != ignore if ignore is not None else np.ones_like(labels, bool)
    pred, labels = pred[keep], labels[keep]
    confusion = np.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    if ignore is not None:
        iou[ignore] = np.nan
    return {"miou": float(np.nanmean(iou)), "pixel_accuracy": float(tp.sum() / max(labels.size, 1)), "iou": iou}


def change_rates(before_N, after_N, labels_N, target: int, *, ignore: int | None = None,
                 background: int | None = None) -> dict[str, float]:
    """How an edit changed a probe's per-patch predictions (numpy, flat over patches).

    Args:
        before_N, after_N: predictions without and with the edit.
        labels_N: true patch labels.
        target: the class the edit is meant to change.
        ignore: a label whose patches count for nothing (ADE20K's 0), or None.
        background: also report the share of changed other patches now predicted as this
            class (`other_to_background`), or None.

    Returns:
        `target_change_rate` (changed patches of `target` / patches of `target`, nan when there
        are none) and `other_change_rate` (changed other patches / other patches).
    """
    before, after, labels = (np.asarray(a).ravel() for a in (before_N, after_N, labels_N))
    keep = labels != ignore if ignore is not None else np.ones_like(labels, bool)
    changed, is_target = (after != before)[keep], (labels == target)[keep]
    out = {"target_change_rate": float(changed[is_target].mean()) if is_target.any() else float("nan"),
           "other_change_rate": float(changed[~is_target].mean()) if (~is_target).any() else float("nan")}
    if background is not None:
        other_changed = changed & ~is_target
        out["other_to_background"] = float(np.mean(after[keep][other_changed] == background)) if other_changed.any() else 0.0
    return out


def best_f1_latent(codes_NF: jax.Array, present_N: jax.Array, thresholds=(0.0, 0.1, 0.3, 1.0)) -> tuple[int, float, float]:
    """`(latent, f1, threshold)`: the best patch-level F1 for a class over `thresholds` (the
    first threshold on ties; `features.ConceptF1` streams the same over batches)."""
    latent, f1, threshold = jax.device_get(_best_f1(codes_NF, present_N, tuple(float(t) for t in thresholds)))
    return int(latent[0]), float(f1[0]), float(thresholds[int(threshold[0])])


@functools.partial(jax.jit, static_argnums=2)
def _best_f1(codes_NF, present_N, thresholds):
    return ConceptF1.zeros(codes_NF.shape[1], 1, thresholds).update(codes_NF, present_N[:, None]).best()


def mean_change_norm(edit, resid_TD: jax.Array) -> float:
    """The mean norm of the change an edit makes to residual rows [T, D] (to match a random
    direction's norm to it)."""
    return float(jnp.mean(jnp.linalg.norm(edit(resid_TD[None])[0] - resid_TD, axis=-1)))


def quantitative_test(predict: Callable, labels_N, stats: ConceptF1, resid_ND, site, classes,
                      key, *, config_latents: Mapping[int, int] | None = None, value_scale: float = -2.0,
                      ignore: int | None = 0) -> list[dict]:
    """The paper's quantitative test, per class: pick a feature four ways, set it to
    `value_scale x its max` on all tokens and only where it fires, and measure change rates.

    Args:
        predict: `predict(edit or None) -> [N]` patch predictions over the evaluation images
            with the residual edit applied at the layer the codes come from (one layer for the
            search and the edit).
        labels_N: true patch labels (flat over images and patches).
        stats: a `features.ConceptF1` over the classes, of the SAE codes of the same patches at
            that layer (`update_labels`; the best-F1 search at its thresholds, and the max per
            latent that sets the edit values).
        resid_ND: raw residuals of some of those patches (to match the random direction's norm).
        site: the `Site` (the SAE at the block the codes come from and the edits go to).
        classes: the classes to test.
        key: randomness of the baselines.
        config_latents: `{class: latent}` named in the config (the fourth way).
        value_scale: the edit value in units of the latent's max (-2 in the paper).

    Returns:
        One dict per class: `class`, `patches`, and per method (`best_f1`, `random_latent`,
        `random_direction`, `config`) its feature (`latent`, `f1`, `threshold`) and the rates
        `all_tokens` and `where_active` (`change_rates`).
    """
    from saejax.analysis import interventions as iv  # noqa: PLC0415 - interventions imports nothing from here

    labels = np.asarray(labels_N)
    before = np.asarray(predict(None))
    maxima = np.asarray(stats.max)
    best_latent, best_f1, best_threshold = (np.asarray(a) for a in jax.device_get(stats.best()))
    live = np.flatnonzero(maxima > 0)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1])
    results = []

    def rates(edit, c):
        return change_rates(before, predict(edit), labels, c, ignore=ignore)

    def latent_rates(latent, c):
        value = value_scale * maxima[latent]
        every = site.edit(iv.set_to(int(latent), value))
        active = site.edit(iv.set_to(int(latent), value, where_active=True))
        return every, {"all_tokens": rates(every, c), "where_active": rates(active, c)}

    for c in classes:
        latent, f1, threshold = int(best_latent[c]), float(best_f1[c]), stats.thresholds[int(best_threshold[c])]
        best_edit, best = latent_rates(latent, c)
        entry = {"class": int(c), "patches": int(np.sum(labels == c)),
                 "best_f1": {"latent": latent, "f1": f1, "threshold": threshold, **best}}
        random_latent = int(rng.choice(live))
        entry["random_latent"] = {"latent": random_latent, **latent_rates(random_latent, c)[1]}
        direction = rng.standard_normal(resid_ND.shape[-1]).astype(np.float32)
        direction /= np.linalg.norm(direction)
        scale = mean_change_norm(best_edit, jnp.asarray(resid_ND))
        where = iv.DirectionWhereFiring(best_edit, jnp.asarray(latent), jnp.asarray(direction), jnp.asarray(scale))
        entry["random_direction"] = {"norm": scale, "all_tokens": rates(iv.direction_edit(direction, scale), c),
                                     "where_active": rates(where, c)}
        if config_latents and c in config_latents:
            entry["config"] = {"latent": int(config_latents[c]), **latent_rates(int(config_latents[c]), c)[1]}
        results.append(entry)
    return results


def summarize_change_rates(results: list[dict]) -> dict:
    """Mean and std over classes of each method's target and other change rates, per mode."""
    summary = {}
    for method in ("best_f1", "random_latent", "random_direction", "config"):
        rows = [r[method] for r in results if method in r]
        if not rows:
            continue
        summary[method] = {mode: {rate: {"mean": float(np.nanmean([row[mode][rate] for row in rows])),
                                         "std": float(np.nanstd([row[mode][rate] for row in rows]))}
                                  for rate in ("target_change_rate", "other_change_rate")}
                           for mode in ("all_tokens", "where_active")}
        summary[method]["classes"] = len(rows)
    return summary
