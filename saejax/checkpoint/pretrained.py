"""saev's published SAEs from the Hugging Face hub, with what each one needs attached.

>>> ae, params, info = load_pretrained("osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K")
>>> info["normalization"]          # (clip(x, -1e-5, 1e5) - mu) / 2.018..., saev's own statistics
>>> info["backbone"], info["layer"]  # ('facebook/dinov2-with-registers-base', 10)
>>> edit = saejax.interventions.sae_edit(ae, params, latent_edit, info["normalization"])

The file comes through `huggingface_hub.hf_hub_download`, so the local cache is used and
`HF_HUB_OFFLINE=1` is respected. When the file can be neither found in the cache nor fetched,
`CheckpointError` names the repository and the cache folder.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from saejax.checkpoint.errors import CheckpointError
from saejax.checkpoint.pretrained_stats import DINOV2_IN1K_CLAMP, DINOV2_IN1K_MEAN, DINOV2_IN1K_SCALAR
from saejax.checkpoint.saev import import_saev
from saejax.core.normalization import Normalization

__all__ = ["PRETRAINED", "load_pretrained"]

# What each published SAE reads: the backbone (a `saejax.backbones.load` name), the block, the
# tokens, and the normalisation of its inputs ("dinov2_in1k" or None for raw activations).
PRETRAINED: dict[str, dict[str, Any]] = {
    "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K": dict(backbone="openai/clip-vit-base-patch16", layer=10, tokens="patches",
                                              normalization=None),
    "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K": dict(backbone="facebook/dinov2-with-registers-base", layer=10,
                                                tokens="patches", normalization="dinov2_in1k"),
    "osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21": dict(backbone="imageomics/bioclip (open_clip; not loadable by "
                                                   "saejax.backbones yet)", layer=10, tokens="patches",
                                                   normalization=None),
}


def _normalization(name: str | None, d_model: int, where: str) -> Normalization | None:
    if name is None:
        return None
    if name == "dinov2_in1k":
        if d_model != len(DINOV2_IN1K_MEAN):
            raise CheckpointError(f"{where}: the SAE reads d_model={d_model}, saev's DINOv2 statistics have "
                                  f"{len(DINOV2_IN1K_MEAN)} dimensions")
        return Normalization(jnp.asarray(DINOV2_IN1K_MEAN, jnp.float32), jnp.asarray(DINOV2_IN1K_SCALAR, jnp.float32),
                             DINOV2_IN1K_CLAMP)
    raise ValueError(f"unknown normalisation {name!r}")


def load_pretrained(repo_id: str, *, filename: str = "sae.pt", revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Download (or find in the cache) and load one of saev's published SAEs.

    Args:
        repo_id: a hub repository, e.g. one of `PRETRAINED`. Others load too, as raw-activation
            SAEs with no backbone information.
        filename: the file in the repository.
        revision: a branch, tag or commit.
        cache_dir: the hub cache (default: `HF_HUB_CACHE` / `~/.cache/huggingface/hub`).

    Returns:
        `(ae, params, info)` as `import_saev`, with `info["normalization"]` set to what the SAE
        expects (None for raw activations) and, for known repositories, `backbone`, `layer` and
        `tokens`.

    Raises:
        CheckpointError: the file is neither cached nor reachable (names the repository and the
            cache folder), or it does not load.
    """
    from huggingface_hub import constants, hf_hub_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache)
    except LocalEntryNotFoundError as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(f"{repo_id}/{filename}: not in the cache {cache} and the hub is unreachable{offline}. "
                              f"Download it on a machine with network (huggingface-cli download {repo_id} "
                              f"{filename}) and copy the cache, or pass cache_dir=") from e
    except Exception as e:  # noqa: BLE001 - hub errors (missing repo or file, HTTP) come in many types
        raise CheckpointError(f"{repo_id}/{filename}: cannot fetch it (cache {cache}): {type(e).__name__}: {e}") from e
    ae, params, info = import_saev(path)
    known = PRETRAINED.get(repo_id, {})
    info.update({k: v for k, v in known.items() if k != "normalization"}, repo_id=repo_id)
    info["normalization"] = _normalization(known.get("normalization"), ae.d_model, path)
    return ae, params, info
