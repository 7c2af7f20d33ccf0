"""Per-patch read-outs and the change-rate protocol: what a residual edit does to a probe's
predictions, patch by patch (the paper's quantitative test; the shapes demo uses it too).

- `segmentation_metrics`: logits on the patch grid, bilinearly upsampled to pixels -> mIoU and
  pixel accuracy, ignoring one label.
- `change_rates`: before/after predictions per patch -> the fraction of the target class's
  patches that changed, and of the other patches.
- `best_f1_latent`: the latent whose firing best matches a class's patches, at a threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["best_f1_latent", "change_rates", "patch_f1", "segmentation_metrics", "upsample_logits"]


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
    pred, labels = np.asarray(pred_NHW).ravel(), np.asarray(labels_NHW).ravel()
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


def patch_f1(codes_NF: jax.Array, present_N: jax.Array, threshold: float = 0.0) -> jax.Array:
    """[F] patch-level F1 of "latent > threshold" against a class's patches."""
    fires, present = (codes_NF > threshold).astype(jnp.float32), present_N.astype(jnp.float32)[:, None]
    tp = jnp.sum(fires * present, axis=0)
    return 2 * tp / jnp.maximum(jnp.sum(fires, axis=0) + jnp.sum(present), 1.0)


def best_f1_latent(codes_NF: jax.Array, present_N: jax.Array, thresholds=(0.0, 0.1, 0.3, 1.0)) -> tuple[int, float, float]:
    """`(latent, f1, threshold)`: the best patch-level F1 for a class over `thresholds`."""
    best = (-1, -1.0, 0.0)
    for threshold in thresholds:
        f1 = np.asarray(jax.jit(patch_f1)(codes_NF, present_N, threshold))
        i = int(np.argmax(f1))
        if f1[i] > best[1]:
            best = (i, float(f1[i]), float(threshold))
    return best
