"""Which SAE finds the shapes world's concepts: architecture x k (or L1 coefficient) x dictionary
size, each scored as reconstruction (NMSE) against concept recovery (the mean over the 15
concepts of `shapes.FACTOR_CONCEPTS` of the best single latent's patch-level F1), with k-means and
PCA dictionaries of the same sizes on the same residuals as the reference points.

    python -m benchmarks.concepts --workdir=/tmp/saejax-demo                   # the demo's ViT (~6 min)
    python -m benchmarks.concepts --workdir=/tmp/demo-dinov2 --backbone=DIR    # a pretrained DINOv2
    pip install -e ".[bench]"   # matplotlib, for the PNG; without it only the table and JSON are written

Residuals of the SAE's block (the demo's: block 2 of the world's ViT, two thirds of the way up a
pretrained model) are harvested once for `--train_images` training images and 1,000 validation
images, normalised as the demo does (mean and scalar from the training residuals), and every
setting is trained on the same shuffled batches for `--steps` steps of `--batch` patch tokens
(the demo's budget: 1,500 x 1,024). The references are k-means with F centroids and PCA
keeping each patch's 4 or 16 largest coefficients. Matryoshka is BatchTopK with the nested-prefix loss
(prefixes F/8, F/4, F/2, F). ReLU uses the paper's L1 penalty.

Prints one row per setting (L0, NMSE, dead fraction, mean best-latent F1, and that F1 as a
ratio of the k-means reference of the same size measured in this run), writes
`<workdir>/<--name>.json` (default `concepts_sweep`), and plots NMSE against mean best-latent F1
with the Pareto front (lower NMSE, higher F1) to `<workdir>/<--name>.png`. README shows
the result and the demo's SAE setting (`saejax/configs/shapes_demo.py`) follows it.

Measured on 2 CPU cores (2026-11-25; `benchmarks/results/concepts_*.{json,png}`):
- the factorised world's ViT, block 2 (726 s, shared cores): best mean F1 BatchTopK k=4 with
  1,024 latents, 0.665 at NMSE 0.099 (11.1x the k-means reference of that size); TopK k=4
  0.58-0.61; PCA keeping 4 coefficients 0.57;
- DINOv2 ViT-S/14 at 112 px, block 7, 8,000 training images, expansions 4 and 8 (3,288 s):
  best Matryoshka k=16 with 1,536 latents, 0.650 at NMSE 0.131 (13.7x k-means); PCA 0.38-0.40.
  The same setting for 6,000 steps (`--steps=6000`): NMSE 0.119, mean F1 0.650.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from saejax import backbones, concept_metrics, features, losses, normalization, sae, train
from saejax import metrics as sae_metrics
from saejax.datasets import shapes
from saejax.datasets.shapes_backbones import default_layer, image_sizes
from saejax.studies.shapes_vit import SHAPES_VIT, TARGETS, train_shapes_vit

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the world's ViT is (or is trained) and results go.",
                               required=True)
_BACKBONE = flags.DEFINE_string("backbone", None, "A pretrained backbone instead of the world's ViT.")
_TARGETS = flags.DEFINE_enum("targets", "factorised", TARGETS, "The world's ViT's training targets.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "World image size for the world's ViT (grid = size / 8).")
_LAYER = flags.DEFINE_integer("layer", None, "Block (default as in the demo).")
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 20_000, "Images whose patch residuals train the SAEs.")
_STEPS = flags.DEFINE_integer("steps", 1_500, "Training steps per setting.")
_BATCH = flags.DEFINE_integer("batch", 1_024, "Patch tokens per step.")
_ARCHITECTURES = flags.DEFINE_list("architectures", ["topk", "batchtopk", "matryoshka", "relu"], "Architectures.")
_KS = flags.DEFINE_list("ks", ["4", "8", "16"], "k of the TopK family.")
_L1 = flags.DEFINE_list("l1", ["0.01", "0.03", "0.1"], "L1 coefficients of ReLU (on normalised residuals).")
_EXPANSIONS = flags.DEFINE_list("expansions", ["4", "8", "16"], "Dictionary sizes as multiples of the width.")
_NAME = flags.DEFINE_string("name", "concepts_sweep", "Results go to <workdir>/<name>.json and .png.")


def harvest(bb, params, images, layer, batch=128) -> np.ndarray:
    """[N * P, D] float32 patch residuals after block `layer`."""
    fn = jax.jit(lambda x: bb.forward(params, x, capture=(layer,), full=False).captured[layer][
        :, slice(*bb.layout.patches)])
    out = [np.asarray(fn(jnp.asarray(bb.preprocess(images[i:i + batch])))) for i in range(0, len(images), batch)]
    return np.concatenate(out).reshape(-1, bb.d_model)


def build(architecture: str, d_model: int, d_sae: int, knob) -> tuple[sae.SAE, losses.Objective, train.Hparams]:
    """The SAE, its objective and hyperparameters for one setting (`knob`: k or the L1 coefficient)."""
    if architecture == "relu":
        return sae.relu(d_model, d_sae), losses.Objective(sparsity="l1"), train.Hparams.of(2e-3, float(knob))
    ae = (sae.topk if architecture == "topk" else sae.batchtopk)(d_model, d_sae, int(knob))
    prefixes = losses.halving_prefixes(d_sae) if architecture == "matryoshka" else None
    objective = losses.Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=64, matryoshka_prefixes=prefixes)
    return ae, objective, train.Hparams.of(2e-3)


def train_one(ae, objective, hparams, x, *, steps, batch, seed=0):
    trainer = train.make_trainer(ae, objective=objective, dead_after_tokens=200_000, warmup_steps=100)
    state = trainer.init(jax.random.key(seed), hparams, b_dec=jnp.zeros(ae.d_model))
    step = jax.jit(trainer.step, donate_argnums=0)
    order = np.random.default_rng(seed)
    for _ in range(steps):
        state, _ = step(state, jnp.asarray(x[order.integers(0, len(x), batch)]))
    return state.params


def score(codes, x_hat, x, present) -> dict:
    """NMSE, L0, dead fraction and the mean over concepts of the best latent's F1."""
    counts = features.ConceptF1.zeros(codes.shape[1], present.shape[1]).update(codes, jnp.asarray(present))
    _, best_f1 = counts.best()
    return {"nmse": float(sae_metrics.normalized_mse(x, x_hat)), "l0": float(sae_metrics.l0(codes)),
            "dead_fraction": float(jnp.mean(jnp.max(codes, axis=0) <= 0)),
            "mean_f1": float(jnp.mean(best_f1)), "f1": np.asarray(best_f1).round(4).tolist()}


