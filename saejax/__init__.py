"""saejax: sparse autoencoders for vision transformers in JAX.

The layers, each importing only those below it:

- `saejax.core`: the SAE (`sae`, `losses`, `optim`, `train`, `sweep_step`, `resample`,
  `normalization`, `metrics`), pure JAX; `saejax.sharding` (mesh + logical axes) beside it.
- `saejax.backbones` (Flax ViTs), `saejax.checkpoint` (orbax, portable files, saev / SAELens).
- `saejax.data`: image sources and batches, the sharded harvest (`activations`), activation
  streams (`stream`), saev's shards (`shards`).
- `saejax.analysis`: `site` (an SAE at a block, what the rest reads through), `interventions`, `fidelity`, `features`, `concept_metrics`, `probes`,
  `semprobe`, `probe_edits`, `segmentation`, `discovery` (the latents that control a
  prediction, ranked by attribution and verified by intervention), `compare` (latents shared
  and unique across models).
- `saejax.pages`: `viz`, `browser`, `findings` (the pages of discovery and compare).
- `saejax.run`: a whole training run in a workdir (`run.training`: resume, normalisation
  cache, training, evaluation, export, report), the loop under it (`loop`), its logs and its
  report page (`report`).
- `saejax.datasets`: synthetic and shapes worlds, CUB, ADE20K and concept folders.

Each module is also reachable by its short name, `saejax.sae`, `saejax.train`, `saejax.loop`,
`saejax.interventions`, ... (`from saejax import sae, train`).
"""

from saejax import backbones, checkpoint, data, sharding
from saejax.analysis import (compare, concept_metrics, discovery, features, fidelity, interventions, probe_edits,
                             probes, segmentation, semprobe, site)
from saejax.core import losses, metrics, normalization, optim, resample, sae, sweep_step, train
from saejax.data import activations, shards, stream
from saejax.pages import browser, findings, viz
from saejax.run import logs, loop, report

from saejax.provenance import __version__, written_by  # noqa: E402
