"""Latents shared and unique across two models (`saejax.cli.compare`, `saejax.compare`).

    saejax compare --workdir=DIR --config.models.a.demo=DEMO_A --config.models.b.demo=DEMO_B
    saejax compare --workdir=DIR --config.models.a.backbone.name=openai/clip-vit-base-patch16 \
        --config.models.a.sae.path=CLIP_SAE --config.models.a.layer=10 --config.models.b... --config.level=image
    saejax compare --workdir=DIR --config=compare:small

Keys::

    models.a, models.b   each a model: `demo` (a finished `saejax demo` workdir: its backbone,
                  SAE and block) or `backbone`, `sae`, `layer` as in `saejax.cli.browse`; `name`
                  labels it on the page
    data          the images both read (`builders.build_source`, its `split`); with two demos and
                  no data given, model A's shapes world
    images        images streamed
    level         "patch" (each patch a sample; both grids must agree) or "image" (each latent's
                  max per image; any grids)
    threshold     a latent is shared when its best match correlates at least this much
    exemplars     top images kept per latent; listed: unmatched latents shown per side
    browser       the two feature browsers written beside the page (`k`, `max_pages`; the listed
                  latents always get pages)

Writes DIR/compare.json, DIR/index.html and DIR/a/, DIR/b/ (each model's browser). Expected on
the demo's world (`--config.models.a.demo` factorised, `b` conjunction): colour latents shared,
the factorised ViT's texture latents unmatched (README, "Finding features automatically").

`:small`: two tiny random backbones with random SAEs on 64 shapes images, in under a minute.
"""

import ml_collections

from saejax.configs.paper import source_keys

_RANDOM = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=40,
               patch_size=8)


def _model(name: str, **kwargs):
    return dict(dict(name=name, demo="", backbone=dict(name="", dtype="float32"), sae=dict(kind="saejax", path=""),
                     layer=10), **kwargs)


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.models = {"a": _model("a"), "b": _model("b")}
    c.data = source_keys(kind="", image_size=224, seed=1, validation_images=1_000)
    c.split = "validation"
    c.images = 1_000
    c.level = "patch"
    c.threshold = 0.5
    c.batch_size = 64
    c.exemplars = 8
    c.listed = 40
    c.browser = dict(k=12, max_pages=100)
    if variant == "small":
        c.models = {side: _model(f"random {family}", layer=1, sae=dict(kind="random", d_sae=64, seed=seed),
                                 backbone=dict(name="", random=dict(family=family, seed=seed, sizes=_RANDOM,
                                                                    directory=f"/tmp/saejax-random-backbones/{family}")))
                    for side, family, seed in (("a", "vit", 0), ("b", "dinov2", 1))}
        c.models.b.backbone.random.sizes.update(patch_size=8, image_size=40)
        c.data = source_keys(kind="shapes", validation_images=64, seed=0, image_size=40)
        c.images, c.batch_size, c.listed = 64, 16, 10
        c.browser = dict(k=4, max_pages=8)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
