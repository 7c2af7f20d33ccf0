"""The one door to `transformers` in saejax: lazy, quiet imports of what it still ships.

saejax asks `transformers` (4.40 and later, 4.x or 5.x) only for config classes (their
defaults fill what a config.json leaves out) and CLIP's tokenizer; the models are saejax's
own. Importing the library costs ~2 s, so nothing here runs until a backbone is loaded.
Everything else in saejax that needs a `transformers` object goes through `hf()` /
`config_class()`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings

# Loggers whose chatter (config conversions, processor notes) we silence.
_QUIET_LOGGERS = ("transformers.configuration_utils", "transformers.image_processing_utils",
                  "transformers.tokenization_utils_base")


@contextlib.contextmanager
def quiet():
    """Suppresses `transformers`' deprecation warnings and log notes inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
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
    """Returns the `transformers` package (imported once, quietly: without torch, `transformers`
    5 advises on import that no models are available, which is how saejax uses it)."""
    advisory = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        with quiet():
            import transformers  # noqa: PLC0415
    finally:
        if advisory is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = advisory
    for name in _QUIET_LOGGERS:  # keep the notes off for the rest of the process too
        logging.getLogger(name).setLevel(logging.ERROR)
    return transformers


def config_class(name: str):
    """The `transformers` config class `name` (e.g. "CLIPVisionConfig"); an installed
    `transformers` too old to have it is an error that says which version has it."""
    t = hf()
    try:
        return getattr(t, name)
    except AttributeError:
        raise ImportError(f"transformers {t.__version__} has no {name}; this model family needs a newer "
                          "transformers (pip install -U transformers)") from None
