"""The SAE of the end-to-end demo (`python -m experiments.demo`): a BatchTopK SAE (k=4, 16 x 64 =
1,024 latents) on block 2 of 4 of the shapes world's ViT (patch tokens), activations generated
on the fly.

The setting is the one `python -m benchmarks.concepts --workdir=DIR` picks on the factorised
world's ViT: the highest mean best-latent F1 over the 15 concepts (0.665, NMSE 0.099), on the
Pareto front of NMSE against that F1. TopK at k=4 reaches 0.58-0.61, k=8 0.62-0.63; README
shows the sweep.

The demo fills in `backbone.name` (the ViT it trains) and runs `experiments.train_sae` with
this config and sets `data.image_size` to its `--image_size` (64 by default); `:quick` is the
reduced version the tests run. Expected (full demo, 64 px, factorised ViT): L0 4, NMSE 0.104,
dead fraction 0.24; README lists the concept numbers.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.backbone = dict(name="", dtype="float32")
    c.layers = (2,)  # residual after block 2 of 4 (the paper's "second to last")
    c.tokens = "patches"
    c.data = dict(kind="shapes", train_images=20_000, validation_images=1_000, seed=0, image_size=64)
    c.image_batch_size = 64
    c.buffer_tokens = 2**15
    c.normalization_samples = 2**14
    c.sae = dict(architecture="batchtopk", expansion=16, k=4)
    c.objective = dict(sparsity="none", sparsity_warmup_steps=0, auxk_coeff=1 / 32, k_aux=64)
    c.optimizer = dict(warmup_steps=100)
    c.sweep = dict(learning_rate=(2e-3,), sparsity_coeff=(0.0,), k=(4,))
    c.batch_size = 1024
    c.total_tokens = 1024 * 1500
    c.dead_after_tokens = 200_000
    c.resample_every = 0
    c.resample_until = None
    c.checkpoint_every = 500
    c.log_every = 10
    c.keep_checkpoints = 1
    c.eval_images = 1_000
    if variant == "quick":
        c.data.train_images, c.data.validation_images = 512, 64
        c.image_batch_size = 16
        c.buffer_tokens = 2048
        c.normalization_samples = 1024
        c.total_tokens = 256 * 20
        c.batch_size = 256
        c.checkpoint_every = 10
        c.log_every = 2
        c.eval_images = 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
    return c
