"""Write a feature browser for a trained SAE: a static site to open from disk.

    saejax browse --config=browse --workdir=DIR \
        --config.sae.path=RUN/sae/layer_10/member_0 --config.backbone.name=openai/clip-vit-base-patch16
    saejax browse --config=browse:small --workdir=DIR

Streams `config.images` images of the source through the backbone and the SAE at
`config.layer` (`saejax.browser.collect`, bounded memory), then writes `DIR/index.html` and
`DIR/latents/<id>.html` (`saejax.browser.write_site`).
"""

from saejax.cli import builders
from saejax.cli.entry import run_binary
from saejax import browser


def run(config, workdir: str) -> str:
    source = builders.build_source(config.data, config.split)
    return browser.browse(builders.build_site(config.backbone, config.sae, config.layer), source, workdir,
                          k=config.k, batch_size=config.batch_size, limit=config.images, title=config.title,
                          max_pages=config.get("max_pages"))



def main(argv=None) -> None:
    """Run this command (`argv`: the program name and arguments; default `sys.argv`)."""
    run_binary("browse", run, "browse.py", argv=argv, workdir_help="Where the site goes.")


if __name__ == "__main__":
    main()
