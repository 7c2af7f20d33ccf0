"""saejax: sparse autoencoders for vision transformers in JAX.

Modules: `sae` (architectures), `losses`, `optim` (optax pieces), `train` (state + step),
`resample` (dead latents), `normalization`, `metrics`, `checkpoint`.
"""

from saejax import losses, metrics, normalization, optim, resample, sae, train

__version__ = "0.1.0"
