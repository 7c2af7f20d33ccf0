"""The paper's semantic probing (CLIP vs DINOv2 concepts), with the baselines the reference
designed but never coded: a random-latent F1 distribution and a permutation p-value.

    saejax semprobe --config=semprobe --workdir=DIR
    saejax semprobe --config=semprobe:small --workdir=DIR

For each model (backbone + SAE + block) and each concept (its positives and the shared
negatives): every latent's activation summed over an image's patches says "present" when above
0; F1 per latent; the top 5 latents; the p-value of the best F1 against shuffled labels; the F1
of random live latents. Writes `DIR/semprobe.json` (`{"concepts": {concept: {model: ...}},
"skipped_images": {"count", "files"}}`; `--config.data.skip_unreadable=True` skips unreadable
files instead of stopping), `DIR/semprobe.csv` (concepts x models:
best latent, F1, p-value, random-latent mean and 95th percentile) and
`DIR/exemplars_<model>_<concept>.png` (the best latent's top images, patches tinted by its
activation). The logic is `saejax.studies.concepts` (with `saejax.semprobe`).
"""

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax.datasets import concept_folders
from saejax.studies.concepts import run_semprobe


def run(config, workdir: str) -> dict:
    size = config.data.image_size
    if config.data.get("kind") == "hf":  # a data set whose ClassLabel is ("negative", concept, ...)
        source = builders.build_source(config.data, "train")
    else:
        root = builders.ensure_tiny_tree(config.data, lambda r: concept_folders.write_tiny_tree(
            r, **config.data.get("tiny_tree", {})))
        source = concept_folders.source(root, image_size=size, skip_unreadable=config.data.get("skip_unreadable", False))
    sites = {name: builders.build_site(model.backbone, model.sae, model.layer, size)
             for name, model in config.models.items()}
    return run_semprobe(sites, source, workdir, top=config.top, n_permutations=config.n_permutations,
                        n_random=config.n_random, exemplars=config.exemplars, batch_size=config.batch_size,
                        seed=config.seed)



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("semprobe", run, "semprobe.py", argv=argv)


if __name__ == "__main__":
    main()
