"""Train the shapes world's ViT (a tiny HF Flax ViT classifier) from scratch.

Command (2 CPU cores):
    python -m experiments.train_vit --workdir=/tmp/saejax-shapes

Expected: validation accuracy 0.97 (seed 0: 0.9705, seed 1: 0.969) on the task (shape and
colour of the largest object, 16 classes, chance 1/16), printed twice and equal: from the
training module and from `saejax.backbones.load` + `Backbone.forward`. Training takes 90 to 130 s
on 2 CPU cores (1,000 steps of 128 images, about 1,000 to 1,400 images/s; the whole command
about 10 s more). The checkpoint is `<workdir>/vit`, an HF checkpoint directory
(`saejax.backbones.load("<workdir>/vit")`); rerunning with the same config reuses it.
`:tiny` trains for 3 steps (a smoke test, chance accuracy), in about 15 s.
`--config.image_size=64` trains the demo's ViT (an 8 x 8 grid): validation accuracy 0.9630,
about 200 s; `experiments.demo` reuses it from the same workdir.
"""

import ml_collections

from saejax.datasets.shapes_vit import SHAPES_VIT


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "factorised": colour and shape as separate heads (image and patch) and per-patch size and
    # texture heads; "conjunction": the 16 colour-shape classes (saejax.datasets.shapes_vit.task_heads).
    c.targets = "factorised"
    c.n_train = 30_000
    c.n_val = 2_000
    c.image_size = 40
    c.vit = dict(SHAPES_VIT)  # hidden 64, 4 blocks, 4 heads, MLP 128, 8 px patches (5 x 5 grid)
    c.steps = 1_000
    c.batch_size = 128
    c.learning_rate = 2e-3
    c.warmup_steps = 100
    c.weight_decay = 0.05
    c.patch_weight = 0.5  # auxiliary per-patch loss on the final patch tokens (0: plain classification)
    c.init_range = 1.0  # LeCun-normal init; HF's Flax default (0.02) trains far more slowly
    if variant == "tiny":
        c.n_train, c.n_val, c.steps, c.batch_size = 256, 128, 3, 32
        c.vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=40,
                     patch_size=8)
    elif variant != "default":
        raise ValueError(f"unknown variant {variant!r}; expected default or tiny")
    return c
