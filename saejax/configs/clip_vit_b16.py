"""The paper's CLIP ViT-B/16 SAE: block 10 of 12, patch tokens, 32x (24,576 latents), ReLU + L1,
the 3x3 lr/lambda sweep trained together on one stream, batch 16,384, 100M patches, warmup 500.

    saejax train --config=clip_vit_b16 --workdir=DIR
    saejax train --config=clip_vit_b16:small --workdir=DIR

Needs ImageNet-1K (`ILSVRC/imagenet-1k` from the Hugging Face hub, as saev reads it, or a local
copy: `--config.data.path`; tfds works too, see `saejax.configs.paper`) and the weights of openai/clip-vit-base-patch16 (hub or a local directory
in `--config.backbone.name`). 6,103 steps. Not run here: this machine has neither ImageNet nor
an accelerator, so there are no numbers to promise yet; the paper's released SAE (lr 1e-3 region,
lambda 4e-4..8e-4) has most latents alive and NMSE well below 0.3.

`:small` runs the same loop in about 15 s on 2 CPU cores (tiny random CLIP, noise images, a
2-member sweep, 60 steps of 256 tokens). Measured: lr 1e-3 -> L0 63.3 of 128, NMSE 0.59;
lr 3e-3 -> L0 63.0, NMSE 0.17, the same on 1 or 8 devices (`shuffle_groups=8`) (noise images through a random ViT have no sparse structure, so
lambda 4e-4 leaves half the latents on: this variant checks the plumbing, not the science).
It leaves `eval.json` and `sae/layer_1/member_0`, `sae/layer_1/member_1` in the workdir.
"""

from saejax.configs.paper import paper_config, small_config


def get_config(variant: str = ""):
    if variant == "small":
        return small_config("clip", image_size=32, patch_size=8)
    if variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return paper_config("openai/clip-vit-base-patch16", data_image_size=224)
