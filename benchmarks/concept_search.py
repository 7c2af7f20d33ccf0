"""The concept table's 1-D probe search: every latent against the 32 most correlated ones.

    python -m benchmarks.concept_search              # the demo's sizes on the shapes world's ViT
    python -m benchmarks.concept_search --latents=1536 --rows=128000   # the DINOv2 ViT-S/14 demo's SAE

`concept_metrics.concept_scores` fits a 1-D logistic probe per latent and concept (the saev
follow-up's pick). With `candidates=32` it first ranks the latents by their correlation with
the concept (one matmul) and fits only the top 32; `tests/test_concept_metrics.py` checks the
picks equal the full search's on the shapes world. Codes here are random and sparse (L0 about
16), with 15 concepts planted on some latents, at the demo's sizes: 2,000 probe images x 64
patches for training, 1,000 x 64 for evaluation. Printed: seconds of each and their ratio,
measured in the same run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from saejax.analysis import concept_metrics as cm

_LATENTS = flags.DEFINE_integer("latents", 1024, "Dictionary size.")
_ROWS = flags.DEFINE_integer("rows", 128_000, "Training rows (patches); evaluation gets half.")
_CANDIDATES = flags.DEFINE_integer("candidates", 32, "Latents probed per concept.")


def codes_and_concepts(rng, rows, latents, concepts=15):
    present = rng.random((rows, concepts)) < rng.uniform(0.02, 0.3, concepts)
    codes = np.where(rng.random((rows, latents)) < 16 / latents, rng.exponential(size=(rows, latents)), 0.0)
    for c in range(concepts):  # a latent that fires mostly where its concept is
        codes[:, 7 * c] = np.where(present[:, c] & (rng.random(rows) < 0.8), 1.0 + rng.random(rows), 0.0)
    return jnp.asarray(codes, jnp.float32), present


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    train_codes, train_present = codes_and_concepts(rng, _ROWS.value, _LATENTS.value)
    val_codes, val_present = codes_and_concepts(rng, _ROWS.value // 2, _LATENTS.value)
    seconds, picks = {}, {}
    for name, candidates in (("every latent", None), (f"top {_CANDIDATES.value}", _CANDIDATES.value)):
        cm.concept_scores(train_codes[:512], val_codes[:512], train_present[:512], val_present[:512],
                          candidates=candidates)  # compile outside the timing
        start = time.perf_counter()
        scores = cm.concept_scores(train_codes, val_codes, train_present, val_present, candidates=candidates)
        seconds[name] = time.perf_counter() - start
        picks[name] = [s["latent"] for s in scores]
    print(f"concept_scores, {_ROWS.value:,} training rows x {_LATENTS.value} latents x 15 concepts | jax "
          f"{jax.__version__} {jax.devices()[0].platform}")
    for name, s in seconds.items():
        print(f"  {name:>14}: {s:7.2f} s")
    full, fast = seconds.values()
    print(f"  speed-up {full / fast:.1f}x; the same picks: {picks['every latent'] == picks[f'top {_CANDIDATES.value}']}")


if __name__ == "__main__":
    app.run(main)
