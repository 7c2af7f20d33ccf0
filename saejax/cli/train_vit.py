"""Train the shapes world's ViT and save it as an HF checkpoint directory.

    saejax train_vit --workdir=/tmp/saejax-shapes [--config=shapes_vit]

Writes `<workdir>/vit/` (`<workdir>/vit_conjunction/` with `--config.targets=conjunction`;
`config.json`, `model.safetensors`, `preprocessor_config.json` and
`training.json` with the settings, validation accuracy and loss history). Rerunning with the
same config reuses the checkpoint. At the end the checkpoint is loaded back with
`saejax.backbones.load` and its validation accuracy through `Backbone.forward` is printed next
to the one measured at training time (they must agree).
"""

from __future__ import annotations

import os
import time

import saejax
from saejax.cli.entry import run_binary
from saejax.datasets import shapes
from saejax.studies.shapes_vit import vit_accuracy, task_heads, train_shapes_vit

def run(config, workdir: str) -> float:
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    first = {}

    def progress(entry):
        now = time.time()
        if not first:
            first.update(step=entry["step"], time=now)
        rate = (entry["step"] - first["step"]) * config.batch_size / max(now - first["time"], 1e-9)
        patch = f"  patch accuracy {entry['patch_accuracy']:.3f}" if "patch_accuracy" in entry else ""
        speed = f"  {rate:,.0f} images/s" if rate else ""
        print(f"step {entry['step']}/{config.steps}  loss {entry['loss']:.4f}  batch accuracy {entry['accuracy']:.3f}"
              f"{patch}  lr {entry['lr']:.2e}{speed}  {now - start:.0f} s", flush=True)

    result = train_shapes_vit(workdir, callback=progress, **config.to_dict())
    if result.reused:
        print(f"reusing {result.path} (trained in {result.seconds:.0f} s)")
    else:
        print(f"trained in {result.seconds:.1f} s; saved {result.path}")
    print(f"validation accuracy (training module): {result.val_accuracy:.4f}")

    bb, params = saejax.backbones.load(result.path)
    val = shapes.source("validation", config.n_val, seed=config.seed, image_size=config.image_size)
    heads = task_heads(config.targets)
    accuracy = vit_accuracy(lambda p, x: bb.forward(p, x).logits, params, val, processing=bb.processing,
                        image_heads=heads["image_heads"], image_targets=heads["image_targets"])
    print(f"validation accuracy (saejax.backbones.load + forward): {accuracy:.4f}")
    print(f"total {time.time() - start:.1f} s")
    return accuracy



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("train_vit", run, "shapes_vit.py", argv=argv, workdir_help="Directory for the ViT checkpoint (<workdir>/vit).")


if __name__ == "__main__":
    main()
