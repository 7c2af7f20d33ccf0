"""Write a feature browser for a trained SAE: a static site to open from disk.

    python -m experiments.browse --config=experiments/configs/browse.py --workdir=DIR \
        --config.sae.path=RUN/sae/layer_10/member_0 --config.backbone.name=openai/clip-vit-base-patch16
    python -m experiments.browse --config=experiments/configs/browse.py:small --workdir=DIR

Streams `config.images` images of the source through the backbone and the SAE at
`config.layer` (`saejax.browser.collect`, bounded memory), then writes `DIR/index.html` and
`DIR/latents/<id>.html` (`saejax.browser.write_site`).
"""

from experiments.paper_builders import build_backbone, build_sae, run_binary
from experiments.sae_training import build_source
from saejax import browser, probe_edits


def run(config, workdir: str) -> str:
    bb, bb_params = build_backbone(config.backbone)
    ae, sae_params, norm = build_sae(config.sae, bb.d_model)
    source = build_source(config.data, config.split)
    readout = probe_edits.Readout(bb, bb_params, layer=config.layer, ae=ae, sae_params=sae_params, norm=norm)
    collected = browser.collect(readout, source, k=config.k, batch_size=config.batch_size, limit=config.images)
    index = browser.write_site(workdir, collected, ae, sae_params, source, title=config.title,
                               max_pages=config.get("max_pages"))
    skipped = f", {len(source.skipped)} unreadable skipped" if source.skipped else ""
    print(f"wrote {index} ({collected['images']} images{skipped}; open it in a browser)", flush=True)
    return index


if __name__ == "__main__":
    run_binary(run, "experiments/configs/browse.py", "Where the site goes.")