def reference_rows(train_x, val_x, present, d_sae, key, pca_keep=(4, 16)) -> list[dict]:
    """k-means with F centroids (reconstruction: the nearest centroid; L0 1) and PCA keeping each
    input's `n` largest coefficients (of min(D, F/2) components, halves as separate features;
    reconstruction: those coefficients' projection; L0 n), the follow-up's baselines."""
    fit = jnp.asarray(train_x[np.random.default_rng(1).permutation(len(train_x))[:65_536]])
    centroids = concept_metrics.kmeans(fit, n_centroids=d_sae, key=key)
    km = concept_metrics.kmeans_codes(val_x, n_centroids=d_sae, key=key, centroids=centroids)
    rows = [{"architecture": "kmeans", "d_sae": d_sae, "knob": None, **score(km, km @ centroids, val_x, present)}]
    n_components = min(val_x.shape[1], d_sae // 2)
    _, mean, components = concept_metrics.pca_codes(fit, n_components=n_components)
    halves, _, _ = concept_metrics.pca_codes(val_x, n_components=0, mean_D=mean, components_KD=components)
    for keep in pca_keep:
        threshold = jax.lax.top_k(halves, keep)[0][:, -1:]
        codes = jnp.where(halves >= threshold, halves, 0.0)
        x_hat = (codes[:, :n_components] - codes[:, n_components:]) @ components + mean
        rows.append({"architecture": "pca", "d_sae": 2 * n_components, "knob": keep,
                     **score(codes, x_hat, val_x, present)})
    return rows


def pareto(rows) -> list[int]:
    """Indices of rows no other row beats on both NMSE (lower) and mean F1 (higher)."""
    return [i for i, r in enumerate(rows) if not any(
        o["nmse"] <= r["nmse"] and o["mean_f1"] >= r["mean_f1"] and (o["nmse"], o["mean_f1"]) != (r["nmse"], r["mean_f1"])
        for o in rows)]


def plot(rows, front, path, title):
    import matplotlib  # noqa: PLC0415 - optional, only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colours = {"topk": "tab:blue", "batchtopk": "tab:orange", "matryoshka": "tab:green", "relu": "tab:red",
               "kmeans": "grey", "pca": "black"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = sorted({r["d_sae"] for r in rows})
    for name, colour in colours.items():
        mine = [r for r in rows if r["architecture"] == name]
        if mine:
            ax.scatter([r["nmse"] for r in mine], [r["mean_f1"] for r in mine], c=colour, label=name,
                       s=[20 + 30 * sizes.index(r["d_sae"]) for r in mine], marker="x" if name in ("kmeans", "pca")
                       else "o", alpha=0.8)
    for r in rows:
        if r["knob"] is not None:
            ax.annotate(f"{r['knob']}", (r["nmse"], r["mean_f1"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    best = sorted((rows[i] for i in front), key=lambda r: r["nmse"])
    ax.plot([r["nmse"] for r in best], [r["mean_f1"] for r in best], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("NMSE (validation patches, log scale)")
    ax.set_ylabel("mean best-latent F1 (15 concepts)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    start = time.time()
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    if _BACKBONE.value:
        name = _BACKBONE.value
        load_size, world_size = image_sizes(name, _IMAGE_SIZE.value // SHAPES_VIT["patch_size"])
        title = f"{_BACKBONE.value.rstrip('/').split('/')[-1]} at {world_size} px"
    else:
        name, load_size, world_size = train_shapes_vit(workdir, seed=0, image_size=_IMAGE_SIZE.value,
                                                       targets=_TARGETS.value).path, None, _IMAGE_SIZE.value
        title = f"the shapes world's ViT ({_TARGETS.value})"
    bb, params = backbones.load(name, image_size=load_size)
    layer = default_layer(bb.n_layers) if _LAYER.value is None else _LAYER.value
    train_world = shapes.source("train", _TRAIN_IMAGES.value, seed=0, image_size=world_size).world
    val_world = shapes.source("validation", 1_000, seed=1, image_size=world_size).world
    raw = harvest(bb, params, train_world.images, layer)
    norm = normalization.estimate_normalization(jnp.asarray(raw[:16_384]))
    train_x = np.asarray(norm.apply(jnp.asarray(raw)))
    val_x = norm.apply(jnp.asarray(harvest(bb, params, val_world.images, layer)))
    present = shapes.factor_patch_concepts(val_world, bb.patch_size).reshape(-1, len(shapes.FACTOR_CONCEPTS))
    print(f"{title}, block {layer}: {len(train_x):,} training and {len(val_x):,} validation patches "
          f"({time.time() - start:.0f} s)", flush=True)

    rows, reference = [], {}
    print(f"{'architecture':>12} {'F':>6} {'k/l1':>5} {'L0':>7} {'NMSE':>7} {'dead':>6} {'mean F1':>8} {'vs k-means':>10}")
    for expansion in map(int, _EXPANSIONS.value):
        d_sae = expansion * bb.d_model
        for ref in reference_rows(train_x, val_x, present, d_sae, jax.random.key(expansion)):
            rows.append(ref)
            reference.setdefault(d_sae, ref["mean_f1"])  # k-means of this size
            print(f"{ref['architecture']:>12} {ref['d_sae']:>6} {'-':>5} {ref['l0']:>7.2f} {ref['nmse']:>7.4f} "
                  f"{ref['dead_fraction']:>6.3f} {ref['mean_f1']:>8.3f} {ref['mean_f1'] / reference[d_sae]:>9.2f}x",
                  flush=True)
        for architecture in _ARCHITECTURES.value:
            for knob in (_L1.value if architecture == "relu" else _KS.value):
                ae, objective, hparams = build(architecture, bb.d_model, d_sae, knob)
                params_sae = train_one(ae, objective, hparams, train_x, steps=_STEPS.value, batch=_BATCH.value)
                codes = ae.encode(params_sae, val_x)
                row = {"architecture": architecture, "d_sae": d_sae, "knob": float(knob) if architecture == "relu"
                       else int(knob), **score(codes, ae.decode(params_sae, codes), val_x, present)}
                rows.append(row)
                print(f"{architecture:>12} {d_sae:>6} {knob:>5} {row['l0']:>7.2f} {row['nmse']:>7.4f} "
                      f"{row['dead_fraction']:>6.3f} {row['mean_f1']:>8.3f} {row['mean_f1'] / reference[d_sae]:>9.2f}x",
                      flush=True)
    front = pareto(rows)
    best = max((r for r in rows if r["architecture"] not in ("kmeans", "pca")), key=lambda r: (r["mean_f1"], -r["nmse"]))
    print("Pareto front: " + "; ".join(f"{rows[i]['architecture']} F={rows[i]['d_sae']} {rows[i]['knob']}"
                                       for i in sorted(front, key=lambda i: rows[i]["nmse"])))
    print(f"best mean F1: {best['architecture']} F={best['d_sae']} k/l1={best['knob']} ({best['mean_f1']:.3f}, "
          f"NMSE {best['nmse']:.4f}); {time.time() - start:.0f} s")
    result = {"title": title, "layer": layer, "concepts": list(shapes.FACTOR_CONCEPTS), "rows": rows,
              "pareto": front, "best": best, "steps": _STEPS.value, "batch": _BATCH.value}
    with open(os.path.join(workdir, f"{_NAME.value}.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(rows, front, os.path.join(workdir, f"{_NAME.value}.png"), f"{title}, block {layer}")
    except ImportError:
        print('matplotlib is not installed: no PNG (pip install -e ".[bench]")')


if __name__ == "__main__":
    app.run(main)
