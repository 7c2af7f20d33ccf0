"""The paper's classification experiment (section 5.1): edit a bird's patches through an SAE and
watch a linear probe's class probabilities move.

    saejax cub_edit --config=cub --workdir=DIR
    saejax cub_edit --config=cub:small --workdir=DIR

1. A linear probe (200 classes) on the final CLS (after the final norm), trained on CUB's train
   split with AdamW over a small lr x weight-decay sweep; the sweep is scored on 10% of the
   train split held out, and the chosen probe's test accuracy is reported.
2. On one test image: the selected patches, the top 3 latents summed over them (dense latents,
   frequency >= `dense_frequency`, dropped; or the config's `latents`), set to `slider x max`
   at the SAE's block, keeping the SAE error; the model finishes its pass; the probe reads the
   probabilities. One jitted, vmapped call gives the curve over all `sliders`.

Writes `DIR/probe.json`, `DIR/edit.json` (latents, their frequency and max, top-5 classes before
and after, the curve) and `DIR/edit.png` (the image with the selected patches, bars before and
after). The logic is `saejax.studies.cub_edit` (with `saejax.probe_edits`).
"""

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax.datasets import cub
from saejax.studies.cub_edit import run_cub_edit


def run(config, workdir: str) -> dict:
    root = builders.ensure_tiny_tree(config.data, lambda r: cub.write_tiny_tree(r, **config.data.get("tiny_tree", {})))
    size = config.data.image_size
    train, test = (cub.source(root, split, image_size=size, skip_unreadable=config.data.get("skip_unreadable", False))
                   for split in ("train", "test"))
    return run_cub_edit(
        builders.build_site(config.backbone, config.sae, config.layer, size), train, test, workdir,
        image=config.image, patches=tuple(config.patches), probe_sweep=dict(config.probe, seed=config.seed),
        latents=tuple(config.get("latents") or ()), n_latents=config.n_latents, dense_frequency=config.dense_frequency,
        slider=config.slider, sliders=tuple(config.sliders), stats_images=config.stats_images,
        batch_size=config.batch_size)



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("cub_edit", run, "cub.py", argv=argv)


if __name__ == "__main__":
    main()
