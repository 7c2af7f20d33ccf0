"""An SAE on SigLIP 2 ViT-B/16 (google/siglip2-base-patch16-224): block 10 of 12, the 196 patch
tokens, the paper's recipe otherwise (32x, ReLU + L1, the 3x3 lr/lambda sweep, batch 16,384,
100M patches, warmup 500).

    saejax train --config=siglip2_b16 --workdir=DIR
    saejax train --config=siglip2_b16:small --workdir=DIR

SigLIP has no CLS token: its layout is patches only and its pooled embedding comes from the
attention-pooling head, so `tokens` must stay "patches" (or "all", the same set here). The
processor resizes straight to 224 x 224 (bicubic, mean = std = 0.5); the host-side short-side
resize + centre crop to 224 makes that a no-op, as for the other configs. The original SigLIP
(`google/siglip-base-patch16-224`) and the NaFlex checkpoints (`google/siglip2-base-
patch16-naflex`, family "siglip2", run at one fixed square size) load by passing their name as
`--config.backbone.name`.

Not yet run at scale (no ImageNet, no accelerator here): no expected numbers are promised.
`:small` is a tiny random SigLIP on noise images (about 8 s on 2 CPU cores; measured: lr 1e-3 ->
L0 63.2 of 128, NMSE 0.60; lr 3e-3 -> L0 63.2, NMSE 0.17; a plumbing check, like
clip_vit_b16.py:small).
"""

from saejax.configs.paper import paper_config, small_config


def get_config(variant: str = ""):
    if variant == "small":
        return small_config("siglip", image_size=32, patch_size=8)
    if variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return paper_config("google/siglip2-base-patch16-224", data_image_size=224)
