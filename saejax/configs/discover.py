"""Finding the latents that control a prediction (`saejax.cli.discover`, `saejax.discovery`).

    saejax discover --workdir=DIR --config.demo=DEMO_DIR      # the demo's world
    saejax discover --workdir=DIR --config.backbone.name=HF_DIR --config.sae.path=SAE_DIR \
        --config.layer=10 --config.data.kind=folder --config.data.train_dir=... --config.data.validation_dir=...
    saejax discover --workdir=DIR --config=discover:small

Keys::

    demo          a finished `saejax demo` workdir: its backbone, SAE, block and world (shapes
                  images at the demo's size) replace `backbone`, `sae`, `layer` and `data`; the
                  head defaults to the factorised ViT's colour head (its logits 0-4), or to a
                  conjunction ViT's 16 colour-shape classes
    backbone, sae, layer   the model and the SAE at its block (as `saejax.cli.browse`)
    head          kind "classifier" (the checkpoint's logits; `logits=(start, stop)` picks one
                  softmax head, (0, 0) all) or "zero_shot" (a full CLIP checkpoint over `prompts`);
                  `classes` names them (default: the checkpoint's id2label, or the prompts)
    data          the source (`builders.build_source`): latents are ranked on `images` images of
                  the train split and verified on `verify_images` of the validation split
    candidates    latents tested per class
    objective     "centred_logit", "logit" or "log_prob" (`discovery.latent_attribution`)
    targets       "prediction" (the head's own) or "label"
    verification  `discovery.Verification`: suppress_scale, amplify_scale, draws, permutations,
                  alpha, max_frequency (dense latents), seed
    browser       the feature browser written beside the page (`k` top images, `images` streamed,
                  `max_pages`; the candidates always get pages)

Writes DIR/discovery.json, DIR/index.html and DIR/browser/. Expected on the full demo's world
(factorised ViT, colour head): each colour's F1-best latent is its class's first candidate and
verified (README, "Finding features automatically").

`:small`: a tiny random ViT classifier (4 classes), a random ReLU SAE and 112 shapes images, in
under a minute on CPU; a plumbing run (its random latents all fire on most patches, so
`max_frequency` is 1).
"""

import ml_collections
from ml_collections import config_dict

from saejax.configs.paper import imagenet, source_keys


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.demo = ""
    c.backbone = dict(name="", dtype="float32")
    c.sae = dict(kind="saejax", path="")
    c.layer = 2
    c.head = dict(kind="classifier", logits=(0, 0), prompts=(), classes=())
    c.data = imagenet(224)
    c.images = 2_000
    c.verify_images = 500
    c.candidates = 5
    c.objective = "centred_logit"
    c.targets = "prediction"
    c.batch_size = 64
    c.verification = dict(suppress_scale=-2.0, amplify_scale=2.0, draws=3, permutations=config_dict.placeholder(int), alpha=0.01,
                          max_frequency=0.1, seed=0)
    c.browser = dict(k=16, images=1_000, max_pages=200)
    if variant == "small":
        c.backbone = dict(name="", random=dict(family="vit", directory="/tmp/saejax-random-backbones/vit4", seed=0,
                                               n_classes=4, sizes=dict(hidden_size=32, num_hidden_layers=3,
                                                                       num_attention_heads=2, intermediate_size=64,
                                                                       image_size=40, patch_size=8)))
        c.sae = dict(kind="random", d_sae=128, seed=0)
        c.layer = 1
        c.data = source_keys(kind="shapes", train_images=64, validation_images=48, image_size=40)
        c.images, c.verify_images, c.candidates, c.batch_size = 64, 48, 2, 16
        c.verification.update(permutations=1_000, max_frequency=1.0)
        c.browser = dict(k=4, images=48, max_pages=8)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
