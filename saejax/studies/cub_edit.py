"""The paper's classification experiment (section 5.1) on CUB-200-2011: edit a bird's patches
through an SAE and watch a linear probe's class probabilities move.

1. A linear probe (200 classes) on the final CLS (after the final norm), trained on the train
   split with AdamW over a small lr x weight-decay sweep (`probes.select_probe`).
2. On one test image: the selected patches, the top latents summed over them (dense latents
   dropped; or the given `latents`), set to `slider x max` at the site's block, keeping the
   SAE error; the model finishes its pass; the probe reads the probabilities. One jitted,
   vmapped call gives the curve over all `sliders` (`probe_edits.slider_curve`).

Writes `probe.json`, `edit.json` and `edit.png` in the workdir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saejax import data
from saejax.analysis import probe_edits, probes
from saejax.analysis.site import Site
from saejax.pages import viz
from saejax.provenance import written_by


def pooled_features(site: Site, source: data.Source, batch_size: int, limit: int | None = None):
    """`(features [N, D], labels [N])`: the final pooled CLS of every readable image."""
    feats, labels = [], []
    for batch in data.one_pass(source, batch_size, limit=limit):
        feats.append(np.asarray(site.encode(batch.images)["pooled"]))
        labels.append(batch.labels)
    return np.concatenate(feats), np.concatenate(labels)


def run_cub_edit(site: Site, train: data.Source, test: data.Source, workdir: str, *, image: int,
                 patches: Sequence[int], probe_sweep: dict, latents: Sequence[int] = (), n_latents: int = 3,
                 dense_frequency: float = 1e-2, slider: float = -11.0, sliders: Sequence[float] = (-20.0, 0.0, 20.0),
                 stats_images: int | None = None, batch_size: int = 64) -> dict:
    """E2 on `test[image]`; see the module docstring.

    Args:
        site: the SAE at its block (images already cropped by the sources: `cropped_processing`).
        train, test: CUB's splits (`saejax.datasets.cub.source`), labelled.
        image, patches: the test image and the patch indices to edit (row-major over the grid).
        probe_sweep: keyword arguments of `probes.select_probe` (learning_rates, weight_decays,
            epochs, batch_size, seed).
        latents: the latents to edit; empty: propose the top `n_latents` over the patches,
            latents firing on more than `dense_frequency` of patches excluded.
        slider, sliders: the edit shown (`slider x max`) and the curve's values.
        stats_images: test images for the latents' frequencies and maxima (None: all).

    Returns:
        `{"probe", "edit", "before", "after", "curve"}`.
    """
    os.makedirs(workdir, exist_ok=True)
    bb, ae = site.bb, site.ae
    train_x, train_y = pooled_features(site, train, batch_size)
    test_x, test_y = pooled_features(site, test, batch_size)
    probe, probe_report = probes.select_probe(train_x, train_y, test_x, test_y, len(train.classes), **probe_sweep)
    probe_report["skipped_images"] = data.skipped_report(train=train, test=test)
    with open(os.path.join(workdir, "probe.json"), "w") as f:
        json.dump({**probe_report, "written_by": written_by()}, f, indent=2)
    print(f"probe: test accuracy {probe_report['test_accuracy']:.3f} (lr {probe_report['chosen']['learning_rate']}, "
          f"wd {probe_report['chosen']['weight_decay']})", flush=True)

    stats = probe_edits.latent_stats(site, (b.images for b in data.one_pass(test, batch_size, limit=stats_images)))
    example = test[image]
    one = example.image[None]
    mask = probe_edits.patch_token_mask(bb, patches)
    selected = np.zeros(bb.layout.n_patches, bool)
    selected[list(patches)] = True
    encoded = site.encode(one)
    codes = encoded["codes"][0]
    if len(latents):
        latents = np.asarray(latents, np.int64)
        probe_edits.check_choice(ae, latents)
    else:
        latents, _ = probe_edits.propose_latents(codes, jnp.asarray(selected), jnp.asarray(stats["frequency"]),
                                                 n=n_latents, dense_threshold=dense_frequency)
        latents = np.asarray(latents)
    maxima = stats["max"][latents]
    curve = probe_edits.slider_curve(site, probe)
    sliders = np.asarray(sliders, np.float32)
    probabilities = np.asarray(curve(site.pixels(one), jnp.asarray(mask), jnp.asarray(latents), jnp.asarray(maxima),
                                     jnp.asarray(np.append(sliders, slider))))
    before = np.asarray(jax.nn.softmax(probe.logits(encoded["pooled"][0])))
    after, curve_values = probabilities[-1], probabilities[:-1]
    names = train.classes

    def top(probs):
        return [{"class": names[k], "probability": float(probs[k])} for k in np.argsort(-probs)[:5]]

    watched = list(dict.fromkeys([*np.argsort(-before)[:3].tolist(), *np.argsort(-after)[:3].tolist()]))
    report = {"image": image, "path": test.describe(image), "label": names[int(example.label)],
              "patches": list(patches), "layer": site.layer,
              "latents": [{"latent": int(i), "frequency": float(stats["frequency"][i]), "max": float(stats["max"][i]),
                           "sum_over_patches": float(jnp.sum(jnp.where(jnp.asarray(selected), codes[:, i], 0)))}
                          for i in latents],
              "slider": slider, "before": top(before), "after": top(after),
              "curve": {"sliders": sliders.tolist(),
                        "probabilities": {names[k]: curve_values[:, k].tolist() for k in watched}}}
    with open(os.path.join(workdir, "edit.json"), "w") as f:
        json.dump({**report, "written_by": written_by()}, f, indent=2)
    png = viz.before_after_png(example.image, selected.reshape(bb.grid), before, after, names,
                               title=f"{report['path'].split(os.sep)[-1]}: latents {latents.tolist()} at "
                                     f"{slider:g} x max")
    with open(os.path.join(workdir, "edit.png"), "wb") as f:
        f.write(png)
    print(f"latents {latents.tolist()} at {slider:g} x max: " + ", ".join(
        f"{names[k]} {before[k]:.2f} -> {after[k]:.2f}" for k in watched), flush=True)
    return {"probe": probe_report, "edit": report, "before": before, "after": after, "curve": curve_values}
