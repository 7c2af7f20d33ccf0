"""saejax's commands: the `saejax` console script and the absl binaries behind it.

    saejax train --config=clip_vit_b16:small --workdir=/tmp/run     # = python -m experiments.train_sae
    saejax demo --config=:small --workdir=/tmp/demo                  # = python -m experiments.demo
    saejax --help                                                    # the commands and shipped configs

Each command is a module here with `run(config, workdir)` (config -> objects through
`saejax.cli.builders`, then one library call) and `main(argv)` (the flags, through
`saejax.cli.entry.run_binary`). The configs they read ship in `saejax.configs`. This package and
`saejax.configs` are the only ones that see an ml_collections ConfigDict; `import saejax` does not
import them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module in saejax.cli, what it does)
COMMANDS = {
    "train": ("train_sae", "train SAEs on a ViT's residual stream, activations made on the fly"),
    "demo": ("demo", "the whole loop offline: a ViT, an SAE, features matched to concepts, edits measured"),
    "browse": ("browse", "a browsable site of each latent's top images"),
    "discover": ("discover", "the latents that control a prediction, verified by intervention"),
    "compare": ("compare", "latents shared and unique across two models"),
    "semprobe": ("semprobe", "semantic probing of concepts (CLIP vs DINOv2)"),
    "cub_edit": ("cub_edit", "CUB-200 classification edits (paper section 5.1)"),
    "ade20k_edit": ("ade20k_edit", "ADE20K segmentation edits and change rates (paper section 5.2)"),
    "synthetic": ("synthetic", "SAEs on synthetic activations with planted features"),
    "train_vit": ("train_vit", "a small ViT trained on the shapes world"),
}


def usage() -> str:
    """`saejax --help`: the commands and the configs shipped with saejax."""
    from saejax.cli.entry import shipped_configs  # noqa: PLC0415
    from saejax.provenance import __version__  # noqa: PLC0415

    width = max(map(len, COMMANDS))
    lines = [f"saejax {__version__}: sparse autoencoders for vision transformers.", "",
             "usage: saejax COMMAND --workdir=DIR [--config=NAME[:ARG] | --config=FILE.py[:ARG]] "
             "[--config.KEY=VALUE ...]", "       saejax COMMAND --help", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "configs shipped with saejax (--config=NAME[:ARG]; most have a :small variant):",
              "  " + ", ".join(shipped_configs())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The `saejax` console script: `saejax COMMAND [flags]` runs that command's `main`."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    if argv[1] == "--version":
        from saejax.provenance import written_by  # noqa: PLC0415

        print(" ".join(f"{k} {v}" for k, v in written_by().items()))
        raise SystemExit(0)
    name = argv[1].replace("-", "_")
    if name not in COMMANDS:
        print(f"saejax: no command {argv[1]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    command = importlib.import_module(f"saejax.cli.{COMMANDS[name][0]}")
    command.main([f"saejax {name}", *argv[2:]])
