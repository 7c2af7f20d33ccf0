"""Find the latents that control a model's prediction, and verify them by intervention.

    saejax discover --workdir=DIR --config.demo=DEMO_DIR
    saejax discover --workdir=DIR --config=discover:small

The settings are `saejax/configs/discover.py`. Every latent's activation x gradient to the
head's target logit ranks candidates per class on training images; each candidate is then
suppressed and amplified on validation images against matched random latents and directions,
with permutation p-values (`saejax.discovery`). Writes `DIR/discovery.json`, the page
`DIR/index.html` and, beside it, a feature browser of the SAE (`DIR/browser/`), to which every
candidate links.
"""

import json
import os

import jax
import ml_collections

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax import browser
from saejax.analysis import discovery
from saejax.checkpoint.staging import write_atomically
from saejax.datasets import shapes
from saejax.pages import findings


def resolve(config) -> ml_collections.ConfigDict:
    """The config with `demo` (a demo workdir) expanded into its model and its world; a
    factorised ViT's head defaults to its colour head (a conjunction ViT's to its 16 classes)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.demo:
        return config
    model = builders.resolve_model(config)
    config.backbone, config.sae, config.layer = model.backbone, model.sae, model.layer
    config.data = ml_collections.ConfigDict({"kind": "shapes", "train_images": config.images,
                                             "validation_images": config.verify_images, "seed": 3,
                                             "image_size": model.image_size})
    targets = (builders.demo_summary(config.demo).get("vit") or {}).get("targets")
    if targets == "factorised" and tuple(config.head.logits) == (0, 0) and not config.head.classes:
        config.head.logits, config.head.classes = (0, len(shapes.COLOURS)), shapes.COLOURS
    return config


def run(config, workdir: str) -> dict:
    config = resolve(config)
    sae_site = builders.build_site(config.backbone, config.sae, config.layer)
    path = config.backbone.get("name") or config.backbone.random.directory
    head, classes = builders.build_head(sae_site.bb, sae_site.bb_params, config.head, path)
    source, verify_source = (builders.build_source(config.data, split) for split in ("train", "validation"))
    result = discovery.discover(sae_site, head, source, verify_source, classes=classes, images=config.images,
                                verify_images=config.verify_images, candidates=config.candidates,
                                batch_size=config.batch_size, objective=config.objective, targets=config.targets,
                                settings=discovery.Verification(**config.verification))
    result["model"] = {"backbone": path, "sae": config.sae.to_dict(), "layer": config.layer}
    for cls in result["classes"]:
        print(f"{cls['name']:>16}: candidates {[c['latent'] for c in cls['candidates']]}, verified {cls['verified']}",
              flush=True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_atomically(os.path.join(workdir, "discovery.json"), json.dumps(result, indent=2))
    named = [c["latent"] for cls in result["classes"] for c in cls["candidates"]]
    browser.browse(sae_site, verify_source, os.path.join(workdir, "browser"), k=config.browser.k,
                   batch_size=config.batch_size, limit=config.browser.images, max_pages=config.browser.max_pages,
                   title=f"SAE at block {config.layer}", pages_for=named)
    if jax.process_index() == 0:
        print(f"wrote {findings.write_discovery_page(workdir, result)}", flush=True)
    return result



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("discover", run, "discover.py", argv=argv, workdir_help="Where discovery.json, the page and the browser go.")


if __name__ == "__main__":
    main()
