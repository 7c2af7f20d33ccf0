"""The concept table's 1-D probe search: every latent against the 32 most correlated ones.

    python -m benchmarks.concept_search              # the demo's sizes on the shapes world's ViT
    python -m benchmarks.concept_search --latents=1536 --rows=128000   # the DINOv2 ViT-S/14 demo's SAE's size
    python -m benchmarks.concept_search --demo=DIR   # a finished `saejax demo` run's own codes

`concept_metrics.concept_scores` fits a 1-D logistic probe per latent and concept (the saev
follow-up's pick). With `candidates=32` it first ranks the latents by their correlation with
the concept (one matmul) and fits only the top 32; `tests/test_concept_metrics.py` checks the
picks equal the full search's on the shapes world. Codes here are random and sparse (L0 about
16), with 15 concepts planted on some latents, at the demo's sizes: 2,000 probe images x 64
patches for training, 1,000 x 64 for evaluation. Printed: seconds of each and their ratio,
measured in the same run.

With `--demo=DIR` (the workdir of a finished `saejax demo` run, e.g. on the real DINOv2
ViT-S/14), the codes are the demo's own: its backbone and exported SAE encode the demo's probe
and validation images, and the concept table's three dictionaries (SAE, k-means, PCA) are
scored as `shapes_demo.analyse` scores them, both ways, with the picks compared.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from saejax import backbones
from saejax.analysis import concept_metrics as cm
from saejax.analysis.site import Site
from saejax.checkpoint import load_sae
from saejax.datasets import shapes

_LATENTS = flags.DEFINE_integer("latents", 1024, "Dictionary size.")
_ROWS = flags.DEFINE_integer("rows", 128_000, "Training rows (patches); evaluation gets half.")
_CANDIDATES = flags.DEFINE_integer("candidates", 32, "Latents probed per concept.")
_DEMO = flags.DEFINE_string("demo", None, "Workdir of a finished `saejax demo` run: score its own codes.")
_PROBE_IMAGES = flags.DEFINE_integer("probe_images", 2_000, "With --demo: its demo.probe_images.")
_VALIDATION_IMAGES = flags.DEFINE_integer("validation_images", 1_000, "With --demo: its demo.validation_images.")


def codes_and_concepts(rng, rows, latents, concepts=15):
    present = rng.random((rows, concepts)) < rng.uniform(0.02, 0.3, concepts)
    codes = np.where(rng.random((rows, latents)) < 16 / latents, rng.exponential(size=(rows, latents)), 0.0)
    for c in range(concepts):  # a latent that fires mostly where its concept is
        codes[:, 7 * c] = np.where(present[:, c] & (rng.random(rows) < 0.8), 1.0 + rng.random(rows), 0.0)
    return jnp.asarray(codes, jnp.float32), present


def demo_dictionaries(summary: dict) -> tuple[dict, np.ndarray, np.ndarray, str]:
    """The concept table's inputs of a finished demo run (its `summary.json`), as
    `shapes_demo.analyse` builds them."""
    sae, backbone = summary["sae"], summary["backbone"]
    bb, bb_params = backbones.load(backbone["path"], image_size=backbone["image_size"])
    ae, sae_params, info = load_sae(sae["path"])
    site = Site(bb, bb_params, layer=sae["layer"], ae=ae, sae_params=sae_params, norm=info["normalization"])
    world_size = backbone["grid"][0] * bb.patch_size
    sets = {}
    for split, count in (("test", _PROBE_IMAGES.value), ("validation", _VALIDATION_IMAGES.value)):
        world = shapes.source(split, count, seed=1, image_size=world_size).world
        outs = [site.encode(world.images[i:i + 128]) for i in range(0, count, 128)]
        sets[split] = (jnp.concatenate([o["normalized"] for o in outs]).reshape(-1, bb.d_model),
                       jnp.concatenate([o["codes"] for o in outs]).reshape(-1, ae.d_sae),
                       shapes.factor_patch_concepts(world, bb.patch_size).reshape(-1, len(shapes.FACTOR_CONCEPTS)))
    (train_x, train_codes, train_present), (val_x, val_codes, val_present) = sets["test"], sets["validation"]
    dictionaries = cm.baseline_dictionaries(ae.d_sae, train_x, val_x, train_codes, val_codes, key=jax.random.key(5))
    return dictionaries, train_present, val_present, f"{backbone['name']} block {sae['layer']}, {ae.d_sae} latents"


def main(argv):
    del argv
    if _DEMO.value:
        with open(f"{_DEMO.value}/report/summary.json") as f:
            summary = json.load(f)
        dictionaries, train_present, val_present, what = demo_dictionaries(summary)
    else:
        rng = np.random.default_rng(0)
        train_codes, train_present = codes_and_concepts(rng, _ROWS.value, _LATENTS.value)
        val_codes, val_present = codes_and_concepts(rng, _ROWS.value // 2, _LATENTS.value)
        dictionaries, what = {"random": (train_codes, val_codes)}, f"random codes, {_LATENTS.value} latents"
    seconds, picks = {}, {}
    for name, candidates in (("every latent", None), (f"top {_CANDIDATES.value}", _CANDIDATES.value)):
        seconds[name], picks[name] = 0.0, []
        for train_codes, val_codes in dictionaries.values():
            cm.concept_scores(train_codes[:512], val_codes[:512], train_present[:512], val_present[:512],
                              candidates=candidates)  # compile outside the timing
            start = time.perf_counter()
            scores = cm.concept_scores(train_codes, val_codes, train_present, val_present, candidates=candidates)
            seconds[name] += time.perf_counter() - start
            picks[name] += [s["latent"] for s in scores]
    print(f"concept_scores over {', '.join(dictionaries)}: {len(train_present):,} training rows, {what}, "
          f"{train_present.shape[1]} concepts | jax {jax.__version__} {jax.devices()[0].platform}")
    for name, s in seconds.items():
        print(f"  {name:>14}: {s:7.2f} s")
    full, fast = seconds.values()
    if _DEMO.value:  # the codes are the demo's own: its summary's SAE picks come back
        recorded = [c["dictionaries"]["sae"]["latent"] for c in summary["concepts"]]
        print(f"  the SAE's picks equal the demo's summary.json: {picks[f'top {_CANDIDATES.value}'][:len(recorded)] == recorded}")
    print(f"  speed-up {full / fast:.1f}x; the same picks: {picks['every latent'] == picks[f'top {_CANDIDATES.value}']}")


if __name__ == "__main__":
    app.run(main)
