"""Which saejax wrote a file: the versions recorded in everything saejax writes, and the
warning when a file comes from a newer major version than the one reading it.

>>> written_by()
{'saejax': '0.1.0', 'jax': '0.10.2', 'flax': '0.12.1', 'transformers': '4.57.6'}
>>> check_written_by(config.get("written_by"), "/runs/a/sae/config.json")   # warns if from saejax 1.x
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from collections.abc import Mapping
from typing import Any

__version__ = "0.1.0"  # the package's version (pyproject reads it from here)

__all__ = ["NewerVersionWarning", "__version__", "check_written_by", "written_by"]


class NewerVersionWarning(UserWarning):
    """A file written by a newer major version of saejax than the one reading it."""


@functools.cache
def written_by() -> dict[str, str]:
    """The versions of saejax, jax, flax and transformers (read from the installed metadata:
    transformers is not imported)."""
    versions = {"saejax": __version__}
    for package in ("jax", "flax", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _major(version: str) -> int | None:
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else None


def check_written_by(record: Mapping[str, Any] | None, where: str) -> None:
    """Warn (`NewerVersionWarning`) when `record` (a file's `written_by`) names a saejax of a
    newer major version: the file may hold what this version cannot read correctly. Files from
    before versions were recorded (None) and older versions pass silently."""
    if not isinstance(record, Mapping):
        return
    theirs, ours = _major(record.get("saejax", "")), _major(__version__)
    if theirs is not None and ours is not None and theirs > ours:
        warnings.warn(f"{where} was written by saejax {record['saejax']}, newer than this saejax {__version__}: "
                      f"upgrade saejax (pip install -U saejax) to read it correctly", NewerVersionWarning,
                      stacklevel=3)
