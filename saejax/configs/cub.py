"""CUB-200-2011 classification edits (paper section 5.1); see `saejax.cli.cub_edit`.

    saejax cub_edit --config=cub --workdir=DIR \
        --config.data.root=/data/CUB_200_2011 --config.sae.path=/models/clip_sae/sae.pt

Needs (fetched elsewhere; this machine has no network): CUB_200_2011.tgz from
https://data.caltech.edu/records/65de6-vp158 unpacked (images/, images.txt,
image_class_labels.txt, train_test_split.txt, classes.txt); openai/clip-vit-base-patch16; saev's
CLIP SAE `osunlp/SAE_CLIP_24K_ViT-B-16_IN1K` (`sae.pt`, raw block-10 residuals).

Expected, from the paper (not run here: no GPU, no CUB): test image 680 with patches
[63, 64, 77, 78, 79, 93, 94] and latent 20356 at slider -11: "Blue Jay" 49% -> 4% and
"Clark Nutcracker" 15% -> 32%. Set `--config.image=680 --config.latents="(20356,)"
--config.slider=-11` to reproduce it; image ids here index the test split in `images.txt` order.

`:small`: a tiny random CLIP, a random SAE and a tiny synthetic tree in the official layout
(images of mixed sizes and formats, one of them truncated and skipped), well under a minute on
2 CPU cores. `probe.json` counts the skipped files (`skipped_images`).
"""

import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.backbone = dict(name="openai/clip-vit-base-patch16", dtype="float32")
    c.sae = dict(kind="saev", path="", norm_scalar=0.0)
    c.layer = 10
    c.data = dict(root="", image_size=224, skip_unreadable=False)  # True: skip and count unreadable files
    c.batch_size = 64
    c.probe = dict(epochs=20, batch_size=512, learning_rates=(3e-4, 1e-3, 3e-3), weight_decays=(0.01, 0.1))
    c.stats_images = 5_794  # the whole test split: latent frequencies and maxima
    c.image = 680
    c.patches = (63, 64, 77, 78, 79, 93, 94)
    c.latents = ()          # () proposes the top `n_latents` over the patches
    c.n_latents = 3
    c.dense_frequency = 1e-2
    c.slider = -11.0
    c.sliders = tuple(float(s) for s in range(-20, 21, 2))
    if variant == "small":
        c.backbone = dict(name="", random=dict(family="clip", directory="/tmp/saejax-random-backbones", seed=0,
                                               sizes=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=64, image_size=32, patch_size=8)))
        c.sae = dict(kind="random", d_sae=128, seed=0)
        c.layer = 1
        c.data = dict(root="/tmp/saejax-tiny-cub-mixed", image_size=32, skip_unreadable=True,
                      tiny_tree=dict(n_classes=4, per_class=6, size=48, unreadable=1))
        c.batch_size = 12
        c.probe = dict(epochs=400, batch_size=64, learning_rates=(0.1, 0.3), weight_decays=(1e-4,))
        c.stats_images = 12
        c.image, c.patches = 0, (5, 6, 9, 10)
        c.dense_frequency = 1.0  # a random SAE has no sparse latents to keep
        c.slider = -10.0
        c.sliders = (-20.0, -10.0, 0.0, 10.0, 20.0)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
