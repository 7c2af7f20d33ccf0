"""ADE20K SceneParsing (ADEChallengeData2016), read from its official layout.

    ADEChallengeData2016/
      images/{training,validation}/ADE_<split>_<8 digits>.jpg
      annotations/{training,validation}/ADE_<split>_<8 digits>.png   (labels 0..150; 0 = other)
      objectInfo150.txt            (optional: "Idx Ratio Train Val Name", tab-separated)

The paper's protocol resizes to 256 (short side) and centre-crops 224, image and mask alike:
`source(root, "validation", image_size=224, short_side=256)`.
"""

from __future__ import annotations

import os

import numpy as np

from saejax import data

__all__ = ["IGNORE", "N_CLASSES", "source", "write_tiny_tree"]

N_CLASSES = 151  # 0 = "other" (ignored in the metrics) + 150 classes
IGNORE = 0


def source(root: str | os.PathLike, split: str, *, image_size=224, short_side=256, resample="bicubic",
           skip_unreadable: bool = False) -> data.FileListSource:
    """The `split` ("training" or "validation") with its per-pixel masks.

    `image_size`, `short_side`, `resample`: as in `saejax.data.FileListSource`; image and mask
    are resized and cropped alike. `skip_unreadable`: skip and count (`source.skipped`) images
    or annotations that cannot be read, or whose labels are out of range.

    The data set's quirks, handled here: images run from about 100 px to over 2,000 px a side,
    in every aspect ratio; a few are greyscale or CMYK JPEGs (made RGB, `saejax.data.read_image`);
    annotations are 8-bit PNGs whose values are the labels 0..150 (0 = "other"). A value above
    150 (e.g. a mask saved with 255 for "ignore") is an `UnreadableImageError` naming the file,
    never a label silently clamped by a probe.

    Raises:
        FileNotFoundError: missing folders, or an image without its annotation (named).
    """
    if split not in ("training", "validation"):
        raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
    root = os.fspath(root)
    image_dir, mask_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: missing (expected ADEChallengeData2016/images/{split} and "
                                    f"annotations/{split})")
    names = sorted(f[:-4] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not names:
        raise FileNotFoundError(f"{image_dir}: no .jpg images")
    masks = [os.path.join(mask_dir, n + ".png") for n in names]
    missing = [m for m in masks if not os.path.isfile(m)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} annotations missing, e.g. {missing[0]}")
    return data.FileListSource([os.path.join(image_dir, n + ".jpg") for n in names], mask_paths=masks,
                               max_label=N_CLASSES - 1, classes=_class_names(root), image_size=image_size,
                               short_side=short_side, resample=resample, skip_unreadable=skip_unreadable)


def _class_names(root: str) -> tuple[str, ...]:
    path = os.path.join(root, "objectInfo150.txt")
    names = ["other"] + [f"class_{i}" for i in range(1, N_CLASSES)]
    if os.path.isfile(path):
        with open(path) as f:
            for line in f.readlines()[1:]:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 5 and parts[0].strip().isdigit() and 0 < int(parts[0]) < N_CLASSES:
                    names[int(parts[0])] = parts[4].split(";")[0].strip()
    return tuple(names)


def write_tiny_tree(root: str | os.PathLike, *, n_train: int = 12, n_val: int = 6, size: int = 64,
                    classes: tuple[int, ...] = (1, 2, 3), unreadable: int = 0, seed: int = 0) -> str:
    """A tiny ADEChallengeData2016 tree (for tests and `:small` configs): each image is split
    into regions of a few classes, each class with its own colour and texture, some pixels
    left 0 ("other").

    As in ADE20K: the first image of each split is `size` x `size + 16` (h x w), the others of
    mixed sizes and aspect ratios (`real_files.photo_size`); the second of each split is a CMYK
    JPEG, the third training image a grey one. `unreadable` training images are truncated JPEGs (the last
    ones). Returns `root`."""
    from PIL import Image

    from saejax.datasets import real_files

    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    colours = {c: rng.integers(30, 256, 3) for c in classes}
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for i in range(n):
            w, h = (size + 16, size) if i == 0 else real_files.photo_size(rng, size)
            mask = np.zeros((h, w), np.uint8)
            cuts = sorted(rng.integers(w // 8, w - w // 8, len(classes) - 1).tolist())
            edges = [0, *cuts, w]
            for c, lo, hi in zip(rng.permutation(list(classes)), edges[:-1], edges[1:]):
                mask[:, lo:hi] = c
            mask[: h // 8] = 0  # a strip of "other"
            image = rng.integers(0, 40, mask.shape + (3,)).astype(np.int64)
            for c, colour in colours.items():
                image[mask == c] += colour
            image = np.clip(image, 0, 255).astype(np.uint8)
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            path = os.path.join(root, "images", split, name + ".jpg")
            if split == "training" and i >= n - unreadable:
                real_files.save_truncated(path, image)
            else:
                real_files.save_photo(path, image, {1: "cmyk", 2: "grey" if split == "training" else "rgb"}.get(i, "rgb"))
            Image.fromarray(mask).save(os.path.join(root, "annotations", split, name + ".png"))
    with open(os.path.join(root, "objectInfo150.txt"), "w") as f:
        f.write("Idx\tRatio\tTrain\tVal\tName\n")
        for c in classes:
            f.write(f"{c}\t0.1\t{n_train}\t{n_val}\tthing{c};alias\n")
    return root
