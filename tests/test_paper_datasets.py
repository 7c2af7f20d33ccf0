"""The paper's data sets read from tiny trees in their official layouts (CUB-200-2011, ADE20K,
concept folders), and saev's patch-label rule."""

import os

import numpy as np
import pytest
from PIL import Image

from saejax import data
from saejax.datasets import ade20k, concept_folders, cub


def test_patch_mode_labels_drop_the_ignored_label_and_break_ties_low():
    masks = np.zeros((1, 4, 4), np.int64)
    masks[0, :2, :2] = [[0, 0], [0, 7]]      # ignored 0 is the majority; 7 wins
    masks[0, :2, 2:] = [[3, 5], [5, 3]]      # a tie: the smaller label
    masks[0, 2:, :2] = 0                     # only ignored: stays 0
    masks[0, 2:, 2:] = [[9, 9], [9, 2]]
    np.testing.assert_array_equal(data.patch_mode_labels(masks, 2), [[[7, 3], [0, 9]]])
    np.testing.assert_array_equal(data.patch_mode_labels(masks, 2, ignore=None), [[[0, 3], [0, 9]]])
    with pytest.raises(ValueError, match="patch_size 3 must divide the mask size"):
        data.patch_mode_labels(masks, 3)


def test_cub_reads_the_official_layout(tmp_path):
    root = cub.write_tiny_tree(tmp_path / "CUB_200_2011", n_classes=3, per_class=4)
    train, test = cub.source(root, "train", image_size=32, masks=True), cub.source(root, "test", image_size=32)
    assert (len(train), len(test)) == (6, 6)
    assert train.classes == ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
    assert train.paths[0].endswith("images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg")
    sizes = {Image.open(p).size for p in train.paths + test.paths}
    assert len(sizes) >= 8 and any(w < h for w, h in sizes) and any(w > h for w, h in sizes)  # as real CUB
    for i in range(len(train)):  # grey, progressive, off-by-a-pixel and RGB masks all read, aligned
        example = train[i]
        assert example.image.shape == (32, 32, 3) and set(np.unique(example.mask)) == {0, 1}
        bird = example.image[example.mask == 1].astype(float).mean(0)
        ground = example.image[example.mask == 0].astype(float).mean(0)
        assert np.abs(bird - ground).sum() > 60, train.paths[i]
    assert train[0].label == 0
    assert sorted(int(train[i].label) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    os.remove(os.path.join(root, "train_test_split.txt"))
    with pytest.raises(FileNotFoundError, match="train_test_split.txt: missing"):
        cub.source(root, "train")


def test_ade20k_crops_image_and_mask_alike(tmp_path):
    root = ade20k.write_tiny_tree(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1, size=64)
    val = ade20k.source(root, "validation", image_size=32, short_side=40)
    assert val.classes[1] == "thing1" and len(val.classes) == ade20k.N_CLASSES
    example = val[0]
    assert example.image.shape == (32, 32, 3) and example.mask.shape == (32, 32)
    # As the HF processors do: the short side to 40 (64 x 80 -> 40 x 50), then the centre 32 x 32
    # at integer offsets ((50 - 32) // 2, (40 - 32) // 2) = (9, 4).
    full = Image.open(os.path.join(root, "annotations", "validation", "ADE_val_00000001.png"))
    want = np.asarray(full.resize((50, 40), Image.NEAREST))[4:36, 9:41]
    np.testing.assert_array_equal(example.mask, want)
    os.remove(os.path.join(root, "annotations", "validation", "ADE_val_00000001.png"))
    with pytest.raises(FileNotFoundError, match="1 annotations missing, e.g. .*ADE_val_00000001.png"):
        ade20k.source(root, "validation")


def test_concept_folders_label_negatives_zero(tmp_path):
    root = concept_folders.write_tiny_tree(tmp_path / "concepts", per_concept=3, negatives=2)
    src = concept_folders.source(root, image_size=32)
    assert src.classes == ("negative", "blue_disc", "red_square")
    assert sorted(src.labels.tolist()) == [0, 0, 1, 1, 1, 2, 2, 2]
