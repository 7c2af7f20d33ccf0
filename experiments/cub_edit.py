"""The paper's classification experiment (section 5.1): edit a bird's patches through an SAE and
watch a linear probe's class probabilities move.

    python -m experiments.cub_edit --config=experiments/configs/cub.py --workdir=DIR
    python -m experiments.cub_edit --config=experiments/configs/cub.py:small --workdir=DIR

1. A linear probe (200 classes) on the final CLS (after the final norm), trained on CUB's train
   split with AdamW over a small lr x weight-decay sweep; the sweep is scored on 10% of the
   train split held out, and the chosen probe's test accuracy is reported.
2. On one test image: the selected patches, the top 3 latents summed over them (dense latents,
   frequency >= `dense_frequency`, dropped; or the config's `latents`), set to `slider x max`
   at the SAE's block, keeping the SAE error; the model finishes its pass; the probe reads the
   probabilities. One jitted, vmapped call gives the curve over all `sliders`.

Writes `DIR/probe.json`, `DIR/edit.json` (latents, their frequency and max, top-5 classes before
and after, the curve) and `DIR/edit.png` (the image with the selected patches, bars before and
after). The logic is `saejax.probe_edits`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.paper_builders import build_backbone, build_sae, ensure_tiny_tree, run_binary, skipped_report
from saejax import data, probe_edits, probes, viz
from saejax.datasets import cub


def pooled_features(readout, source, batch_size, limit=None):
    feats, labels = [], []
    for batch in data.one_pass(source, batch_size, limit=limit):
        feats.append(np.asarray(readout.encode(batch.images)["pooled"]))
        labels.append(batch.labels)
    return np.concatenate(feats), np.concatenate(labels)


def train_probe(config, train_x, train_y, test_x, test_y, n_classes):
    """The lr x wd sweep scored on a held-out 10% of train; the chosen probe retrained on all of
    train and scored on test."""
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(train_x))
    held = order[: max(1, len(order) // 10)]
    fit = order[len(held):]
    p = config.probe

    def train(x, y, lr, wd):
        return probes.train_linear_probe(jax.random.key(config.seed), jnp.asarray(x), jnp.asarray(y), n_classes,
                                         epochs=p.epochs, batch_size=p.batch_size, learning_rate=lr, weight_decay=wd)

    def accuracy(probe, x, y):
        return float(np.mean(np.asarray(probes.predict(probe, jnp.asarray(x))) == y))

    sweep = [{"learning_rate": lr, "weight_decay": wd,
              "held_out_accuracy": accuracy(train(train_x[fit], train_y[fit], lr, wd), train_x[held], train_y[held])}
             for lr in p.learning_rates for wd in p.weight_decays]
    best = max(sweep, key=lambda r: r["held_out_accuracy"])
    probe = train(train_x, train_y, best["learning_rate"], best["weight_decay"])
    return probe, {"sweep": sweep, "chosen": best, "test_accuracy": accuracy(probe, test_x, test_y),
                   "chance": 1 / n_classes, "train_images": len(train_x), "test_images": len(test_x)}


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    bb, bb_params = build_backbone(config.backbone)
    ae, sae_params, norm = build_sae(config.sae, bb.d_model)
    root = ensure_tiny_tree(config.data, lambda r: cub.write_tiny_tree(r, **config.data.get("tiny_tree", {})))
    size = config.data.image_size
    train, test = (cub.source(root, split, image_size=size, skip_unreadable=config.data.get("skip_unreadable", False))
                   for split in ("train", "test"))
    readout = probe_edits.Readout(bb, bb_params, layer=config.layer, ae=ae, sae_params=sae_params, norm=norm,
                                  processing=probe_edits.cropped_processing(bb, size))

    train_x, train_y = pooled_features(readout, train, config.batch_size)
    test_x, test_y = pooled_features(readout, test, config.batch_size)
    probe, probe_report = train_probe(config, train_x, train_y, test_x, test_y, len(train.classes))
    probe_report["skipped_images"] = skipped_report(train=train, test=test)
    json.dump(probe_report, open(os.path.join(workdir, "probe.json"), "w"), indent=2)
    print(f"probe: test accuracy {probe_report['test_accuracy']:.3f} (lr {probe_report['chosen']['learning_rate']}, "
          f"wd {probe_report['chosen']['weight_decay']})", flush=True)

    stats = probe_edits.latent_stats(readout, (b.images for b in data.one_pass(test, config.batch_size,
                                                                               limit=config.stats_images)))
    example = test[config.image]
    image = example.image[None]
    mask = probe_edits.patch_token_mask(bb, config.patches)
    selected = np.zeros(bb.layout.n_patches, bool)
    selected[list(config.patches)] = True
    encoded = readout.encode(image)
    codes = encoded["codes"][0]
    if config.get("latents"):
        latents = np.asarray(config.latents, np.int64)
        probe_edits.check_choice(ae, latents)
    else:
        latents, _ = probe_edits.propose_latents(codes, jnp.asarray(selected), jnp.asarray(stats["frequency"]),
                                                 n=config.n_latents, dense_threshold=config.dense_frequency)
        latents = np.asarray(latents)
    maxima = stats["max"][latents]
    curve = probe_edits.slider_curve(bb, bb_params, layer=config.layer, ae=ae, sae_params=sae_params, norm=norm,
                                     probe=probe)
    sliders = np.asarray(config.sliders, np.float32)
    probabilities = np.asarray(curve(readout.pixels(image), jnp.asarray(mask), jnp.asarray(latents),
                                     jnp.asarray(maxima), jnp.asarray(np.append(sliders, config.slider))))
    before = np.asarray(jax.nn.softmax(probe.logits(encoded["pooled"][0])))
    after, curve_values = probabilities[-1], probabilities[:-1]
    names = train.classes

    def top(probs):
        return [{"class": names[k], "probability": float(probs[k])} for k in np.argsort(-probs)[:5]]

    watched = list(dict.fromkeys([*np.argsort(-before)[:3].tolist(), *np.argsort(-after)[:3].tolist()]))
    report = {"image": config.image, "path": test.describe(config.image), "label": names[int(example.label)],
              "patches": list(config.patches), "layer": config.layer,
              "latents": [{"latent": int(i), "frequency": float(stats["frequency"][i]), "max": float(stats["max"][i]),
                           "sum_over_patches": float(jnp.sum(jnp.where(jnp.asarray(selected), codes[:, i], 0)))}
                          for i in latents],
              "slider": config.slider, "before": top(before), "after": top(after),
              "curve": {"sliders": sliders.tolist(),
                        "probabilities": {names[k]: curve_values[:, k].tolist() for k in watched}}}
    json.dump(report, open(os.path.join(workdir, "edit.json"), "w"), indent=2)
    png = viz.before_after_png(example.image, selected.reshape(bb.grid), before, after, names,
                               title=f"{report['path'].split(os.sep)[-1]}: latents {latents.tolist()} at "
                                     f"{config.slider:g} x max")
    open(os.path.join(workdir, "edit.png"), "wb").write(png)
    print(f"latents {latents.tolist()} at {config.slider:g} x max: " + ", ".join(
        f"{names[k]} {before[k]:.2f} -> {after[k]:.2f}" for k in watched), flush=True)
    return {"probe": probe_report, "edit": report, "before": before, "after": after, "curve": curve_values}


if __name__ == "__main__":
    run_binary(run, "experiments/configs/cub.py")
