"""The whole loop of the paper on one machine, offline: a ViT, an SAE trained on its residual
stream on the fly, features matched to ground-truth concepts, and interventions measured.

    saejax demo --workdir=/tmp/saejax-demo          # about 9 min on 2 CPU cores
    saejax demo --workdir=/tmp/saejax-demo --config=shapes_demo:small
    saejax demo --workdir=/tmp/demo-dinov2 --config.demo.backbone=/path/to/hf_dinov2_dir

The settings are `saejax/configs/shapes_demo.py` (`--config.demo.*`; `:small` is the
reduced run the tests use).

Steps:

1. The shapes world (`saejax.datasets.shapes`, 64 px images by default: an 8 x 8 grid of 8 px
   patches) and a small ViT trained on it (`saejax.studies.shapes_vit.train_shapes_vit`,
   reused when `<workdir>/vit` matches). `demo.targets=factorised` (default) asks the ViT for
   colour and shape as separate heads and, per patch, for each factor (colour, shape, size,
   background texture); `demo.targets=conjunction` for the 16 colour-shape classes.
   `demo.backbone=<hub id or HF dir>` uses a pretrained model instead: the world is drawn at the
   size that gives it the same patch grid (DINOv2 at 112 px: 8 x 8 patches of 14 px; a 16 px-patch
   CLIP at 128 px), and the model runs there with interpolated position embeddings.
2. A BatchTopK SAE (k=4, 16 x width latents) on block 2 of 4 (`saejax/configs/shapes_demo.py`,
   the setting `benchmarks.concepts` picks; `demo.architecture`, `demo.k` and `demo.expansion` choose
   another; on a pretrained backbone the block two thirds of the way up, or `demo.layer`) via
   `saejax.run.run_training` in `<workdir>/sae_run` (resumable like any run); the trained states
   come back in memory.
3. On validation images: the best latent per concept of `shapes.FACTOR_CONCEPTS` with the
   bounds that explain a low F1, the baseline dictionaries, and the edits read out by probes
   against matched baselines; see `saejax.studies.shapes_demo.analyse`, which does it.
4. `<workdir>/report/index.html` (self-contained, `shapes_demo.write_page`) and
   `<workdir>/report/summary.json`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections

import saejax

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax import backbones, losses, site, train
from saejax.datasets.shapes_backbones import default_layer, image_sizes
from saejax.studies.shapes_vit import SHAPES_VIT, train_shapes_vit
from saejax.studies import shapes_demo

WORLD_PATCH = SHAPES_VIT["patch_size"]  # demo.image_size / WORLD_PATCH is the grid


def configure_sae(config, d_model: int, architecture: str, k: int | None, expansion: int | None) -> None:
    """Overrides the config's SAE (`benchmarks.concepts` names the settings the same way)."""
    if architecture:
        config.sae.architecture = "batchtopk" if architecture == "matryoshka" else architecture
    if expansion is not None:
        config.sae.expansion = expansion
    if k is not None:
        config.sae.k, config.sweep.k = k, (k,)
    if architecture == "matryoshka":
        d_sae = config.sae.expansion * d_model
        config.objective.matryoshka_prefixes = losses.halving_prefixes(d_sae)


def run(config, workdir: str) -> dict:
    """The demo from `saejax/configs/shapes_demo.py`'s config; returns `summary.json`'s contents."""
    start_time = time.time()
    demo = config.demo
    config = ml_collections.ConfigDict(config.to_dict())  # the SAE run's config: the demo keys are not part of it
    del config["demo"]
    report_dir = os.path.join(workdir, "report")
    os.makedirs(report_dir, exist_ok=True)

    # 1. The backbone: the world's ViT, trained here, or a pretrained one.
    vit = None
    if not demo.backbone:
        vit = train_shapes_vit(workdir, seed=0, image_size=demo.image_size, targets=demo.targets, **demo.vit)
        print(f"ViT ({demo.targets}): validation accuracy {vit.val_accuracy:.4f} "
              f"({'reused' if vit.reused else f'{vit.seconds:.0f} s'})", flush=True)
        config.backbone.name, world_size = vit.path, demo.image_size
    else:
        load_size, world_size = image_sizes(demo.backbone, demo.image_size // WORLD_PATCH)
        config.backbone.name, config.backbone.image_size = demo.backbone, load_size
        print(f"backbone {demo.backbone} at {world_size} px", flush=True)
    config.data.image_size = world_size
    model = backbones.load(config.backbone.name, image_size=config.backbone.get("image_size"))[0]
    if demo.layer is not None or demo.backbone:
        config.layers = (default_layer(model.n_layers) if demo.layer is None else demo.layer,)
    configure_sae(config, model.d_model, demo.architecture, demo.k, demo.expansion)

    # 2. The SAE, trained on the backbone's residual stream on the fly.
    sae_dir = os.path.join(workdir, "sae_run")
    trained = builders.train_sae(config, sae_dir)  # the trained states come back in memory
    layer = config.layers[0]
    sae_site = site.Site(trained.bb, trained.bb_params, layer=layer, ae=trained.trainer.ae,
                         sae_params=jax.device_get(train.member(trained.states[layer], 0).params),
                         norm=trained.normalization[layer])

    # 3. Features, probes and edits on validation images.
    n_val = demo.validation_images
    edit_images = demo.edit_images or (n_val if not demo.backbone else 250)
    results, pictures = shapes_demo.analyse(sae_site, world_size=world_size, n_val=n_val, edit_images=edit_images,
                                            probe_images=demo.probe_images, probe_epochs=demo.probe_epochs)

    # 4. The summary and the page.
    bb, ae, member = sae_site.bb, sae_site.ae, trained.evaluation["members"][0]
    summary = {
        "seconds": time.time() - start_time,
        "backbone": {"name": demo.backbone or "shapes ViT", "path": config.backbone.name, "family": bb.family,
                     "image_size": bb.image_size, "grid": list(bb.grid), "n_layers": bb.n_layers,
                     "targets": demo.targets if not demo.backbone else None},
        "vit": None if vit is None else {"val_accuracy": vit.val_accuracy, "path": vit.path, "targets": demo.targets},
        "sae": {"l0": member["l0"], "nmse": member["nmse"], "explained_variance": member["explained_variance"],
                "dead_fraction": member["dead_fraction"], "dense_fraction": member["dense_fraction"],
                "d_sae": ae.d_sae, "architecture": ae.architecture, "k": getattr(ae, "k", None), "layer": layer,
                "matryoshka_prefixes": config.objective.get("matryoshka_prefixes"), "path": member["path"]},
        **results,
        "written_by": saejax.written_by(),
    }
    with open(os.path.join(report_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    page = shapes_demo.write_page(report_dir, summary, sae_dir, pictures["images"], pictures["exemplars"], bb.grid)
    print(f"wrote {page} ({summary['seconds']:.0f} s)", flush=True)
    return summary



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("demo", run, "shapes_demo.py", argv=argv, workdir_help="Where the ViT, the SAE run and the report go.")


if __name__ == "__main__":
    main()
