"""Decoding image files and bringing them to one size: one policy for every pixel format
(`read_image`) and one geometry for every image size (`Resizing`), shared by all sources.

>>> image = read_image("bird.jpg")                         # uint8 [H, W, 3], EXIF applied
>>> Resizing.of(224, short_side=256).apply(image).shape     # (224, 224, 3): short side 256, centre crop
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "RESAMPLING", "Resizing", "UnreadableImageError", "find_images", "match_mask",
           "patch_mode_labels", "read_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
_RESIZE_MODES = ("crop", "stretch")

class UnreadableImageError(OSError):
    """An image that cannot be read or decoded; the message names the file or record."""


# --------------------------------------------------------------------------------------------
# Images


def _pil():
    try:
        import PIL.Image  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
    return PIL


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(folder: str) -> list[str]:
    """Image files under `folder` (by extension, any case; recursing, following links), sorted,
    hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f) and not f.startswith(".")]
    return found



def read_image(path: str | os.PathLike | bytes) -> np.ndarray:
    """The image file at `path` (or an encoded image's bytes) as uint8 RGB [H, W, 3], by one
    policy for every pixel format.

    - Orientation: the EXIF orientation tag is applied (as `transformers.image_utils.load_image`
      does and as viewers show the photo; torchvision's `ImageFolder` ignores it).
    - RGB, L, 1-bit, P, CMYK, YCbCr: PIL's `convert("RGB")`, what the HF image processors
      (`convert_rgb`) and torchvision's loader do. Adobe CMYK JPEGs are decoded inverted by PIL as
      they should be; no ICC profile is applied.
    - LA, RGBA, PA, P with transparency: the alpha channel is dropped, not composited, as HF and
      torchvision do (the reference's activations come from such pixels).
    - 16 bits a channel: the high byte. PIL reads 16-bit RGB PNGs so; 16-bit grey (`I;16`, `I`)
      is scaled the same way here, where HF and torchvision clip it at 255 and turn most such
      images white.
    - Animated GIF / WebP / multi-page TIFF: the first frame.
    - Unreadable: a zero-byte, truncated or corrupt file, 32-bit float pixels (mode F), or a
      decompression bomb (PIL's limit) raises `UnreadableImageError` naming the file;
      `skip_unreadable=True` sources skip it and count it.

    Raises:
        UnreadableImageError: see above.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        return _read_oriented(io.BytesIO(path), "(bytes)")[0]
    return _read_oriented(os.fspath(path))[0]


def _read_oriented(path, name: str | None = None) -> tuple[np.ndarray, int | None, tuple[int, int]]:
    """`(uint8 RGB [H, W, 3] upright, the EXIF transpose applied or None, the stored (H, W))`
    of a file (a path, or a binary file object called `name`), or `UnreadableImageError`
    naming it."""
    pil = _pil()
    try:
        with pil.Image.open(path) as image:
            image.load()
            transpose = _EXIF_TRANSPOSE.get(image.getexif().get(0x0112, 1))  # 0x0112: "Orientation"
            stored_shape = (image.height, image.width)
            image = _pil_rgb(image)
            return np.asarray(image if transpose is None else image.transpose(transpose)), transpose, stored_shape
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
        raise UnreadableImageError(f"cannot read image {path if name is None else name}: "
                                   f"{type(e).__name__}: {e}") from e


# EXIF orientation -> the PIL transpose that shows the photo upright (as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def _read_mask(path: str) -> np.ndarray:
    """An integer [H, W] label image (palette PNGs give their indices; a grey mask saved as RGB,
    all three channels equal, gives one of them), or `UnreadableImageError`."""
    pil = _pil()
    try:
        with pil.Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                return np.asarray(image).astype(np.int64)
            if image.mode in ("L", "P", "1"):
                return np.asarray(image.convert("L") if image.mode == "1" else image)
            if image.mode == "LA":
                return np.asarray(image)[..., 0]
            if image.mode in ("RGB", "RGBA"):
                rgb = np.asarray(image)[..., :3]
                if (rgb == rgb[..., :1]).all():
                    return rgb[..., 0].copy()
            raise ValueError(f"mode {image.mode}: a mask must be a single-channel (L, P, I) image")
    except Exception as e:  # noqa: BLE001
        raise UnreadableImageError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e


def _pil_rgb(image):
    """`image` in RGB by the pixel-format policy of `read_image`."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: scale, do not clip
        wide = np.asarray(image, np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise ValueError(f"mode {image.mode} with values in [{wide.min()}, {wide.max()}]: not a 16-bit image")
        grey = (wide >> 8).astype(np.uint8)  # the high byte, as PIL reads 16-bit RGB PNGs
        return _pil().Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("mode F (32-bit float pixels) has no agreed mapping to 8-bit RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what convert("RGB") does too, without PIL's warning
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LA, RGBA, ...: PIL's conversion, alpha dropped


def _rgb(images: np.ndarray, what: str = "images") -> np.ndarray:
    """uint8 [..., H, W, 3] from [..., H, W, C] with C = 1 (grayscale), 3 (RGB) or 4 (RGBA)."""
    if images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {images.dtype}")
    if images.ndim < 3 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected [H, W, C] with C in (1, 3, 4), got shape {images.shape}")
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images[..., :3]


# --------------------------------------------------------------------------------------------
# Geometry: every image of a source to one size


RESAMPLING = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# Past this ratio of resized to output area (an aspect ratio beyond ~16:1), the plan resizes
# only the region it keeps, so a 1 x 600 image at 518 px never allocates a 518 x 310,800 one.
_MAX_RESIZED_AREA_RATIO = 16


class Resizing(NamedTuple):
    """How a source brings each image to one size, the way the HF image processors do.

    Attributes:
        size: (height, width) of every output image.
        mode: "crop": resize so the image covers `size` (the short side to `short_side`, or
            just enough), keeping its aspect ratio, then cut out the centre; "stretch": resize
            to `size`, aspect ratio not kept.
        short_side: with "crop": the short side's length after resizing (the "resize 256, crop
            224" of DINOv2); at least `max(size)`. None: just cover `size`.
        resample: the PIL filter, a key of `RESAMPLING` ("bicubic", "bilinear", ...).
    """

    size: tuple[int, int]
    mode: str = "crop"
    short_side: int | None = None
    resample: str = "bicubic"

    @classmethod
    def of(cls, image_size, mode: str = "crop", short_side: int | None = None,
           resample: str = "bicubic") -> Resizing | None:
        """Checked `Resizing`, or None when `image_size` is None (images keep their size)."""
        if mode not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {mode!r}")
        if resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {tuple(RESAMPLING)}, got {resample!r}")
        if image_size is None:
            if short_side is not None:
                raise ValueError("short_side needs image_size")
            return None
        if isinstance(image_size, (int, np.integer)):
            image_size = (image_size, image_size)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be None, a positive int or (height, width), got {image_size}")
        if short_side is not None:
            if mode != "crop":
                raise ValueError(f"short_side goes with resize='crop', not {mode!r}")
            if int(short_side) < max(image_size):
                raise ValueError(f"short_side={short_side} is shorter than image_size={image_size}: the crop "
                                 f"would not fit in the resized image")
            short_side = int(short_side)
        return cls(image_size, mode, short_side, resample)

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """`((resized_width, resized_height), (left, top))`: resize the whole width x height image
        to the first, then crop `size` at the second, which always lies inside it.

        Integer arithmetic throughout, and the HF processors' rules: the short side becomes
        `short_side` and the long one `int(short_side * long / short)`; the crop starts at
        `(resized - size) // 2`.
        """
        if width < 1 or height < 1:
            raise ValueError(f"an image of {width} x {height} px has no pixels")
        out_h, out_w = self.size
        if self.mode == "stretch":
            return (out_w, out_h), (0, 0)
        if self.short_side is not None:
            s = self.short_side
            new_w, new_h = (s, s * height // width) if width <= height else (s * width // height, s)
        elif out_w * height >= out_h * width:  # width is the binding side
            new_w, new_h = out_w, max(out_h, out_w * height // width)
        else:
            new_w, new_h = max(out_w, out_h * width // height), out_h
        return (new_w, new_h), ((new_w - out_w) // 2, (new_h - out_h) // 2)

    def apply(self, image: np.ndarray, *, mask: bool = False) -> np.ndarray:
        """`image` ([H, W] or [H, W, 3] uint8, or an integer [H, W] mask with `mask=True`,
        resampled nearest-neighbour) at `size`, by `plan`."""
        height, width = image.shape[:2]
        (new_w, new_h), (left, top) = self.plan(width, height)
        out_h, out_w = self.size
        if (new_w, new_h) == (width, height):
            return image[top:top + out_h, left:left + out_w]
        pil = _pil().Image
        resample = pil.NEAREST if mask else RESAMPLING[self.resample]
        wide = image.ndim == 2 and image.dtype != np.uint8  # labels > 255: resize as int32
        picture = pil.fromarray(image.astype(np.int32), "I") if wide else pil.fromarray(image)
        if new_w * new_h <= _MAX_RESIZED_AREA_RATIO * out_w * out_h:
            # Resize all, then crop: what the HF processors do, pixel for pixel.
            picture = picture.resize((new_w, new_h), resample)
            picture = picture.crop((left, top, left + out_w, top + out_h))
        else:  # the same region and filter scale, without the huge intermediate image
            # Products before divisions: the box is exact, hence inside [0, width] x [0, height].
            box = (left * width / new_w, top * height / new_h,
                   (left + out_w) * width / new_w, (top + out_h) * height / new_h)
            picture = picture.resize((out_w, out_h), resample, box=box)
        out = np.asarray(picture)
        return out.astype(image.dtype) if wide else out


def match_mask(mask: np.ndarray, image_shape: tuple[int, int], what: str) -> np.ndarray:
    """`mask` at the image's `(height, width)`: as it is, or resized (nearest) when it is the
    same picture at another resolution (aspect ratios within 2%, as a few CUB masks are).

    Raises:
        UnreadableImageError: a mask of another shape, naming `what` and both shapes.
    """
    if mask.shape == tuple(image_shape):
        return mask
    (mh, mw), (ih, iw) = mask.shape, image_shape
    if mh and mw and abs((mh / mw) / (ih / iw) - 1) <= 0.02:
        return Resizing.of((ih, iw), "stretch").apply(mask, mask=True)
    raise UnreadableImageError(f"{what}: the mask is {mh} x {mw} (h x w), its image {ih} x {iw}: not the "
                               f"same picture")


def patch_mode_labels(masks, patch_size: int, *, ignore: int | None = 0) -> np.ndarray:
    """Each patch's label: the most frequent pixel label in it, `ignore` dropped (ties to the
    smallest label; a patch with only ignored pixels gets `ignore`). saev's rule for patch labels.

    Args:
        masks: integer [N, H, W] pixel labels.
        patch_size: patch side in px (must divide H and W).
        ignore: a label that never wins (ADE20K's 0, "other"), or None.

    Returns:
        int64 [N, H // p, W // p].
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype.kind not in "iu":
        raise ValueError(f"masks must be integer [N, H, W], got {masks.dtype} {masks.shape}")
    n, h, w = masks.shape
    p = int(patch_size)
    if p < 1 or h % p or w % p:
        raise ValueError(f"patch_size {patch_size} must divide the mask size {(h, w)}")
    blocks = masks.reshape(n, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(n, h // p, w // p, p * p)
    values = np.unique(masks)
    if ignore is not None:
        values = values[values != ignore]
    if values.size == 0:
        return np.full((n, h // p, w // p), ignore, np.int64)
    counts = np.stack([np.count_nonzero(blocks == v, axis=-1) for v in values], axis=-1)
    best = values[np.argmax(counts, axis=-1)].astype(np.int64)  # argmax: the first (smallest) of ties
    return np.where(counts.max(axis=-1) > 0, best, -1 if ignore is None else ignore)


