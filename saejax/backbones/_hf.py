"""The one door to `transformers` in saejax: lazy imports with its Flax deprecation noise silenced.

`transformers` 4.x still ships the Flax modules saejax builds on (5.x removed them). Importing
the library costs ~2 s, so nothing here runs until a backbone is loaded. Everything else in
saejax that needs a `transformers` object goes through `hf()` / `flax_module()`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import warnings

# Loggers whose Flax deprecation banners / conversion chatter we silence.
_QUIET_LOGGERS = (
    "transformers.modeling_flax_utils",
    "transformers.modeling_flax_pytorch_utils",
    "transformers.configuration_utils",
    "transformers.image_processing_utils",
)


@contextlib.contextmanager
def quiet():
    """Suppresses `transformers`' Flax deprecation warnings and log banners inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*(Flax|JAX|TensorFlow).*")
        levels = {}
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@functools.cache
def hf():
    """Returns the `transformers` package (imported once, quietly)."""
    with quiet():
        import transformers  # noqa: PLC0415

        for name in _QUIET_LOGGERS:  # keep the banners off for the rest of the process too
            logging.getLogger(name).setLevel(logging.ERROR)
    return transformers


@functools.cache
def flax_module(path: str):
    """Imports `transformers.models.<path>` quietly, e.g. `flax_module("clip.modeling_flax_clip")`."""
    hf()
    with quiet():
        return importlib.import_module(f"transformers.models.{path}")


def rename_key_and_reshape_tensor():
    """HF's own PyTorch -> Flax weight renaming rule (torch-free for numpy inputs)."""
    hf()
    with quiet():
        from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor as fn  # noqa: PLC0415
    return fn
