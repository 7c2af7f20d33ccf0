"""ADE20K segmentation edits (paper section 5.2) and the quantitative test; see
`saejax.cli.ade20k_edit`.

    saejax ade20k_edit --config=ade20k --workdir=DIR \
        --config.data.root=/data/ADEChallengeData2016 --config.sae.path=/models/dinov2_sae/sae.pt

Needs (no network here, so fetched elsewhere):

- ADE20K SceneParsing: ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/, unzipped
  (images/{training,validation}, annotations/{training,validation}, objectInfo150.txt);
- facebook/dinov2-base (hub id or a local `save_pretrained` directory);
- saev's DINOv2 SAE (`osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K`, `sae.pt`), which reads block 10 (of 12)
  residuals normalised as `(x - mu) / 2.0181241035461426` (give `sae.norm_mean` as an .npy of mu).

Expected (from the paper; not run here, which has no GPU and no ADE20K): a probe mIoU in the
mid-30s at 224 px; suppressing a class's best-F1 latent changes far more of its patches than of
the others, and more than a random latent or direction does.

`:small` runs the same code on a tiny random DINOv2, a random SAE and a tiny synthetic tree
in the official layout, in well under a minute on 2 CPU cores.
"""

import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.backbone = dict(name="facebook/dinov2-base", dtype="float32")
    c.sae = dict(kind="saev", path="", norm_mean="", norm_scalar=2.0181241035461426)
    c.layer = 10
    c.data = dict(root="", image_size=224, short_side=256, skip_unreadable=False)  # True: skip and count unreadable files
    c.batch_size = 64
    c.probe_images = 20_210  # the whole training split
    c.eval_images = 2_000   # the whole validation split
    c.probe = dict(epochs=20, batch_size=4096, learning_rate=1e-3, weight_decay=1e-3)
    c.probe_buffer_tokens = 2**18  # the probe's shuffle buffer (tokens held); the images are encoded every epoch
    c.min_patches = 100
    c.norm_sample_patches = 65_536  # residuals kept to match the random direction's norm
    c.value_scale = -2.0
    c.class_latents = {}
    if variant == "small":
        c.backbone = dict(name="", random=dict(family="dinov2", directory="/tmp/saejax-random-backbones", seed=0,
                                               sizes=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=64, image_size=32, patch_size=8)))
        c.sae = dict(kind="random", d_sae=128, seed=0)
        c.layer = 1
        c.data = dict(root="/tmp/saejax-tiny-ade20k-mixed", image_size=32, short_side=40, skip_unreadable=True,
                      tiny_tree=dict(n_train=16, n_val=8, size=48, unreadable=1))
        c.batch_size = 8
        c.probe_images, c.eval_images = 16, 8
        c.probe = dict(epochs=200, batch_size=256, learning_rate=1e-2, weight_decay=1e-4)
        c.min_patches = 4
        c.class_latents = {"1": 0}
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '' or 'small'")
    return c
