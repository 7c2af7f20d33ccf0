"""saejax: sparse autoencoders for vision transformers in JAX.

Modules: `sae` (architectures), `losses`, `optim` (optax pieces), `train` (state + step),
`resample` (dead latents), `normalization`, `metrics`, `fidelity` (spliced-in fidelity),
`report` (a sweep's page), `checkpoint`, `backbones` (Flax ViTs),
`data` (host-side images), `activations` (sharded harvest + shuffle buffer), `stream`
(activation streams), `loop` (fit, evaluate), `interventions`, `sharding` (mesh + logical
axes), `features`, `probes`, `viz`, `datasets` (synthetic and shapes worlds, and the shapes
world's ViT in `datasets.shapes_vit`).
"""

from saejax import (activations, backbones, checkpoint, data, features, fidelity, interventions, loop, losses,
                    metrics, normalization, optim, probes, report, resample, sae, sharding, stream, train, viz)

__version__ = "0.1.0"
