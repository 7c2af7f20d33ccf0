"""Host-side image preprocessing that reproduces the Hugging Face image processors.

The HF "slow" image processors (`CLIPImageProcessor`, `BitImageProcessor` used by DINOv2,
`ViTImageProcessor`) resize a uint8 image with PIL (so the resized pixels are rounded back to
uint8 by PIL), center-crop it (zero-padding when the image is smaller than the crop), rescale
by 1/255 in float64 then cast to float32, and normalise per channel in float32.
`ImageProcessing` performs exactly these steps with PIL and numpy, so its output equals the HF
processor's bit for bit (the tests allow 1e-6), without importing `transformers` at call time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# PIL.Image.Resampling values (identical to transformers' PILImageResampling).
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """A model's image preprocessing: resize, center crop, rescale, normalise.

    Attributes:
        resize_shortest: Resize so the short side has this length (aspect kept; the long side
            is `int(shortest * long / short)` as in HF), or None.
        resize_to: Resize to exactly `(height, width)`, or None. At most one of the two is set.
        resample: PIL resampling filter id (3 = bicubic, 2 = bilinear).
        crop: `(height, width)` of the center crop, or None.
        rescale: Factor applied after resizing (1/255), or None.
        mean: Per-channel mean subtracted after rescaling, or None (no normalisation).
        std: Per-channel std divided by after subtracting the mean.
    """

    resize_shortest: int | None = None
    resize_to: tuple[int, int] | None = None
    resample: int = BICUBIC
    crop: tuple[int, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        """`(height, width)` of every preprocessed image."""
        if self.crop is not None:
            return self.crop
        if self.resize_to is not None:
            return self.resize_to
        raise ValueError("preprocessing without a crop or a fixed resize has no fixed output size")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], *, square_size: bool) -> ImageProcessing:
        """Builds the spec from an HF `preprocessor_config.json` dict.

        Args:
            cfg: The parsed JSON.
            square_size: How an int `size` is read: True for processors that resize to a
                square (ViT), False for shortest-edge processors (CLIP, DINOv2's Bit).
        """
        resize_shortest = resize_to = crop = None
        if cfg.get("do_resize", True):
            size = cfg.get("size", 224)
            if isinstance(size, int):
                if square_size:
                    resize_to = (size, size)
                else:
                    resize_shortest = size
            elif isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
                resize_shortest = int(size["shortest_edge"])
            elif isinstance(size, Mapping) and set(size) == {"height", "width"}:
                resize_to = (int(size["height"]), int(size["width"]))
            else:
                raise ValueError(f"unsupported `size` in preprocessor_config.json: {size!r}")
        if cfg.get("do_center_crop", not square_size):
            c = cfg.get("crop_size", 224)
            if isinstance(c, int):
                crop = (c, c)
            elif isinstance(c, Mapping) and set(c) == {"height", "width"}:
                crop = (int(c["height"]), int(c["width"]))
            else:
                raise ValueError(f"unsupported `crop_size` in preprocessor_config.json: {c!r}")
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        mean = std = None
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", HALF))
            std = tuple(float(v) for v in cfg.get("image_std", HALF))
        return cls(resize_shortest=resize_shortest, resize_to=resize_to,
                   resample=int(cfg.get("resample", BILINEAR if square_size else BICUBIC)),
                   crop=crop, rescale=rescale, mean=mean, std=std)

    def to_hf(self) -> dict[str, Any]:
        """The `preprocessor_config.json` fields that `from_hf` reads back as this processing."""
        out: dict[str, Any] = {"do_resize": self.resize_shortest is not None or self.resize_to is not None,
                               "resample": int(self.resample), "do_center_crop": self.crop is not None,
                               "do_rescale": self.rescale is not None, "do_normalize": self.mean is not None}
        if self.resize_shortest is not None:
            out["size"] = {"shortest_edge": int(self.resize_shortest)}
        elif self.resize_to is not None:
            out["size"] = {"height": int(self.resize_to[0]), "width": int(self.resize_to[1])}
        if self.crop is not None:
            out["crop_size"] = {"height": int(self.crop[0]), "width": int(self.crop[1])}
        if self.rescale is not None:
            out["rescale_factor"] = float(self.rescale)
        if self.mean is not None:
            out["image_mean"], out["image_std"] = list(self.mean), list(self.std)
        return out

    def source_resizing(self) -> dict[str, Any]:
        """The keyword arguments (`image_size`, `resize`, `short_side`, `resample`) that make an
        image source (`saejax.data.ImageFolderSource`, `FileListSource`, `TfdsSource`, the data
        sets) do this processor's resizing, so that images of any size batch and `__call__` on
        the source's images gives the HF processor's pixels on the original images exactly.

        A short-side resize with a centre crop yields the resized short side's centre square;
        `__call__` then crops it (a crop of a centre crop is the same centre crop).

        Raises:
            ValueError: a processor a source cannot imitate (a crop larger than the resized
                short side, which HF zero-pads; a crop of odd margin within it; a fixed resize
                followed by a crop).
        """
        resample = {NEAREST: "nearest", LANCZOS: "lanczos", BILINEAR: "bilinear", BICUBIC: "bicubic", BOX: "box",
                    HAMMING: "hamming"}[self.resample]
        if self.resize_to is not None and self.crop is None:
            return {"image_size": self.resize_to, "resize": "stretch", "short_side": None, "resample": resample}
        short = self.resize_shortest
        if short is not None and self.crop is not None and all(c <= short and (short - c) % 2 == 0 for c in self.crop):
            return {"image_size": (short, short), "resize": "crop", "short_side": None, "resample": resample}
        raise ValueError(f"a source cannot resize as {self}: it needs a fixed resize without a crop, or a short-side "
                         f"resize at least as long as the crop, with an even margin")

    def __call__(self, images) -> np.ndarray:
        """Preprocesses a batch of uint8 RGB images.

        Args:
            images: uint8 array [N, H, W, 3] (NHWC; [N, H, W, 1] grayscale is repeated to RGB),
                or a sequence of uint8 [H, W, 3] arrays of different sizes.

        Returns:
            float32 array [N, S_h, S_w, 3] (`output_size`), ready for `Backbone.forward`.

        Raises:
            ValueError: On a wrong dtype, rank or channel layout (with the expected shape).
        """
        if self._batch_is_resized(images):  # one vectorised pass: no per-image PIL round trip
            top, left = (images.shape[1] - self.output_size[0]) // 2, (images.shape[2] - self.output_size[1]) // 2
            cropped = images[:, top:top + self.output_size[0], left:left + self.output_size[1]]
            return self._values(cropped)
        batch = _as_image_list(images)
        h, w = self.output_size
        out = np.empty((len(batch), h, w, 3), np.float32)
        for n, image in enumerate(batch):
            out[n] = self._one(image)
        return out

    def _batch_is_resized(self, images) -> bool:
        """`images` is a uint8 [N, H, W, 3] array that the resize leaves as it is (PIL's
        same-size resize is an exact copy) and that the crop fits without padding."""
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
                and images.shape[-1] == 3):
            return False
        height, width = images.shape[1:3]
        if self.resize_to is not None and tuple(self.resize_to) != (height, width):
            return False
        if self.resize_to is None and self.resize_shortest is not None and self.resize_shortest != min(height, width):
            return False
        crop = self.crop or (height, width)
        return crop[0] <= height and crop[1] <= width

    def _one(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image  # noqa: PLC0415

        if self.resize_shortest is not None or self.resize_to is not None:
            height, width = image.shape[:2]
            if self.resize_to is not None:
                new_h, new_w = self.resize_to
            else:
                short, long = (width, height) if width <= height else (height, width)
                new_short, new_long = self.resize_shortest, int(self.resize_shortest * long / short)
                new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
            # Like HF, always round-trip through PIL (a same-size resize is an exact copy).
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=self.resample))
        if self.crop is not None:
            image = _center_crop(image, self.crop)
        return self._values(image)

    def _values(self, x: np.ndarray) -> np.ndarray:
        """Rescale and normalise uint8 pixels (one image or a batch)."""
        if self.rescale is not None:
            x = (x.astype(np.float64) * self.rescale).astype(np.float32)
        if self.mean is not None:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.asarray(self.mean, x.dtype)) / np.asarray(self.std, x.dtype)
        return x.astype(np.float32)


def _center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HF `center_crop` on an HWC image, zero-padding when the image is smaller than the crop."""
    orig_h, orig_w = image.shape[:2]
    crop_h, crop_w = size
    top, left = (orig_h - crop_h) // 2, (orig_w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= orig_h and left + crop_w <= orig_w:
        return image[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, orig_h), max(crop_w, orig_w)
    padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    top_pad, left_pad = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    padded[top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = image
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _as_image_list(images) -> list[np.ndarray]:
    """Validates the input of `preprocess` and returns a list of uint8 [H, W, 3] arrays."""
    if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
        arr = np.asarray(images)
        if arr.ndim != 4:
            hint = " (a single image? add a batch axis: images[None])" if arr.ndim == 3 else ""
            raise ValueError(f"preprocess expects uint8 images [N, H, W, 3] (NHWC); got shape {arr.shape}{hint}")
        items = list(arr)
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = [np.asarray(im) for im in images]
        for im in items:
            if im.ndim != 3:
                raise ValueError(f"preprocess expects each image as uint8 [H, W, 3]; got shape {im.shape}")
    else:
        raise TypeError(f"preprocess expects a uint8 numpy array [N, H, W, 3] or a list of [H, W, 3]; "
                        f"got {type(images).__name__}")
    if not items:
        raise ValueError("preprocess got an empty batch")
    out = []
    for im in items:
        if im.dtype != np.uint8:
            raise ValueError(f"preprocess expects uint8 pixels in [0, 255]; got dtype {im.dtype} "
                             "(already preprocessed? pass float images straight to forward)")
        if im.shape[-1] == 3:
            out.append(im)
        elif im.shape[-1] == 1:
            out.append(np.repeat(im, 3, axis=-1))
        elif im.shape[0] in (1, 3):
            raise ValueError(f"images look channels-first (NCHW, image shape {im.shape}); preprocess expects "
                             "NHWC uint8 [N, H, W, 3]: transpose with images.transpose(0, 2, 3, 1)")
        else:
            raise ValueError(f"preprocess expects RGB images [N, H, W, 3]; got {im.shape[-1]} channels "
                             f"(image shape {im.shape})")
    return out
