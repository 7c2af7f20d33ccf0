"""saejax: sparse autoencoders for vision transformers in JAX.

Modules: `sae` (architectures), `losses`, `optim` (optax pieces), `train` (state + step),
`resample` (dead latents), `normalization`, `metrics`, `checkpoint`, `backbones` (Flax ViTs),
`data` (host-side images), `activations` (sharded harvest + shuffle buffer), `interventions`,
`sharding` (mesh + logical axes).
"""

from saejax import (activations, backbones, checkpoint, data, interventions, losses, metrics, normalization, optim,
                    resample, sae, sharding, train)

__version__ = "0.1.0"
