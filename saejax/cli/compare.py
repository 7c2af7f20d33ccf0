"""Match the latents of two SAEs (on two backbones, blocks or runs) by the correlation of their
activations on the same images: which features are shared, which are unique.

    saejax compare --workdir=DIR --config.models.a.demo=DEMO_A --config.models.b.demo=DEMO_B
    saejax compare --workdir=DIR --config=compare:small

The settings are `saejax/configs/compare.py`; the logic is `saejax.compare`. Writes
`DIR/compare.json`, the page `DIR/index.html` and each model's feature browser (`DIR/a/`,
`DIR/b/`), to which the page links.
"""

import json
import os

import jax
import ml_collections

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax import browser
from saejax.analysis import compare
from saejax.checkpoint.staging import write_atomically
from saejax.pages import findings


def run(config, workdir: str) -> dict:
    models = {side: builders.resolve_model(config.models[side]) for side in ("a", "b")}
    sites = {side: builders.build_site(m.backbone, m.sae, m.layer) for side, m in models.items()}
    data = ml_collections.ConfigDict(config.data.to_dict())
    if not data.kind:
        if not models["a"].image_size:
            raise ValueError("give data.kind (the images both models read), or models.a.demo")
        data = ml_collections.ConfigDict({"kind": "shapes", "validation_images": config.images, "seed": 2,
                                          "image_size": models["a"].image_size})
    source = builders.build_source(data, config.split)
    names = (models["a"].name, models["b"].name)
    result = compare.compare(sites["a"], sites["b"], source, names=names, level=config.level,
                             threshold=config.threshold, limit=config.images, batch_size=config.batch_size,
                             exemplars=config.exemplars)
    result["models"] = {side: {"backbone": m.backbone.get("name") or "random", "sae": m.sae.to_dict(),
                               "layer": m.layer} for side, m in models.items()}
    for side, name in zip(("a", "b"), names):
        r = result[side]
        print(f"{name}: {r['live']} live latents, shared share {r['shared_share']:.3f}, "
              f"{len(r['unmatched'])} unmatched", flush=True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_atomically(os.path.join(workdir, "compare.json"), json.dumps(result, indent=2))
    for side, other in (("a", "b"), ("b", "a")):
        listed = [u["latent"] for u in result[side]["unmatched"][:config.listed]]
        listed += [m["latent"] for m in sorted(result[side]["matches"], key=lambda m: -m["score"])[:10]]
        listed += [u["best"] for u in result[other]["unmatched"][:config.listed] if u["best"] >= 0]
        browser.browse(sites[side], source, os.path.join(workdir, side), k=config.browser.k,
                       batch_size=config.batch_size, limit=config.images, max_pages=config.browser.max_pages,
                       title=f"{names['ab'.index(side)]}, block {models[side].layer}", pages_for=listed)
    if jax.process_index() == 0:
        print(f"wrote {findings.write_compare_page(workdir, result, source, listed=config.listed)}", flush=True)
    return result



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("compare", run, "compare.py", argv=argv, workdir_help="Where compare.json, the page and the browsers go.")


if __name__ == "__main__":
    main()
