"""The feature browser; see `saejax.cli.browse`.

The default browses an SAE trained by `saejax train` on ImageNet validation images (the
Hugging Face hub's `ILSVRC/imagenet-1k`, as saev reads it, so image ids are saev's); give `--config.sae.path` (a `save_sae` directory, e.g. `RUN/sae/layer_10/member_0`) or
`--config.sae.kind=saev --config.sae.path=sae.pt`, the backbone and the layer it reads.
`images` bounds the images streamed; `max_pages` the latent pages written (most frequent first;
the index lists every latent).

`:small`: a tiny random CLIP, a random SAE and 96 images of the shapes world (labelled), in a
few seconds on CPU.
"""

import ml_collections

from saejax.configs.paper import imagenet, source_keys


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.title = "SAE features"
    c.backbone = dict(name="openai/clip-vit-base-patch16", dtype="float32")
    c.sae = dict(kind="saejax", path="")
    c.layer = 10
    c.data = imagenet(224)
    c.split = "validation"
    c.images = 50_000
    c.batch_size = 64
    c.k = 20
    c.max_pages = None
    if variant == "small":
        c.title = "tiny random CLIP, block 1"
        c.backbone = dict(name="", random=dict(family="clip", directory="/tmp/saejax-random-backbones", seed=0,
                                               sizes=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=64, image_size=40, patch_size=8)))
        c.sae = dict(kind="random", d_sae=128, seed=0)
        c.layer = 1
        # --config.data.kind=folder --config.data.validation_dir=DIR, or kind=hf with path=: your images
        c.data = source_keys(kind="shapes", validation_images=96, image_size=40)
        c.images, c.batch_size, c.k = 96, 32, 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
