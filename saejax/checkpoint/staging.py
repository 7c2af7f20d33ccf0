"""Writing a directory all at once: build it beside its place, then rename it in."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty staging directory; when the block succeeds it replaces `path`.

    A crash or an exception inside the block removes the staging directory and leaves whatever
    was at `path` untouched, so readers never see a half-written directory.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saejax-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result gets the usual permissions
    try:
        yield staging
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
