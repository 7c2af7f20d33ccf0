"""Train the shapes world's ViT (a tiny HF Flax ViT classifier) from scratch.

Command (2 CPU cores)::

    saejax train_vit --workdir=/tmp/saejax-shapes

Expected, printed twice and equal (from the training module and from `saejax.backbones.load` +
`Backbone.forward`): the validation accuracy on the task (the shape and colour of the largest
object, 16 combinations, chance 1/16; with the default factorised targets an image counts when
both heads are right). The checkpoint is `<workdir>/vit` (`<workdir>/vit_conjunction` with
`--config.targets=conjunction`), an HF checkpoint directory; rerunning with the same config
reuses it. Measured on 2 CPU cores:

- `--config.image_size=64` (the demo's ViT, an 8 x 8 grid): factorised 0.9425, conjunction
  0.9175, 395-440 s each on 2026-12-07 (saejax's own ViT module; the previous `transformers`
  Flax ViT took 405 s back to back on that machine and reached 0.9445). `saejax demo` reuses
  it from the same workdir.
- 40 px (a 5 x 5 grid), factorised: 0.928 in 151 s (2026-12-07). Measured with saejax 0.1's ViT:
  conjunction 0.9705 (seed 0), 0.969 (seed 1), 90 to 130 s.

`:small` trains for 3 steps (a smoke test, chance accuracy), in about 15 s.
"""

import ml_collections

from saejax.studies.shapes_vit import SHAPES_VIT


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "factorised": colour and shape as separate heads (image and patch) and per-patch size and
    # texture heads; "conjunction": the 16 colour-shape classes (saejax.studies.shapes_vit.task_heads).
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
    if variant == "small":
        c.n_train, c.n_val, c.steps, c.batch_size = 256, 128, 3, 32
        c.vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=40,
                     patch_size=8)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
