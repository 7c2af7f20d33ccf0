"""The paper's semantic probing (CLIP vs DINOv2 concepts), with the baselines the reference
designed but never coded: a random-latent F1 distribution and a permutation p-value.


For each model (backbone + SAE + block) and each concept (its positives and the shared
negatives): every latent's activation summed over an image's patches says "present" when above
0; F1 per latent; the top 5 latents; the p-value of the best F1 against shuffled labels; the F1
of random live latents. Writes `semprobe.json` (`{"concepts": {concept: {model: ...}},
"skipped_images": {"count", "files"}}`; a source with `skip_unreadable=True` skips unreadable
files instead of stopping), `semprobe.csv` (concepts x models:
best latent, F1, p-value, random-latent mean and 95th percentile) and
`exemplars_<model>_<concept>.png` (the best latent's top images, patches tinted by its
activation). The logic is `saejax.semprobe`.
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
from saejax.analysis import semprobe
from saejax.analysis.site import Site
from saejax.pages import viz
from saejax.provenance import written_by


def run_semprobe(sites: Mapping[str, Site], source: data.Source, workdir: str, *, top: int = 5,
                 n_permutations: int = 1000, n_random: int = 100, exemplars: int = 8, batch_size: int = 64,
                 seed: int = 0) -> dict:
    """E1 for every named site over one concept source; see the module docstring. On several
    processes each reads its share of the images and the per-image sums are gathered, so
    every process scores the same table; process 0 writes the files.

    Args:
        sites: `{model name: Site}` (images already cropped by the source: `cropped_processing`).
        source: a concept-folder source (`saejax.datasets.concept_folders.source`): label 0 the
            shared negatives, 1.. the concepts (`source.classes`).
        top, n_permutations, n_random: `semprobe.score_concept` settings.
        exemplars: top images per best latent in its picture.

    Returns:
        `{concept: {model: entry}}`, as `semprobe.json`'s "concepts".
    """
    os.makedirs(workdir, exist_ok=True)
    table, rows = {}, []
    for m, (name, readout) in enumerate(sites.items()):
        # Each process sums its share of the images; the sums of all processes are put together.
        passes = [(b.ids, np.asarray(semprobe.image_sums(readout.encode(b.images)["codes"])))
                  for b in data.process_share(source, batch_size) if len(b.ids)]
        ids = np.concatenate([i for i, _ in passes])  # the readable images; unreadable ones are left out
        sums = np.concatenate([s for _, s in passes])
        ids, sums = data.gather_over_processes(ids, sums)
        labels = source.labels[ids]
        for c, concept in enumerate(source.classes[1:], start=1):
            subset = (labels == c) | (labels == 0)
            result = semprobe.score_concept(jnp.asarray(sums[subset]), jnp.asarray(labels[subset] == c),
                                            jax.random.fold_in(jax.random.key(seed), 1000 * m + c),
                                            top=top, n_permutations=n_permutations,
                                            n_random=n_random)
            random_f1 = np.asarray(result["random_f1"])
            entry = {"latents": np.asarray(result["latents"]).tolist(), "f1": np.asarray(result["f1"]).tolist(),
                     "p_value": float(result["p_value"]), "random_f1_mean": float(random_f1.mean()),
                     "random_f1_p95": float(np.percentile(random_f1, 95)), "positives": int(np.sum(labels == c)),
                     "negatives": int(np.sum(labels == 0))}
            table.setdefault(concept, {})[name] = entry
            rows.append([concept, name, entry["latents"][0], entry["f1"][0], entry["p_value"],
                         entry["random_f1_mean"], entry["random_f1_p95"]])
            if jax.process_index() == 0:
                _exemplars(readout, source, ids[subset], entry["latents"][0], exemplars,
                           os.path.join(workdir, f"exemplars_{name}_{concept}.png"))
            print(f"{concept:>16} {name:>10}: latent {entry['latents'][0]:>6} F1 {entry['f1'][0]:.2f} "
                  f"(p = {entry['p_value']:.3g}; random latents {entry['random_f1_mean']:.2f}, 95th pct "
                  f"{entry['random_f1_p95']:.2f})", flush=True)
    skipped = _skipped_on_every_process(source)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "semprobe.json"), "w") as f:
            json.dump({"concepts": table, "skipped_images": skipped, "written_by": written_by()}, f, indent=2)
        with open(os.path.join(workdir, "semprobe.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["concept", "model", "best_latent", "f1", "p_value", "random_f1_mean", "random_f1_p95"])
            writer.writerows(rows)
    return table


def _skipped_on_every_process(source: data.Source) -> dict:
    """`data.skipped_report` of the images any process skipped (each knows only its share)."""
    if jax.process_count() == 1:
        return data.skipped_report(concepts=source)["concepts"]
    every = data.gather_over_processes(np.asarray(sorted(source.skipped), np.int64))[0].tolist()
    return {"count": len(every), "files": [source.describe(i) + ": " + source.skipped.get(i, "unreadable (read by "
                                           "another process)") for i in every]}


def _exemplars(readout, source, candidates, latent, count, path):
    """The latent's top images among `candidates` (by its max over patches), tinted where it fires."""
    images = np.stack([source[int(i)].image for i in candidates])
    codes = np.asarray(readout.encode(images)["codes"][..., latent])  # [N, P]
    order = np.argsort(-codes.max(axis=1))[:count]
    vmax = max(float(codes.max()), 1e-6)
    grid = readout.bb.grid
    tiles = [viz.highlight_patches(images[i], codes[i].reshape(grid), vmax, scale=max(1, 96 // images.shape[1]))
             for i in order]
    with open(path, "wb") as f:
        f.write(viz.png_bytes(viz.tile(tiles, columns=min(len(tiles), 8))))
