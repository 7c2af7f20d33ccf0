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

import colorsys
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


def source(root: str | os.PathLike, split: str, *, image_size=None, short_side=None, resample="bicubic",
           masks: bool = False, skip_unreadable: bool = False) -> data.FileListSource:
    """The `split` ("train" or "test") of CUB-200-2011 at `root`, labels 0..199 in the order of
    `classes.txt`, with `segmentations/` masks (0 = background, 1 = bird) when `masks=True`.

    `image_size`, `short_side`, `resample`: as in `saejax.data.FileListSource` (the images are
    of many sizes, about 500 x 333 to 500 x 500, portrait and landscape). `skip_unreadable`:
    skip and count (`source.skipped`) images or masks that cannot be read.

    The data set's quirks, handled here: the segmentations are soft (0..255, the agreement of
    several annotators), so they are thresholded at 50% (>= 128); a few are stored at another
    size than their image and are resized to it (nearest); some are saved as RGB or grey +
    alpha and are read as their grey; a few photos are greyscale or CMYK JPEGs and are made RGB
    (`saejax.data.read_image`).

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
    return _CubSource(image_paths, labels=[labels[k] for k in ids], mask_paths=mask_paths, classes=classes,
                      image_size=image_size, short_side=short_side, resample=resample,
                      skip_unreadable=skip_unreadable)


class _CubSource(data.FileListSource):
    def _load(self, index):
        example = super()._load(index)
        if example.mask is not None:  # soft 0..255 masks -> bird / background
            example = example._replace(mask=(np.asarray(example.mask) >= 128).astype(np.uint8))
        return example


_SPECIES = ("Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani",
            "Crested_Auklet", "Least_Auklet", "Parakeet_Auklet", "Rhinoceros_Auklet")


def write_tiny_tree(root: str | os.PathLike, *, n_classes: int = 4, per_class: int = 6, size: int = 48,
                    unreadable: int = 0, seed: int = 0) -> str:
    """A tiny CUB-200-2011 tree in the official layout, shaped like the real one (for tests and
    `:small` configs): `n_classes` "species", each a bird-ish blob of its own colour on noise,
    half train and half test, with soft segmentations.

    As in CUB: names like `001.Black_footed_Albatross/Black_Footed_Albatross_0003_796113.jpg`;
    images of mixed sizes around `size` px and aspect ratios (`real_files.photo_size`); one grey,
    one CMYK, one progressive and one EXIF-rotated JPEG when there are images enough; soft
    masks (0..255, edges ramped), one stored at a slightly smaller size than its image and one
    saved as RGB. `unreadable` train images are truncated JPEGs. Returns `root`."""
    from PIL import Image

    from saejax.datasets import real_files

    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    specials = {1: "grey", 2: "cmyk", 3: "progressive", 4: "exif_rotated"}  # by image id
    image_id = 0
    for c in range(n_classes):
        species = _SPECIES[c % len(_SPECIES)] + ("" if c < len(_SPECIES) else f"_{c}")
        name = f"{c + 1:03d}.{species}"
        lines["classes.txt"].append(f"{c + 1} {name}")
        os.makedirs(os.path.join(root, "images", name), exist_ok=True)
        os.makedirs(os.path.join(root, "segmentations", name), exist_ok=True)
        colour = 255 * np.asarray(colorsys.hsv_to_rgb(c / n_classes, 0.8, 0.9))  # species far apart in hue
        for i in range(per_class):
            image_id += 1
            w, h = real_files.photo_size(rng, size)
            yy, xx = np.mgrid[:h, :w]
            cy, cx, r = int(rng.integers(h // 3, 2 * h // 3 + 1)), int(rng.integers(w // 3, 2 * w // 3 + 1)), min(h, w) / 3
            inside = np.clip(r + 1 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0, 2) / 2  # a soft edge
            image = rng.integers(0, 80, (h, w, 3)).astype(np.float64) * (1 - inside[..., None]) + colour * inside[..., None]
            soft = (inside * 255).astype(np.uint8)
            stem = f"{species.title()}_{i + 1:04d}_{796_110 + image_id}"
            rel = f"{name}/{stem}.jpg"
            path, mask_path = os.path.join(root, "images", rel), os.path.join(root, "segmentations", name, stem + ".png")
            kind = specials.get(image_id, "rgb")
            if c == n_classes - 1 and i % 2 == 0 and (per_class - 1 - i) // 2 < unreadable:  # the last train images
                real_files.save_truncated(path, image.astype(np.uint8))
            else:
                real_files.save_photo(path, image.astype(np.uint8), kind)
            if kind == "exif_rotated":
                soft = np.rot90(soft, 1)  # drawn on the stored pixels
            mask = Image.fromarray(np.ascontiguousarray(soft))
            if image_id == 5:
                mask = mask.resize((w - 1, h - 1), Image.NEAREST)  # a few CUB masks are off by a pixel
            if image_id == 6:
                mask = mask.convert("RGB")
            mask.save(mask_path)
            lines["images.txt"].append(f"{image_id} {rel}")
            lines["image_class_labels.txt"].append(f"{image_id} {c + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {int(i % 2 == 0)}")
    for name, rows in lines.items():
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return root
