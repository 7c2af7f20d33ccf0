"""Writes the Colab notebooks in this folder (saved without outputs). Edit the cells here and run
`python colab/build_notebooks.py`; `tests/test_notebooks.py` executes the result top to bottom."""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from saejax.provenance import __version__

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = f'''# On Colab (Runtime > Change runtime type > TPU), install saejax {__version__} with the TPU extra.
# From a checkout instead: pip install -e "/path/to/saejax[tpu]" (on a GPU: the cuda extra).
import importlib.util, subprocess, sys
if importlib.util.find_spec("saejax") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "saejax[tpu]=={__version__}"])'''

SMALL = '''import os
# SMALL: a tiny random backbone, a random or tiny SAE and synthetic images, so every cell runs in
# seconds on a CPU (the test suite runs it so). Set it to False on a TPU for the real models.
SMALL = os.environ.get("SAEJAX_SMALL", "0") == "1"
import jax, jax.numpy as jnp, numpy as np
import saejax
print(jax.devices())'''


def quickstart():
    return [
        new_markdown_cell("# saejax quickstart: stream a ViT's activations and train an SAE\n\n"
                          "A backbone, an image source, a layer: `ActivationStream` gives batches of activations "
                          "and `saejax.loop.fit` trains a sweep of SAEs on them."),
        new_code_cell(INSTALL), new_code_cell(SMALL),
        new_code_cell('''from saejax import backbones, data, loop, sae, stream, train
from saejax.datasets import shapes
from saejax.core.losses import Objective

if SMALL:
    path = backbones.create_random("clip", "/tmp/saejax-nb-clip", hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, intermediate_size=64, image_size=40, patch_size=8)
    bb, bb_params = backbones.load(path, cache_dir=False)
    source = shapes.source("train", 512, seed=0, image_size=40)           # labelled synthetic images
    layer, steps, batch_size, d_sae = 1, 60, 256, 256
else:
    bb, bb_params = backbones.load("openai/clip-vit-base-patch16")
    source = data.ImageFolderSource("/content/images", image_size=224)   # any folder of images
    layer, steps, batch_size, d_sae = 10, 2_000, 4096, 24_576
print(bb.family, bb.d_model, "d_model,", bb.n_layers, "blocks,", len(source), "images")'''),
        new_code_cell('''batches = stream.activation_batches(bb, bb_params, source, layers=(layer,), image_batch_size=64, seed=1, epochs=None)
norm = stream.estimate_layer_normalization(batches, 4096, jax.random.key(1))[layer]
acts = stream.ActivationStream(bb, bb_params, source, layers=(layer,), batch_size=batch_size, image_batch_size=16,
                               buffer_tokens=16 * batch_size, normalization={layer: norm}, key=jax.random.key(0))
x = next(acts)[layer]
print("a batch:", x.shape, "mean norm", float(jnp.linalg.norm(x, axis=1).mean()))'''),
        new_code_cell('''trainer = train.make_trainer(sae.topk(bb.d_model, d_sae, k=16),
                             objective=Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=64), warmup_steps=10)
hparams = train.Hparams.grid([1e-3, 3e-3])                              # two SAEs, trained together
mesh = saejax.sharding.make_mesh()
states = {layer: trainer.init_sweep_sharded(jax.random.key(0), hparams, mesh)}
history = []
states = loop.fit(trainer, states, acts, steps=steps, mesh=mesh, log_every=10,
                  hooks=[lambda step, m: history.append((step, m[layer]["nmse"].tolist()))])
acts.close()
print(history[-1])'''),
        new_code_cell('''held_out = (b[layer] for b in stream.activation_batches(bb, bb_params, shapes.source("validation", 64, seed=0,
              image_size=40) if SMALL else source, layers=(layer,), image_batch_size=16))
for member in loop.evaluate(trainer.ae, states[layer], held_out, normalization=norm):
    print(f"lr {member['learning_rate']:.0e}: L0 {member['l0']:.1f}, NMSE {member['nmse']:.3f}, "
          f"dead {member['dead_fraction']:.2f}")'''),
    ]


def explore():
    return [
        new_markdown_cell("# Explore an SAE: load saev's pretrained CLIP SAE, browse its features\n\n"
                          "`load_pretrained` reads saev's published SAE from the hub (without torch); `saejax.browser` collects each latent's "
                          "top images and writes a browsable site; heatmaps show inline."),
        new_code_cell(INSTALL), new_code_cell(SMALL),
        new_code_cell('''from saejax import backbones, browser, sae, site, viz
from saejax.checkpoint import load_pretrained
from saejax.datasets import shapes

if SMALL:
    path = backbones.create_random("clip", "/tmp/saejax-nb-clip", hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, intermediate_size=64, image_size=40, patch_size=8)
    bb, bb_params = backbones.load(path, cache_dir=False)
    ae = sae.relu(bb.d_model, 128)
    params = ae.init(jax.random.key(0)).replace(b_enc=jnp.full((128,), 0.05))
    source, layer = shapes.source("validation", 96, seed=0, image_size=40), 1
else:
    ae, params, info = load_pretrained("osunlp/SAE_CLIP_24K_ViT-B-16_IN1K")   # raw activations, block 10
    bb, bb_params = backbones.load(info["backbone"])
    source, layer = saejax.data.ImageFolderSource("/content/images", image_size=224), 10   # your images
print(ae.d_model, "->", ae.d_sae, "latents")'''),
        new_code_cell('''readout = site.Site(bb, bb_params, layer=layer, ae=ae, sae_params=params)
collected = browser.collect(readout, source, k=8, batch_size=32)
index = browser.write_site("/tmp/saejax-browser", collected, ae, params, source, title="my SAE")
print("open", index, "-", int((collected["frequency"] == 0).sum()), "dead latents")'''),
        new_code_cell('''from IPython.display import HTML, display

# The most frequent live latents: their top images, patches tinted by activation / the latent's max.
live = np.flatnonzero(collected["frequency"] > 0)
for latent in live[np.argsort(-collected["frequency"][live])][:3]:
    tiles = []
    for slot, image_id in enumerate(collected["top_ids"][latent][:6]):
        image = source[int(image_id)].image
        heat = collected["heatmaps"][latent, slot].astype(np.float32).reshape(bb.grid)
        tiles.append(viz.highlight_patches(image, heat, collected["max"][latent], scale=max(1, 96 // image.shape[0])))
    display(HTML(f"<b>latent {latent}</b> (fires on {collected['frequency'][latent]:.1%} of patches)<br>"
                 f"<img src='{viz.data_uri(viz.png_bytes(viz.tile(tiles, columns=6)))}'>"))'''),
    ]


