"""The commands as `python -m experiments.NAME`, for a checkout: each module runs
`saejax.cli.NAME`, which an installed saejax runs as `saejax COMMAND` (`saejax --help`). The
configs they read ship in `saejax.configs`; `--config=experiments/configs/FILE.py` still
resolves to them."""
