"""saejax: sparse autoencoders for vision transformers in JAX.

Modules: `sae` (architectures), `losses`, `optim` (optax pieces), `train` (state + step),
`resample` (dead latents), `normalization`, `metrics`, `checkpoint`, `backbones` (Flax ViTs),
`data` (host-side images), `activations` (sharded harvest + shuffle buffer), `interventions`,
`sharding` (mesh + logical axes), `features`, `probes`, `viz`, `datasets` (synthetic and shapes
worlds), `vit_training` (the shapes world's ViT).
"""

from saejax import (activations, backbones, checkpoint, data, features, interventions, losses, metrics, normalization,
                    optim, probes, resample, sae, sharding, train, viz)

__version__ = "0.1.0"
