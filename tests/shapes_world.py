"""A small shapes world for the science tests: the factorised and the conjunction ViT, each
with a BatchTopK SAE on block 2, trained once per test session and shared by the xdist
workers (a file lock guards the folder).

At 40 px (5 x 5 patches) and 600 steps the factorised ViT encodes colour and background
texture per patch (best-latent F1 0.74-0.82 for colours, 0.21-0.83 for textures) and the
conjunction ViT colour only (textures 0.19-0.29): the contrast `compare` must find, in about
a minute per model on one core.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import filelock
import jax
import jax.numpy as jnp
import numpy as np

from saejax import backbones, features, sae, site, train
from saejax.checkpoint import load_sae, save_sae
from saejax.core.losses import Objective
from saejax.core.normalization import estimate_normalization
from saejax.datasets import shapes
from saejax.studies.shapes_vit import SHAPES_VIT, train_shapes_vit

IMAGE_SIZE, LAYER = 40, 2
VIT = dict(n_train=3000, n_val=200, steps=600, batch_size=64)
SAE_STEPS, SAE_IMAGES = 1000, 3000


class World(NamedTuple):
    vit: str  # the HF checkpoint directory
    sae: str  # the SAE's `save_sae` directory
    site: site.Site
    best_latent: dict[str, int]  # concept -> the latent with the best patch-level F1 on validation images
    best_f1: dict[str, float]
    f1: dict[str, np.ndarray]  # concept -> [d_sae] every latent's patch-level F1 on validation images


def _train_sae(bb, params, directory: str) -> str:
    images = shapes.source("train", SAE_IMAGES, seed=7, image_size=IMAGE_SIZE).world.images
    capture = jax.jit(lambda x: bb.forward(params, x, capture=(LAYER,), full=False).captured[LAYER][:, 1:])
    acts = np.concatenate([np.asarray(capture(bb.preprocess(images[i:i + 250])))
                           for i in range(0, len(images), 250)]).reshape(-1, bb.d_model)
    norm = estimate_normalization(acts)
    x = np.asarray(norm.apply(acts))
    ae = sae.create("batchtopk", bb.d_model, 8 * bb.d_model, k=4)
    trainer = train.make_trainer(ae, objective=Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=64),
                                 warmup_steps=50, dead_after_tokens=50_000)
    state = trainer.init(jax.random.key(0), train.Hparams.of(2e-3, 0.0), b_dec=jnp.mean(x, 0))
    step, rng = jax.jit(trainer.step), np.random.default_rng(0)
    for _ in range(SAE_STEPS):
        state, _ = step(state, jnp.asarray(x[rng.integers(0, len(x), 512)]))
    return save_sae(directory, ae, state.params, normalization=norm, info={"layer": LAYER})


def trained_world(root: str, targets: str) -> World:
    """The world's ViT (`targets`: "factorised" or "conjunction") and its SAE, trained under
    `root` unless already there."""
    # The folder names every setting, so a changed one never reuses a stale model.
    folder = os.path.join(root, f"{targets}-{IMAGE_SIZE}-{LAYER}-{SAE_STEPS}-{SAE_IMAGES}-" +
                          "-".join(f"{k}{v}" for k, v in sorted(VIT.items())))
    os.makedirs(root, exist_ok=True)
    with filelock.FileLock(folder + ".lock"):
        vit = train_shapes_vit(folder, image_size=IMAGE_SIZE, targets=targets, **VIT)
        bb, params = backbones.load(vit.path)
        sae_dir = os.path.join(folder, "sae")
        if not os.path.isdir(sae_dir):
            _train_sae(bb, params, sae_dir)
    ae, sae_params, info = load_sae(sae_dir)
    world_site = site.Site(bb, params, layer=LAYER, ae=ae, sae_params=sae_params, norm=info["normalization"])
    val = shapes.source("validation", 300, seed=1, image_size=IMAGE_SIZE).world
    concepts = shapes.factor_patch_concepts(val, SHAPES_VIT["patch_size"]).reshape(-1, len(shapes.FACTOR_CONCEPTS))
    codes = jnp.concatenate([world_site.encode(val.images[i:i + 100])["codes"] for i in range(0, 300, 100)])
    f1 = features.ConceptF1.zeros(ae.d_sae, len(shapes.FACTOR_CONCEPTS)).update(
        codes.reshape(-1, ae.d_sae), jnp.asarray(concepts))
    best, best_f1, _ = jax.device_get(f1.best())
    table = np.asarray(f1.f1()[0])
    return World(vit.path, sae_dir, world_site, {c: int(i) for c, i in zip(shapes.FACTOR_CONCEPTS, best)},
                 {c: float(f) for c, f in zip(shapes.FACTOR_CONCEPTS, best_f1)},
                 {c: table[:, i] for i, c in enumerate(shapes.FACTOR_CONCEPTS)})
