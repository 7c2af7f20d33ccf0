"""The converted-params cache: a backbone's params after conversion, as one flat safetensors
file under `cache_dir` (default `~/.cache/saejax`, or `$SAEJAX_CACHE`), keyed by a hash of
the source files' names, sizes and modification times plus the config, so a second load
skips the conversion. A cache file that cannot be read or no longer fits is made again."""

from __future__ import annotations

import hashlib
import logging
import os
import re

from saejax.backbones.weights import contiguous

log = logging.getLogger(__name__)

# v2: every family's params in saejax's own tree (0.2); v1 files are never read again.
CACHE_FORMAT = "saejax-backbone-params-v2"


def cache_file(cache_dir, family, path, files, config_file="config.json") -> str:
    """Where the params of `family` converted from `files` (in model directory `path`) are cached."""
    cache_dir = cache_dir or os.environ.get("SAEJAX_CACHE") or os.path.join("~", ".cache", "saejax")
    h = hashlib.sha256(CACHE_FORMAT.encode())
    h.update(family.encode())
    with open(os.path.join(path, config_file), "rb") as f:
        h.update(f.read())
    for file in files:
        st = os.stat(file)
        h.update(f"{os.path.basename(file)}:{st.st_size}:{st.st_mtime_ns};".encode())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(path)))[:60]
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), "backbones", f"{family}-{slug}-{h.hexdigest()[:20]}.safetensors")


def read_cache(cache_file):
    """The cached flat params if the file exists and can be read, else None."""
    if cache_file is None or not os.path.isfile(cache_file):
        return None
    from safetensors.numpy import load_file  # noqa: PLC0415

    try:
        flat = {tuple(k.split("/")): v for k, v in load_file(cache_file).items()}
    except Exception as e:  # noqa: BLE001  (a truncated / corrupt cache file is re-made)
        log.warning("ignoring unreadable backbone cache %s: %s", cache_file, e)
        return None
    return flat


def fits(flat, target) -> bool:
    """True when the cached params hold exactly `target`'s keys and shapes."""
    return set(flat) == set(target) and all(tuple(flat[k].shape) == target[k] for k in target)


def write_cache(cache_file, flat, source):
    """Writes the flat params atomically; a failed write only warns (the next load converts again)."""
    if cache_file is None:
        return
    from safetensors.numpy import save_file  # noqa: PLC0415

    tmp = f"{cache_file}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        save_file({"/".join(k): contiguous(v) for k, v in flat.items()}, tmp,
                  metadata={"format": CACHE_FORMAT, "source": str(source)})
        os.replace(tmp, cache_file)
    except OSError as e:
        log.warning("could not write backbone cache %s: %s", cache_file, e)
        if os.path.exists(tmp):
            os.remove(tmp)