def intervene():
    return [
        new_markdown_cell("# Intervene: edit a bird's patches through the SAE and watch the classifier\n\n"
                          "Select patches, propose latents (dense ones dropped), set them to `slider x max` at one "
                          "block, let the model finish its pass, and read a linear probe's class probabilities "
                          "(the paper's CUB experiment)."),
        new_code_cell(INSTALL), new_code_cell(SMALL),
        new_code_cell('''from saejax import backbones, probe_edits, probes, sae, site, viz
from saejax.checkpoint import load_pretrained
from saejax.datasets import cub

if SMALL:
    path = backbones.create_random("clip", "/tmp/saejax-nb-clip", hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, intermediate_size=64, image_size=40, patch_size=8)
    bb, bb_params = backbones.load(path, cache_dir=False)
    ae = sae.relu(bb.d_model, 128)
    params = ae.init(jax.random.key(0)).replace(b_enc=jnp.full((128,), 0.05))
    root = cub.write_tiny_tree("/tmp/saejax-nb-cub", n_classes=4, per_class=6, size=48)
    layer, size, image_index, patches, dense = 1, 40, 0, [5, 6, 9, 10], 1.0
else:
    ae, params, info = load_pretrained("osunlp/SAE_CLIP_24K_ViT-B-16_IN1K")
    bb, bb_params = backbones.load(info["backbone"])
    root = "/content/CUB_200_2011"                                        # unpacked CUB_200_2011.tgz
    layer, size, image_index, patches, dense = 10, 224, 680, [63, 64, 77, 78, 79, 93, 94], 1e-2
train, test = cub.source(root, "train", image_size=size), cub.source(root, "test", image_size=size)
readout = site.Site(bb, bb_params, layer=layer, ae=ae, sae_params=params,
                              processing=site.cropped_processing(bb, size))'''),
        new_code_cell('''def features(source):
    batches = saejax.data.batches(source, 64, shuffle=False, drop_remainder=False, epochs=1)
    pairs = [(np.asarray(readout.encode(b.images)["pooled"]), b.labels) for b in batches]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

(train_x, train_y), (test_x, test_y) = features(train), features(test)
probe = probes.train_linear_probe(jax.random.key(0), jnp.asarray(train_x), jnp.asarray(train_y), len(train.classes),
                                  epochs=400 if SMALL else 20, batch_size=512, learning_rate=0.1 if SMALL else 1e-3,
                                  weight_decay=1e-4 if SMALL else 0.1)
print("probe test accuracy", float(np.mean(np.asarray(probes.predict(probe, jnp.asarray(test_x))) == test_y)))'''),
        new_code_cell('''stats = probe_edits.latent_stats(readout, (b.images for b in saejax.data.batches(
    test, 64, shuffle=False, drop_remainder=False, epochs=1)))
example = test[image_index]
selected = np.zeros(bb.layout.n_patches, bool); selected[patches] = True
codes = readout.encode(example.image[None])["codes"][0]
latents, sums = probe_edits.propose_latents(codes, jnp.asarray(selected), jnp.asarray(stats["frequency"]), n=3,
                                            dense_threshold=dense)
print("proposed latents", np.asarray(latents).tolist(), "summed over the patches", np.round(np.asarray(sums), 2))'''),
        new_code_cell('''from IPython.display import Image, display

curve = probe_edits.slider_curve(readout, probe)
sliders = jnp.linspace(-20, 20, 9)
probs = np.asarray(curve(readout.pixels(example.image[None]), jnp.asarray(probe_edits.patch_token_mask(bb, patches)),
                         latents, jnp.asarray(stats["max"])[latents], sliders))          # [sliders, classes], one call
before = np.asarray(jax.nn.softmax(probe.logits(readout.encode(example.image[None])["pooled"][0])))
after = probs[2]                                                                     # slider -10
display(Image(viz.before_after_png(example.image, selected.reshape(bb.grid), before, after, train.classes,
                                   title=f"latents {np.asarray(latents).tolist()} at -10 x max")))
for k in np.argsort(-before)[:3]:
    print(f"{train.classes[k]:>28}: " + " ".join(f"{p:.2f}" for p in probs[:, k]))'''),
    ]


def main():
    for name, cells in (("quickstart", quickstart()), ("explore", explore()), ("intervene", intervene())):
        for i, cell in enumerate(cells):
            cell.id = f"{name}-{i}"  # stable ids: a rebuild changes only what was edited
        notebook = new_notebook(cells=cells, metadata={
            "accelerator": "TPU", "colab": {"provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}})
        nbformat.write(notebook, os.path.join(HERE, f"{name}.ipynb"))


if __name__ == "__main__":
    main()
