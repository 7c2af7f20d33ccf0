"""Train SAEs on synthetic activations with planted features (no backbone, no data download).

Commands (2 CPU cores; about 45 s and 80 s)::

    saejax synthetic --workdir=/tmp/saejax-synthetic
    saejax synthetic --workdir=/tmp/saejax-topk --config=synthetic:topk

Expected, from `summary.json` (256 planted features in 64 dimensions, 2 active per input):

- default, ReLU + L1 (lambda 3e-2), lr 3e-3 / 1e-2: features recovered (a decoder row at
  absolute cosine > 0.9) 1.00 / 0.996, NMSE 0.17 / 0.21 (L1 shrinkage), L0 6.8 / 3.5.
- `:topk`, TopK k=4 + AuxK: features recovered 1.00, NMSE 0.073, L0 4.

`:small` (16 dimensions, 64 features, 30 steps of 256) checks the plumbing in seconds.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.world = dict(d_model=64, n_features=256, mean_active=2.0, zipf_exponent=0.0, noise=0.01)
    c.normalization_samples = 2**14
    c.batch_size = 1024
    c.steps = 3000
    c.sae = dict(architecture="relu", d_sae=512, k=4)  # k: latents kept by topk / batchtopk
    c.objective = dict(sparsity="l1", sparsity_warmup_steps=200, auxk_coeff=0.0, k_aux=64)
    c.optimizer = dict(warmup_steps=100)
    c.sweep = dict(learning_rate=(3e-3, 1e-2), sparsity_coeff=(3e-2,), k=(0,))
    c.dead_after_tokens = 200_000
    c.resample_every = 1000  # steps; 0 disables
    c.resample_until = 2000  # no resampling after this step, so resampled latents can settle
    c.checkpoint_every = 1000
    c.log_every = 100
    c.eval_batches = 16

    if variant == "topk":
        c.sae = dict(architecture="topk", d_sae=512, k=4)
        c.objective = dict(sparsity="none", sparsity_warmup_steps=0, auxk_coeff=1 / 32, k_aux=64)
        c.sweep = dict(learning_rate=(3e-3,), sparsity_coeff=(0.0,), k=(4,))
        c.resample_every = 0
    elif variant == "small":
        c.world.update(d_model=16, n_features=64)
        c.sae.d_sae = 128
        c.normalization_samples, c.batch_size, c.steps = 1024, 256, 30
        c.checkpoint_every, c.log_every, c.resample_every, c.eval_batches = 10, 5, 10, 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '', 'topk' or 'small'")
    return c
