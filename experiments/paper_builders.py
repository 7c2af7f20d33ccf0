"""Config -> objects shared by the paper's experiment binaries (semprobe, cub_edit, ade20k_edit)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.sae_training import build_backbone
from saejax import data, sae
from saejax.checkpoint import import_saev, load_sae
from saejax.core.normalization import Normalization

__all__ = ["build_backbone", "build_sae"]


def build_sae(cfg: ml_collections.ConfigDict, d_model: int):
    """`(ae, params, normalization or None)` from `cfg.kind`:
    "saejax" (`path`: a `save_sae` directory), "saev" (`path`: saev's `sae.pt`, raw activations
    unless `norm_mean` / `norm_scalar` are given), or "random" (`d_sae`, `seed`: an untrained
    ReLU SAE whose latents fire, for `:small` plumbing runs)."""
    if cfg.kind == "saejax":
        ae, params, info = load_sae(cfg.path)
        norm = info["normalization"]
    elif cfg.kind == "saev":
        ae, params, _ = import_saev(cfg.path)
        norm = None
        if cfg.get("norm_scalar"):  # e.g. saev's DINOv2 SAE reads (x - mu) / 2.018...
            if not cfg.get("norm_mean"):
                raise ValueError(f"sae.norm_scalar={cfg.norm_scalar} needs sae.norm_mean: an .npy file of the mean "
                                 f"the SAE subtracts")
            mean = np.load(cfg.norm_mean)
            if mean.shape != (d_model,):
                raise ValueError(f"{cfg.norm_mean}: shape {mean.shape}, expected ({d_model},)")
            norm = Normalization(jnp.asarray(mean, jnp.float32), jnp.asarray(cfg.norm_scalar, jnp.float32))
    elif cfg.kind == "random":
        ae = sae.relu(d_model, cfg.d_sae)
        params = ae.init(jax.random.key(cfg.seed))
        params = params.replace(b_enc=jnp.full((cfg.d_sae,), 0.05))
        norm = None
    else:
        raise ValueError(f"sae.kind must be saejax, saev or random, got {cfg.kind!r}")
    if ae.d_model != d_model:
        raise ValueError(f"the SAE reads d_model={ae.d_model}, the backbone has {d_model}")
    return ae, params, norm


def skipped_report(**sources: data.Source) -> dict[str, dict]:
    """`{name: {"count", "files"}}`: the images each source skipped as unreadable (for the
    binaries' JSON outputs; `data.skip_unreadable` in their configs)."""
    return {name: {"count": len(s.skipped), "files": [s.describe(i) + ": " + why for i, why in sorted(s.skipped.items())]}
            for name, s in sources.items()}


def ensure_tiny_tree(cfg, write) -> str:
    """`cfg.root`, written by `write(root)` first when `cfg.tiny_tree` is set and it is missing."""
    root = os.path.expanduser(cfg.root)
    if cfg.get("tiny_tree") and not os.path.isdir(root):
        write(root)
    return root


def run_binary(run, default_config: str, workdir_help: str = "Where the results go.") -> None:
    """The absl entry point of the experiment binaries: `--config` (an ml_collections file,
    e.g. `default_config`) and `--workdir`, then `run(config, workdir)`. The flags are defined
    here, when the binary starts, so tests can import several binaries in one process."""
    from absl import app, flags, logging  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, default_config, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
            raise app.UsageError("--config and --workdir are required")
        run(flags.FLAGS.config, os.path.expanduser(flags.FLAGS.workdir))

    app.run(main)
