"""The paper's DINOv2 ViT-B/14 (with 4 registers) SAE: block 10 of 12, the 256 patch tokens
(CLS and registers dropped), 32x, ReLU + L1, the 3x3 lr/lambda sweep, batch 16,384, 100M
patches, warmup 500.

    saejax train --config=dinov2_b14 --workdir=DIR
    saejax train --config=dinov2_b14:small --workdir=DIR

Needs ImageNet-1K (`ILSVRC/imagenet-1k`, as `clip_vit_b16`) and facebook/dinov2-with-registers-base. Images are
resized (short side 256) and centre-cropped on the host, then the backbone crops 224, as the
reference does. Not run here (no ImageNet, no accelerator).

`:small`: a tiny random DINOv2 with 4 registers (registers dropped from the harvest), noise
images, about 15 s on 2 CPU cores. Measured: lr 1e-3 -> L0 62.6 of 128, NMSE 0.60; lr 3e-3 ->
L0 63.2, NMSE 0.17 (a plumbing check; see clip_vit_b16.py).
"""

from saejax.configs.paper import paper_config, small_config


def get_config(variant: str = ""):
    if variant == "small":
        c = small_config("dinov2_registers", image_size=28, patch_size=7)
        c.backbone.random.sizes.num_register_tokens = 4
        return c
    if variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return paper_config("facebook/dinov2-with-registers-base", data_image_size=256)
