"""Writing a directory all at once (build it beside its place, then rename it in), and the
SHA-256 that lets a reader know a file is still what was written."""

from __future__ import annotations

import contextlib
import hashlib
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
    try:
        yield staging
        # mkdtemp makes the directory 0700 and some writers (safetensors) make files 0600: give
        # the result the permissions the user's umask asks for, like any file they write.
        mask = _umask()
        for root, dirs, files in os.walk(staging):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(staging, 0o777 & ~mask)
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


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: str | os.PathLike, text: str) -> str:
    """Write `text` to `path` through a temporary file renamed into place: a full disk, a
    read-only directory or a kill leaves the previous file (or none), never half of one.

    Raises:
        OSError: naming `path` and why (e.g. "No space left on device"); nothing was replaced.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, f"{path}: could not write it ({e.strerror}); the previous file, if any, is "
                               f"unchanged") from e
    return path
