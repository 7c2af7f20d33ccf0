"""Write a feature browser for a trained SAE: a static site to open from disk.

    python -m experiments.browse --config=experiments/configs/browse.py --workdir=DIR \
        --config.sae.path=RUN/sae/layer_10/member_0 --config.backbone.name=openai/clip-vit-base-patch16
    python -m experiments.browse --config=experiments/configs/browse.py:small --workdir=DIR

Streams `config.images` images of the source through the backbone and the SAE at
`config.layer` (`saejax.browser.collect`, bounded memory), then writes `DIR/index.html` and
`DIR/latents/<id>.html` (`saejax.browser.write_site`).
"""

from experiments import builders
from experiments.entry import run_binary
from saejax import browser


def run(config, workdir: str) -> str:
    source = builders.build_source(config.data, config.split)
    return browser.browse(builders.build_site(config.backbone, config.sae, config.layer), source, workdir,
                          k=config.k, batch_size=config.batch_size, limit=config.images, title=config.title,
                          max_pages=config.get("max_pages"))


if __name__ == "__main__":
    run_binary("browse", run, "browse.py", workdir_help="Where the site goes.")
