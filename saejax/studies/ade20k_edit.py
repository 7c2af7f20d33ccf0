"""The paper's segmentation experiment (section 5.2) and its unfinished quantitative test.


1. A linear probe (151 classes) on the backbone's final patch tokens, trained on ADE20K
   training patches (label = the mode of the patch's pixels, "other" dropped). Validation mIoU
   over the 150 classes and pixel accuracy, with logits bilinearly upsampled to pixels.
2. For every class with enough validation patches, a feature picked four ways (a random unit
   direction of matched norm, a random live latent, the latent with the best patch-level F1
   at thresholds {0, 0.1, 0.3, 1}, a latent named in `class_latents`), set to -2 x its max on all
   tokens and only where it fires, at the one block the SAE reads. Target and other change
   rates per class, and their mean +- std over classes.

Writes `probe.json` (mIoU, pixel accuracy, per-class IoU), `quantitative.json` (per
class and summary) and `quantitative.csv`. The logic is `saejax.segmentation`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from saejax import data
from saejax.analysis import features, probes, segmentation
from saejax.analysis.site import Site
from saejax.datasets import ade20k
from saejax.provenance import written_by


def run_ade20k_edit(site: Site, train: data.Source, val: data.Source, workdir: str, *, probe: dict,
                    probe_images: int | None = None, eval_images: int | None = None, norm_sample_patches: int = 100_000,
                    min_patches: int = 1, class_latents: Mapping[int, int] | None = None, value_scale: float = -2.0,
                    batch_size: int = 64, probe_buffer_tokens: int = 2**18, seed: int = 0) -> dict:
    """E3; see the module docstring.

    Args:
        site: the SAE at its block (images already cropped by the sources: `cropped_processing`).
        train, val: ADE20K's splits (`saejax.datasets.ade20k.source`), with masks.
        probe: `probes.train_linear_probe` settings (epochs, batch_size, learning_rate, weight_decay).
        probe_buffer_tokens: the probe's shuffle buffer, in patch tokens: what it holds in memory
            (`probes.train_linear_probe_streamed`; the training images are encoded again every
            epoch instead of kept).
        probe_images, eval_images: training images for the probe, validation images for the
            rest (None: all).
        norm_sample_patches: validation residuals kept to match random directions' norms.
        min_patches: classes with fewer validation patches are not tested.
        class_latents: `{class: latent}` to test beside the searched ones.
        value_scale: the edit sets a latent to `value_scale x` its max.

    Returns:
        `{"probe", "summary", "classes"}`.
    """
    os.makedirs(workdir, exist_ok=True)
    readout, bb, ae = site, site.bb, site.ae
    size = bb.image_size
    patch = size // bb.grid[0]

    def patch_labels(batch):
        return data.patch_mode_labels(batch.masks, patch, ignore=ade20k.IGNORE).reshape(len(batch.ids), -1)

    # The probe trains on patch tokens encoded on the fly, every epoch, through a bounded buffer
    # (`probe_buffer_tokens` rows): memory does not grow with the training split.
    train_patches = []

    def token_chunks(epoch):
        for batch in data.one_pass(train, batch_size, limit=probe_images):
            x = np.asarray(readout.encode(batch.images)["tokens"]).reshape(-1, bb.d_model)
            y = patch_labels(batch).reshape(-1)
            keep = y != ade20k.IGNORE
            if epoch == 0:
                train_patches.append(int(keep.sum()))
            yield x[keep], y[keep]

    probe = probes.train_linear_probe_streamed(jax.random.key(seed), token_chunks, bb.d_model, ade20k.N_CLASSES,
                                               buffer_rows=probe_buffer_tokens, **probe)

    # Validation, streamed: pixel predictions for the metrics, the feature-search statistics, a
    # sample of residuals; only the images (uint8) and patch labels are kept for the edits.
    stats = features.ConceptF1.zeros(ae.d_sae, ade20k.N_CLASSES, thresholds=(0.0, 0.1, 0.3, 1.0))
    count = jax.jit(features.ConceptF1.update_labels)
    images, labels, masks, preds, resid = [], [], [], [], []
    for batch in data.one_pass(val, batch_size, limit=eval_images):
        out = readout.encode(batch.images)
        logits = probe.logits(out["tokens"]).reshape(len(batch.ids), *bb.grid, -1)
        preds.append(np.asarray(jnp.argmax(segmentation.upsample_logits(logits, (size, size)), -1)))
        batch_labels = patch_labels(batch)
        stats = count(stats, out["codes"].reshape(-1, ae.d_sae), jnp.asarray(batch_labels.reshape(-1)))
        if sum(len(r) for r in resid) < norm_sample_patches:
            resid.append(np.asarray(out["resid"]).reshape(-1, bb.d_model))
        images.append(batch.images)
        labels.append(batch_labels)
        masks.append(batch.masks)
    images, labels, masks = np.concatenate(images), np.concatenate(labels).reshape(-1), np.concatenate(masks)
    n = len(images)
    metrics = segmentation.segmentation_metrics(np.concatenate(preds), masks, ade20k.N_CLASSES, ignore=ade20k.IGNORE)
    probe_report = {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"],
                    "iou": {val.classes[c]: float(v) for c, v in enumerate(metrics["iou"]) if not np.isnan(v)},
                    "train_patches": sum(train_patches), "val_images": n,
                    "skipped_images": data.skipped_report(training=train, validation=val)}
    with open(os.path.join(workdir, "probe.json"), "w") as f:
        json.dump({**probe_report, "written_by": written_by()}, f, indent=2)
    print(f"probe: mIoU {metrics['miou']:.3f}, pixel accuracy {metrics['pixel_accuracy']:.3f} on {n} images", flush=True)

    def predict(edit):
        tokens = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            tokens.append(readout.encode(chunk)["tokens"] if edit is None else readout.edited(edit, chunk)["tokens"])
        return np.asarray(probes.predict(probe, jnp.concatenate(tokens).reshape(-1, bb.d_model)))

    counts = np.bincount(labels, minlength=ade20k.N_CLASSES)
    classes = [c for c in range(1, ade20k.N_CLASSES) if counts[c] >= min_patches]
    results = segmentation.quantitative_test(
        predict, labels, stats, np.concatenate(resid)[: norm_sample_patches],
        site, classes, jax.random.key(seed + 1),
        config_latents={int(k): int(v) for k, v in (class_latents or {}).items()}, value_scale=value_scale)
    summary = segmentation.summarize_change_rates(results)
    json.dump({"classes": results, "summary": summary, "class_names": {c: val.classes[c] for c in classes},
               "skipped_images": probe_report["skipped_images"], "written_by": written_by()},
              open(os.path.join(workdir, "quantitative.json"), "w"), indent=2, default=float)
    with open(os.path.join(workdir, "quantitative.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "name", "patches", "method", "latent", "mode", "target_change_rate",
                         "other_change_rate"])
        for r in results:
            for method in ("best_f1", "random_latent", "random_direction", "config"):
                if method in r:
                    for mode in ("all_tokens", "where_active"):
                        writer.writerow([r["class"], val.classes[r["class"]], r["patches"], method,
                                         r[method].get("latent", ""), mode, r[method][mode]["target_change_rate"],
                                         r[method][mode]["other_change_rate"]])
    for method, modes in summary.items():
        line = "  ".join(f"{mode}: target {v['target_change_rate']['mean']:.2f}+-{v['target_change_rate']['std']:.2f}"
                         f" other {v['other_change_rate']['mean']:.3f}+-{v['other_change_rate']['std']:.3f}"
                         for mode, v in modes.items() if mode != "classes")
        print(f"{method:>16} ({modes['classes']} classes)  {line}", flush=True)
    return {"probe": probe_report, "summary": summary, "classes": results}
