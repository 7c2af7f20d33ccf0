"""The paper's experiments and the demo as library functions, the top layer.

Each takes objects (a `saejax.site.Site`, image sources, settings) and a workdir, writes its
files there and returns what it wrote, so a notebook can run it as the binaries do:

- `cub_edit.run_cub_edit`: E2, a bird's patches edited through the SAE, a probe's classes move;
- `ade20k_edit.run_ade20k_edit`: E3, segmentation probe, feature search and the quantitative test;
- `concepts.run_semprobe`: E1, the best latent per concept against random latents;
- `planted.run_planted`: an SAE sweep on synthetic activations with planted features;
- `shapes_demo`: the demo's concept table, edits and page on the shapes world.

The `saejax` commands turn configs into these arguments (`saejax.cli.builders`).
"""
