"""CUB-200-2011 (Caltech-UCSD Birds), read from its official layout; no network, no TensorFlow.

    CUB_200_2011/
      images/<class folder>/<image>.jpg
      images.txt                 "<image id> <relative path>"
      image_class_labels.txt     "<image id> <class id 1..200>"
      train_test_split.txt       "<image id> <1 = train, 0 = test>"
      classes.txt                "<class id> <class folder name>"
      segmentations/<class folder>/<image>.png   (optional; a separate download)

>>> train = source("/data/CUB_200_2011", "train", image_size=224)
>>> train.classes[0], len(train)            # ('001.Black_footed_Albatross', 5994)
"""

from __future__ import annotations

import os

import numpy as np

from saejax import data

__all__ = ["source", "write_tiny_tree"]


def _read_table(path: str) -> list[list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (expected the CUB-200-2011 layout: images/, images.txt, "
                                f"image_class_labels.txt, train_test_split.txt, classes.txt)")
    with open(path) as f:
        rows = [line.split(maxsplit=1) for line in f if line.strip()]
    if any(len(r) != 2 for r in rows):
        raise ValueError(f"{path}: every line must be '<id> <value>'")
    return rows


def source(root: str | os.PathLike, split: str, *, image_size=None, short_side=None, masks: bool = False,
           skip_unreadable: bool = False) -> data.FileListSource:
    """The `split` ("train" or "test") of CUB-200-2011 at `root`, labels 0..199 in the order of
    `classes.txt`, with `segmentations/` masks (0 = background, 1 = bird: the soft masks are
    thresholded at 50%) when `masks=True`.

    Raises:
        FileNotFoundError: a missing metadata file, image or (with `masks`) segmentation.
        ValueError: a bad split or malformed metadata (names the file).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = os.fspath(root)
    paths = dict(_read_table(os.path.join(root, "images.txt")))
    labels = {k: int(v) - 1 for k, v in _read_table(os.path.join(root, "image_class_labels.txt"))}
    is_train = {k: v.strip() == "1" for k, v in _read_table(os.path.join(root, "train_test_split.txt"))}
    classes = [v.strip() for _, v in sorted(_read_table(os.path.join(root, "classes.txt")), key=lambda r: int(r[0]))]
    ids = sorted((k for k in paths if is_train.get(k) == (split == "train")), key=int)
    if not ids:
        raise ValueError(f"{root}: no {split} images in train_test_split.txt")
    image_paths = [os.path.join(root, "images", paths[k].strip()) for k in ids]
    mask_paths = None
    if masks:
        mask_paths = [os.path.join(root, "segmentations", os.path.splitext(paths[k].strip())[0] + ".png") for k in ids]
        missing = [p for p in mask_paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} segmentations missing, e.g. {missing[0]} (download "
                                    f"segmentations.tgz into {root})")
    for path in image_paths[:1] + image_paths[-1:]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: listed in images.txt but missing")
    src = _CubSource(image_paths, labels=[labels[k] for k in ids], mask_paths=mask_paths, classes=classes,
                     image_size=image_size, short_side=short_side, skip_unreadable=skip_unreadable)
    return src


class _CubSource(data.FileListSource):
    def _load(self, index):
        example = super()._load(index)
        if example.mask is not None:  # soft 0..255 masks -> bird / background
            example = example._replace(mask=(np.asarray(example.mask) >= 128).astype(np.uint8))
        return example


def write_tiny_tree(root: str | os.PathLike, *, n_classes: int = 4, per_class: int = 6, size: int = 48,
                    seed: int = 0) -> str:
    """A tiny CUB-200-2011 tree in the official layout (for tests and `:small` configs):
    `n_classes` "species", each a bird-ish blob of its own colour on noise, half train and half
    test, with segmentations. Returns `root`."""
    from PIL import Image

    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    image_id = 0
    yy, xx = np.mgrid[:size, :size]
    for c in range(n_classes):
        name = f"{c + 1:03d}.Bird_{c}"
        lines["classes.txt"].append(f"{c + 1} {name}")
        os.makedirs(os.path.join(root, "images", name), exist_ok=True)
        os.makedirs(os.path.join(root, "segmentations", name), exist_ok=True)
        colour = np.asarray(rng.integers(40, 256, 3), np.float64)
        for i in range(per_class):
            image_id += 1
            cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [size // 4]
            bird = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image = rng.integers(0, 80, (size, size, 3)).astype(np.float64)
            image[bird] = colour
            rel = f"{name}/Bird_{c}_{i:04d}.jpg"
            Image.fromarray(image.astype(np.uint8)).save(os.path.join(root, "images", rel), quality=95)
            Image.fromarray((bird * 255).astype(np.uint8)).save(
                os.path.join(root, "segmentations", rel[:-4] + ".png"))
            lines["images.txt"].append(f"{image_id} {rel}")
            lines["image_class_labels.txt"].append(f"{image_id} {c + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {int(i % 2 == 0)}")
    for name, rows in lines.items():
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return root
