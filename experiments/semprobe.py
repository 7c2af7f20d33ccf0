"""The paper's semantic probing (CLIP vs DINOv2 concepts), with the baselines the reference
designed but never coded: a random-latent F1 distribution and a permutation p-value.

    python -m experiments.semprobe --config=experiments/configs/semprobe.py --workdir=DIR
    python -m experiments.semprobe --config=experiments/configs/semprobe.py:small --workdir=DIR

For each model (backbone + SAE + block) and each concept (its positives and the shared
negatives): every latent's activation summed over an image's patches says "present" when above
0; F1 per latent; the top 5 latents; the p-value of the best F1 against shuffled labels; the F1
of random live latents. Writes `DIR/semprobe.json` (`{"concepts": {concept: {model: ...}},
"skipped_images": {"count", "files"}}`; `--config.data.skip_unreadable=True` skips unreadable
files instead of stopping), `DIR/semprobe.csv` (concepts x models:
best latent, F1, p-value, random-latent mean and 95th percentile) and
`DIR/exemplars_<model>_<concept>.png` (the best latent's top images, patches tinted by its
activation). The logic is `saejax.semprobe`.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.paper_builders import build_backbone, build_sae, ensure_tiny_tree, run_binary, skipped_report
from saejax import data, probe_edits, semprobe, viz
from saejax.datasets import concept_folders


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    root = ensure_tiny_tree(config.data, lambda r: concept_folders.write_tiny_tree(r, **config.data.get("tiny_tree", {})))
    source = concept_folders.source(root, image_size=config.data.image_size,
                                    skip_unreadable=config.data.get("skip_unreadable", False))
    table, rows = {}, []
    for m, (name, model) in enumerate(config.models.items()):
        bb, bb_params = build_backbone(model.backbone)
        ae, sae_params, norm = build_sae(model.sae, bb.d_model)
        readout = probe_edits.Readout(bb, bb_params, layer=model.layer, ae=ae, sae_params=sae_params, norm=norm,
                                      processing=probe_edits.cropped_processing(bb, config.data.image_size))
        passes = [(b.ids, np.asarray(semprobe.image_sums(readout.encode(b.images)["codes"])))
                  for b in data.one_pass(source, config.batch_size)]
        ids = np.concatenate([i for i, _ in passes])  # the readable images; unreadable ones are left out
        sums, labels = np.concatenate([s for _, s in passes]), source.labels[ids]
        for c, concept in enumerate(source.classes[1:], start=1):
            subset = (labels == c) | (labels == 0)
            result = semprobe.score_concept(jnp.asarray(sums[subset]), jnp.asarray(labels[subset] == c),
                                            jax.random.fold_in(jax.random.key(config.seed), 1000 * m + c),
                                            top=config.top, n_permutations=config.n_permutations,
                                            n_random=config.n_random)
            random_f1 = np.asarray(result["random_f1"])
            entry = {"latents": np.asarray(result["latents"]).tolist(), "f1": np.asarray(result["f1"]).tolist(),
                     "p_value": float(result["p_value"]), "random_f1_mean": float(random_f1.mean()),
                     "random_f1_p95": float(np.percentile(random_f1, 95)), "positives": int(np.sum(labels == c)),
                     "negatives": int(np.sum(labels == 0))}
            table.setdefault(concept, {})[name] = entry
            rows.append([concept, name, entry["latents"][0], entry["f1"][0], entry["p_value"],
                         entry["random_f1_mean"], entry["random_f1_p95"]])
            _exemplars(readout, source, ids[subset], entry["latents"][0], config,
                       os.path.join(workdir, f"exemplars_{name}_{concept}.png"))
            print(f"{concept:>16} {name:>10}: latent {entry['latents'][0]:>6} F1 {entry['f1'][0]:.2f} "
                  f"(p = {entry['p_value']:.3g}; random latents {entry['random_f1_mean']:.2f}, 95th pct "
                  f"{entry['random_f1_p95']:.2f})", flush=True)
    json.dump({"concepts": table, "skipped_images": skipped_report(concepts=source)["concepts"]},
              open(os.path.join(workdir, "semprobe.json"), "w"), indent=2)
    with open(os.path.join(workdir, "semprobe.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["concept", "model", "best_latent", "f1", "p_value", "random_f1_mean", "random_f1_p95"])
        writer.writerows(rows)
    return table


def _exemplars(readout, source, candidates, latent, config, path):
    """The latent's top images among `candidates` (by its max over patches), tinted where it fires."""
    images = np.stack([source[int(i)].image for i in candidates])
    codes = np.asarray(readout.encode(images)["codes"][..., latent])  # [N, P]
    order = np.argsort(-codes.max(axis=1))[: config.exemplars]
    vmax = max(float(codes.max()), 1e-6)
    grid = readout.bb.grid
    tiles = [viz.highlight_patches(images[i], codes[i].reshape(grid), vmax, scale=max(1, 96 // images.shape[1]))
             for i in order]
    open(path, "wb").write(viz.png_bytes(viz.tile(tiles, columns=min(len(tiles), 8))))


if __name__ == "__main__":
    run_binary(run, "experiments/configs/semprobe.py")
