"""An SAE on DINOv3 ViT-B/16 (facebook/dinov3-vitb16-pretrain-lvd1689m): block 10 of 12, the
196 patch tokens (CLS and the 4 registers dropped), the paper's recipe otherwise (32x, ReLU +
L1, the 3x3 lr/lambda sweep, batch 16,384, 100M patches, warmup 500).

    saejax train --config=dinov3_b16 --workdir=DIR
    saejax train --config=dinov3_b16:small --workdir=DIR

DINOv3 uses rotary position embeddings, so it runs at any multiple of 16 px:
`--config.backbone.image_size=448` gives 28 x 28 patches (set `--config.data.image_size=448`
too). The hub processor resizes straight to 224 x 224 (bilinear, ImageNet statistics). saev
publishes DINOv3 SAEs for 6 to 11 layers per model; several `layers` share one forward pass
here (e.g. `--config.layers=6,7,8,9,10,11`).

Not yet run at scale (no ImageNet, no accelerator here): no expected numbers are promised.
`:small` is a tiny random DINOv3 with 4 registers and SwiGLU on noise images (about 8 s on 2 CPU
cores; measured: lr 1e-3 -> L0 62.7 of 128, NMSE 0.59; lr 3e-3 -> L0 63.0, NMSE 0.17; a plumbing
check).
"""

import ml_collections

from saejax.configs.paper import paper_config, small_config


def get_config(variant: str = ""):
    if variant == "small":
        c = small_config("dinov3", image_size=32, patch_size=8)
        c.backbone.random.sizes.update(num_register_tokens=4, use_gated_mlp=True, hidden_act="silu")
        return c
    if variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    c = paper_config("facebook/dinov3-vitb16-pretrain-lvd1689m", data_image_size=224)
    # Set (with data.image_size) to run at another multiple of 16 px; unset: the processor's 224.
    c.backbone.image_size = ml_collections.config_dict.placeholder(int)
    return c
