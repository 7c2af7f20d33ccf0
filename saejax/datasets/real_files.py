"""Files the way real data sets store them, for the tiny trees the tests and `:small` configs
write: mixed sizes and aspect ratios, and the pixel formats photographs come in.

    >>> w, h = photo_size(rng, 48)                     # e.g. 64 x 48, 48 x 72, 70 x 49, ...
    >>> save_photo(path, rgb, "cmyk")                  # an Adobe CMYK JPEG
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["FORMATS", "photo_size", "save_photo", "save_truncated"]

# Landscape and portrait shapes of real photo collections (CUB: 500 x 333, 500 x 375, 375 x
# 500, ...), as (width, height) ratios.
_ASPECTS = ((4, 3), (3, 4), (3, 2), (2, 3), (1, 1), (10, 7), (7, 10), (16, 9))

# The pixel formats a photo may come in, and how `save_photo` writes each.
FORMATS = ("rgb", "grey", "cmyk", "progressive", "exif_rotated", "png_rgba")


def photo_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """A (width, height) of about `size` px on the short side (0.9 to 1.5 x), in a real
    photo's aspect ratio."""
    a, b = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    short = int(size * rng.uniform(0.9, 1.5))
    return (short * a // b, short) if a >= b else (short, short * b // a)


def save_photo(path: str | os.PathLike, rgb: np.ndarray, kind: str = "rgb") -> np.ndarray:
    """Write uint8 RGB [H, W, 3] `rgb` to `path` as `kind` (one of `FORMATS`) and return the
    upright pixels a reader should see (`exif_rotated`: stored turned a quarter, with the EXIF
    tag that turns it back; `grey`: the grey image as RGB). The JPEG kinds use quality 95."""
    from PIL import Image  # noqa: PLC0415

    picture = Image.fromarray(rgb)
    if kind == "rgb":
        picture.save(path, quality=95)
    elif kind == "grey":
        picture = picture.convert("L")
        picture.save(path, quality=95)
        return np.asarray(picture.convert("RGB"))
    elif kind == "cmyk":
        picture.convert("CMYK").save(path, quality=95)
    elif kind == "progressive":
        picture.save(path, quality=95, progressive=True)
    elif kind == "exif_rotated":  # stored as a camera held sideways writes it; orientation 6 turns it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(path, quality=95, exif=exif)
    elif kind == "png_rgba":
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[: rgb.shape[0] // 4] = 0  # transparent strip; the reader drops alpha
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    else:
        raise ValueError(f"kind must be one of {FORMATS}, got {kind!r}")
    return rgb


def save_truncated(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """A JPEG cut off halfway, as an interrupted download leaves it: unreadable."""
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[: buffer.tell() // 2])
