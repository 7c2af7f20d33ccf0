"""Semantic probing, CLIP vs DINOv2 (the paper's concept comparison); see `saejax.cli.semprobe`.

    saejax semprobe --config=semprobe --workdir=DIR \
        --config.data.root=/data/concepts --config.models.clip.sae.path=/models/clip_sae/sae.pt \
        --config.models.dinov2.sae.path=/models/dinov2_sae/sae.pt --config.models.dinov2.sae.norm_mean=/models/dinov2_mu.npy

Needs a concept tree (`positives/<concept>/` with about 20 images each, `negatives/` with about
20 shared ones; gather them yourself, e.g. flags, landmarks and jerseys for "brazil"), or a
Hugging Face data set of them (`--config.data.kind=hf --config.data.path=...`: its label column a
`ClassLabel` whose first class is "negative", then one class per concept),
openai/clip-vit-base-patch16 and facebook/dinov2-base, and saev's two SAEs
(`osunlp/SAE_CLIP_24K_ViT-B-16_IN1K`, `osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K`; the DINOv2 one reads
`(x - mu) / 2.0181241035461426`).

Expected, from the paper (not run here: no network, no GPU): CLIP has a "Brazil" latent (F1
high, p small) and DINOv2 has none near it. With 20 positives and 20 negatives and 24,576
latents, a p-value below 0.01 needs the best F1 well above what the shuffled labels' best
latent reaches; the random-latent columns show what a latent picked blindly scores.

`:small`: two tiny random models (CLIP and DINOv2 families), random SAEs and a tiny synthetic
concept tree, in well under a minute on 2 CPU cores.
"""

import ml_collections


def _random_model(family):
    return dict(layer=1, sae=dict(kind="random", d_sae=128, seed=0),
                backbone=dict(name="", random=dict(family=family, directory="/tmp/saejax-random-backbones", seed=0,
                                                   sizes=dict(hidden_size=32, num_hidden_layers=3,
                                                              num_attention_heads=2, intermediate_size=64,
                                                              image_size=32, patch_size=8))))


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # kind "folders" (a concept tree at `root`) or "hf" (`path`, `split`, `image_column`, `label_column`)
    c.data = dict(kind="folders", root="", image_size=224, skip_unreadable=False,  # True: skip and count unreadable
                  path="", split="train", image_column="image", label_column="label")
    c.models = {"clip": dict(layer=10, sae=dict(kind="saev", path="", norm_scalar=0.0),
                             backbone=dict(name="openai/clip-vit-base-patch16", dtype="float32")),
                "dinov2": dict(layer=10, sae=dict(kind="saev", path="", norm_mean="", norm_scalar=2.0181241035461426),
                               backbone=dict(name="facebook/dinov2-base", dtype="float32"))}
    c.batch_size = 32
    c.top = 5
    c.n_permutations = 1000
    c.n_random = 1000
    c.exemplars = 8
    if variant == "small":
        c.data = dict(kind="folders", root="/tmp/saejax-tiny-concepts-mixed", image_size=32, skip_unreadable=True,
                      tiny_tree=dict(per_concept=8, negatives=9, unreadable=1), path="", split="train",
                      image_column="image", label_column="label")
        c.models = {"clip": _random_model("clip"), "dinov2": _random_model("dinov2")}
        c.n_permutations, c.n_random = 200, 100
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
