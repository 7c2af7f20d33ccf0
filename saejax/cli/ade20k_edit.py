"""The paper's segmentation experiment (section 5.2) and its unfinished quantitative test.

    saejax ade20k_edit --config=ade20k --workdir=DIR
    saejax ade20k_edit --config=ade20k:small --workdir=DIR

1. A linear probe (151 classes) on the backbone's final patch tokens, trained on ADE20K
   training patches (label = the mode of the patch's pixels, "other" dropped). Validation mIoU
   over the 150 classes and pixel accuracy, with logits bilinearly upsampled to pixels.
2. For every class with enough validation patches, a feature picked four ways (a random unit
   direction of matched norm, a random live latent, the latent with the best patch-level F1
   at thresholds {0, 0.1, 0.3, 1}, a latent named in the config), set to -2 x its max on all
   tokens and only where it fires, at the one block the SAE reads. Target and other change
   rates per class, and their mean +- std over classes.

Writes `DIR/probe.json` (mIoU, pixel accuracy, per-class IoU), `DIR/quantitative.json` (per
class and summary) and `DIR/quantitative.csv`. The logic is `saejax.studies.ade20k_edit` (with `saejax.segmentation`).
"""

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax.datasets import ade20k
from saejax.studies.ade20k_edit import run_ade20k_edit


def run(config, workdir: str) -> dict:
    root = builders.ensure_tiny_tree(config.data, lambda r: ade20k.write_tiny_tree(r, **config.data.get("tiny_tree", {})))
    size = config.data.image_size
    train, val = (ade20k.source(root, split, image_size=size, short_side=config.data.short_side,
                                skip_unreadable=config.data.get("skip_unreadable", False))
                  for split in ("training", "validation"))
    return run_ade20k_edit(
        builders.build_site(config.backbone, config.sae, config.layer, size), train, val, workdir,
        probe=config.probe.to_dict(), probe_images=config.probe_images, eval_images=config.eval_images,
        norm_sample_patches=config.norm_sample_patches, min_patches=config.min_patches,
        class_latents={int(k): int(v) for k, v in config.get("class_latents", {}).items()},
        value_scale=config.value_scale, batch_size=config.batch_size,
        probe_buffer_tokens=config.probe_buffer_tokens, seed=config.seed)



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("ade20k_edit", run, "ade20k.py", argv=argv)


if __name__ == "__main__":
    main()
