"""Concept image sets for semantic probing: a positives folder per concept and shared negatives.

    root/
      positives/<concept>/*.jpg     about 20 images that show the concept
      negatives/*.jpg               about 20 images that show none of them (shared)

>>> src = source("/data/concepts", image_size=224)
>>> src.classes        # ('negative', 'brazil', 'dog', ...): label 0 is a negative, label c >= 1 concept c
"""

from __future__ import annotations

import os

import numpy as np

from saejax import data

__all__ = ["source", "write_tiny_tree"]


def source(root: str | os.PathLike, *, image_size=224, short_side=None, resample="bicubic",
           skip_unreadable: bool = False) -> data.FileListSource:
    """All images under `root` (layout above), labelled 0 for negatives and 1 + i for
    concept i (sorted by folder name). Gathered images come in every size and pixel format:
    `image_size`, `short_side`, `resample` as in `saejax.data.FileListSource`, formats by
    `saejax.data.read_image`; `skip_unreadable` skips and counts (`source.skipped`) files that
    cannot be read.

    Raises:
        FileNotFoundError: no `positives/` or `negatives/` folder, or an empty one (named).
    """
    root = os.fspath(root)
    positives, negatives = os.path.join(root, "positives"), os.path.join(root, "negatives")
    for folder in (positives, negatives):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: missing (expected {root}/positives/<concept>/ and {root}/negatives/)")
    concepts = sorted(d for d in os.listdir(positives) if os.path.isdir(os.path.join(positives, d)))
    if not concepts:
        raise FileNotFoundError(f"{positives}: no concept folders")
    paths, labels = [], []
    for label, folder in [(0, negatives)] + [(i + 1, os.path.join(positives, c)) for i, c in enumerate(concepts)]:
        found = data.find_images(folder)
        if not found:
            raise FileNotFoundError(f"{folder}: no images")
        paths += found
        labels += [label] * len(found)
    return data.FileListSource(paths, labels=labels, classes=("negative", *concepts), image_size=image_size,
                               short_side=short_side, resample=resample, skip_unreadable=skip_unreadable)


def write_tiny_tree(root: str | os.PathLike, *, concepts=("red_square", "blue_disc"), per_concept: int = 8,
                    negatives: int = 8, size: int = 32, unreadable: int = 0, seed: int = 0) -> str:
    """A tiny concept tree (for tests and `:small` configs): each concept is a coloured shape
    on noise; negatives are noise. Like images gathered from the web, they come in mixed sizes
    and aspect ratios around `size` px and in several formats (JPEG, progressive JPEG, RGBA PNG,
    EXIF-rotated JPEG; `real_files.FORMATS`); `unreadable` negatives are truncated JPEGs.
    Returns `root`."""
    from saejax.datasets import real_files

    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    kinds = ("rgb", "progressive", "png_rgba", "rgb", "exif_rotated")
    os.makedirs(os.path.join(root, "negatives"), exist_ok=True)

    def save(folder, stem, image, i):
        os.makedirs(folder, exist_ok=True)
        kind = kinds[i % len(kinds)]
        real_files.save_photo(os.path.join(folder, stem + (".png" if kind == "png_rgba" else ".jpg")),
                              image.astype(np.uint8), kind)

    for i in range(negatives):
        w, h = real_files.photo_size(rng, size)
        if i >= negatives - unreadable:
            real_files.save_truncated(os.path.join(root, "negatives", f"neg_{i:03d}.jpg"),
                                      rng.integers(0, 90, (h, w, 3)).astype(np.uint8))
            continue
        save(os.path.join(root, "negatives"), f"neg_{i:03d}", rng.integers(0, 90, (h, w, 3)), i)
    for k, concept in enumerate(concepts):
        colour = np.zeros(3)
        colour[(2 * k) % 3] = 230  # red, blue, green, ...
        for i in range(per_concept):
            w, h = real_files.photo_size(rng, size)
            yy, xx = np.mgrid[:h, :w]
            image = rng.integers(0, 90, (h, w, 3)).astype(np.float64)
            cy, cx = rng.integers(h // 4, 3 * h // 4 + 1), rng.integers(w // 4, 3 * w // 4 + 1)
            r = min(h, w) // 6
            shape = ((np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)) if k % 2 == 0 else \
                ((yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) // 5) ** 2)
            image[shape] = colour
            save(os.path.join(root, "positives", concept), f"{concept}_{i:03d}", image, i)
    return root
