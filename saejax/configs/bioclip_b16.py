"""An SAE on BioCLIP (imageomics/bioclip, an open_clip ViT-B/16): block 10 of 12, the 196 patch
tokens, the paper's recipe otherwise (32x, ReLU + L1, the 3x3 lr/lambda sweep, batch 16,384,
100M patches, warmup 500). The reference paper trains its BioCLIP SAEs on iNat21 and TreeOfLife
images; point `--config.data` at such a folder or tfds data set.

    saejax train --config=bioclip_b16 --workdir=DIR
    saejax train --config=bioclip_b16:small --workdir=DIR

BioCLIP exists only in open_clip's format (`open_clip_config.json` +
`open_clip_pytorch_model.bin`); saejax maps it onto the CLIP family (see
`saejax.backbones.open_clip`), reading the pickle with a restricted unpickler that builds
tensors only. OpenAI CLIP as open_clip builds it, the reference's exact backbone, is
`--config.backbone.name=timm/vit_base_patch16_clip_224.openai`.

Not yet run at scale (no images of the tree of life, no accelerator here): no expected numbers
are promised. The activation is read from `open_clip_config.json` (`quick_gelu`: OpenAI's
QuickGELU; otherwise exact GELU, open_clip's default).

`:small` is a tiny random CLIP with exact GELU on noise images. About 8 s on 2 CPU cores;
measured: lr 1e-3 -> L0 63.3 of 128, NMSE 0.59; lr 3e-3 -> L0 63.0, NMSE 0.17 (a plumbing
check).
"""

from saejax.configs.paper import paper_config, small_config


def get_config(variant: str = ""):
    if variant == "small":
        c = small_config("clip", image_size=32, patch_size=8)
        c.backbone.random.sizes.hidden_act = "gelu"
        return c
    if variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return paper_config("imageomics/bioclip", data_image_size=224)
