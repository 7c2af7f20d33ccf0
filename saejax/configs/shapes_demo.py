"""The end-to-end demo (`saejax demo`): its SAE, a BatchTopK SAE (k=4, 16 x 64 =
1,024 latents) on block 2 of 4 of the shapes world's ViT (patch tokens), activations generated
on the fly, and under `demo` the rest of the run::

    demo.image_size   image side in px of the world's ViT (8 px patches; objects scale with it);
                      with demo.backbone, the grid is image_size / 8 patches a side
    demo.targets      "factorised" or "conjunction": what the world's ViT is trained to predict
    demo.backbone     a pretrained backbone (hub id or local HF directory) instead of the world's ViT
    demo.layer        the SAE's block (default: 2 for the world's ViT, two thirds of the way up a
                      pretrained backbone)
    demo.architecture "", "topk", "batchtopk" or "matryoshka" (BatchTopK with nested prefixes
                      F/8, F/4, F/2, F); "" keeps `sae.architecture`
    demo.k, demo.expansion   override `sae.k` and `sae.expansion`
    demo.edit_images  validation images the edits run on (default: all for the world's ViT, 250
                      for a pretrained backbone)
    demo.validation_images, demo.probe_images, demo.probe_epochs   the analysis' images and probes
    demo.vit          `train_shapes_vit` settings beyond its defaults

The setting is the one `python -m benchmarks.concepts --workdir=DIR` picks on the factorised
world's ViT: the highest mean best-latent F1 over the 15 concepts (0.665, NMSE 0.099; measured on saejax 0.1's ViT), on the
Pareto front of NMSE against that F1. TopK at k=4 reaches 0.58-0.61, k=8 0.62-0.63; README
shows the sweep.

The demo fills in `backbone.name` (the ViT it trains), sets `data.image_size` to
`demo.image_size` (64 by default) and trains the SAE as `saejax train` would (the
`demo` keys are not part of that run's config); `:small` is the reduced version the tests run. Expected (full demo, 64 px, factorised ViT): L0 4, NMSE 0.118,
dead fraction 0.18; the guide (docs/guide/experiments.md) lists the concept numbers.
"""

import ml_collections
from ml_collections import config_dict


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
    c.demo = dict(image_size=64, targets="factorised", backbone="", layer=config_dict.placeholder(int),
                  architecture="", k=config_dict.placeholder(int), expansion=config_dict.placeholder(int),
                  edit_images=config_dict.placeholder(int), validation_images=1_000, probe_images=2_000,
                  probe_epochs=30, vit=dict())  # vit: train_shapes_vit settings beyond its defaults
    if variant == "small":
        c.data.train_images, c.data.validation_images = 512, 64
        c.image_batch_size = 16
        c.buffer_tokens = 2048
        c.normalization_samples = 1024
        c.total_tokens = 256 * 20
        c.batch_size = 256
        c.checkpoint_every = 10
        c.log_every = 2
        c.eval_images = 64
        c.demo.update(validation_images=120, probe_images=240, probe_epochs=10, vit=dict(n_train=1_000, n_val=100,
                                                                                        steps=30))
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
