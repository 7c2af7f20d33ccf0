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


def source(root: str | os.PathLike, split: str, *, image_size=224, short_side=256,
           skip_unreadable: bool = False) -> data.FileListSource:
    """The `split` ("training" or "validation") with its per-pixel masks.

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
                               classes=_class_names(root), image_size=image_size, short_side=short_side,
                               skip_unreadable=skip_unreadable)


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
                    classes: tuple[int, ...] = (1, 2, 3), seed: int = 0) -> str:
    """A tiny ADEChallengeData2016 tree (for tests and `:small` configs): each image is split
    into regions of a few classes, each class with its own colour and texture, some pixels
    left 0 ("other"). Returns `root`."""
    from PIL import Image

    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    colours = {c: rng.integers(30, 256, 3) for c in classes}
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size + 16), np.uint8)  # wider than tall: the crop matters
            cuts = sorted(rng.integers(8, size + 8, len(classes) - 1).tolist())
            edges = [0, *cuts, size + 16]
            for c, lo, hi in zip(rng.permutation(list(classes)), edges[:-1], edges[1:]):
                mask[:, lo:hi] = c
            mask[: size // 8] = 0  # a strip of "other"
            image = rng.integers(0, 40, mask.shape + (3,)).astype(np.int64)
            for c, colour in colours.items():
                image[mask == c] += colour
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                os.path.join(root, "images", split, name + ".jpg"), quality=95)
            Image.fromarray(mask).save(os.path.join(root, "annotations", split, name + ".png"))
    with open(os.path.join(root, "objectInfo150.txt"), "w") as f:
        f.write("Idx\tRatio\tTrain\tVal\tName\n")
        for c in classes:
            f.write(f"{c}\t0.1\t{n_train}\t{n_val}\tthing{c};alias\n")
    return root
