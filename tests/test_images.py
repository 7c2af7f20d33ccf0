"""Real images: resize/crop geometry for every image size, and every pixel format users have.

The geometry tests sweep every width and height in 1..600 against every target size the
configs use; the format tests write each kind of file a real data set holds and check what
`saejax.data.read_image`'s documented policy says comes out.
"""

import struct
import zlib

import numpy as np
import pytest
import transformers
from PIL import Image

from saejax import data
from saejax.backbones.preprocess import ImageProcessing

TARGETS = (32, 40, 112, 224, 256, 336, 384, 518)  # the image sizes the configs use
SIDES = np.arange(1, 601)


def hf_shortest_edge(width, height, size):
    """transformers' `get_resize_output_image_size(default_to_square=False)`, float as it is."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


@pytest.mark.parametrize("target", TARGETS)
def test_crop_plan_fits_inside_and_matches_hf_for_every_size_up_to_600(target):
    cover = data.Resizing.of(target)
    shorter = data.Resizing.of(target, short_side=target * 8 // 7)  # "resize 256, crop 224"
    stretch = data.Resizing.of((target, target + 8), "stretch")
    for w in SIDES.tolist():
        for h in SIDES.tolist():
            (rw, rh), (left, top) = cover.plan(w, h)
            assert (rw, rh) == hf_shortest_edge(w, h, target), (w, h)
            assert 0 <= left and left + target <= rw and 0 <= top and top + target <= rh, (w, h)
            assert (left, top) == ((rw - target) // 2, (rh - target) // 2)
            (rw, rh), (left, top) = shorter.plan(w, h)
            assert (rw, rh) == hf_shortest_edge(w, h, target * 8 // 7), (w, h)
            assert 0 <= left and left + target <= rw and 0 <= top and top + target <= rh, (w, h)
            assert stretch.plan(w, h) == ((target + 8, target), (0, 0))


def test_non_square_targets_cover_and_fit():
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        w, h, tw, th = (int(v) for v in rng.integers(1, 700, 4))
        (rw, rh), (left, top) = data.Resizing.of((th, tw)).plan(w, h)
        assert min(rw - tw, rh - th) == 0 and 0 <= left <= rw - tw and 0 <= top <= rh - th, (w, h, tw, th)


def sample_sizes(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [tuple(int(v) for v in rng.integers(1, 601, 2)) for _ in range(n)]
    return sizes + [(1, 1), (70, 49), (49, 70), (500, 375), (375, 500), (1, 600), (600, 1), (599, 2)]


HUGE = [(4000, 3000), (3000, 4000), (1, 5000), (5000, 1), (12_000, 9)]


@pytest.mark.parametrize("target", TARGETS)
def test_resizing_real_pixels_never_fails_and_has_the_exact_shape(target):
    rng = np.random.default_rng(target)
    modes = [data.Resizing.of(target), data.Resizing.of(target, short_side=target * 8 // 7, resample="bilinear"),
             data.Resizing.of((target, target // 2 + 1), "stretch")]
    for w, h in sample_sizes(15, seed=target) + (HUGE if target in (224, 518) else []):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if w * h < 10**6 else \
            np.full((h, w, 3), 90, np.uint8)
        mask = (np.arange(w)[None, :] * 7 + np.arange(h)[:, None]).astype(np.int64) % 300  # labels > 255 too
        for resizing in modes:
            out, out_mask = resizing.apply(image), resizing.apply(mask, mask=True)
            assert out.shape == (*resizing.size, 3) and out.dtype == np.uint8, (w, h)
            assert out_mask.shape == resizing.size and out_mask.dtype == np.int64, (w, h)
            assert set(np.unique(out_mask)) <= set(np.unique(mask)), (w, h)  # nearest: no new labels


PALETTE = np.asarray([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 230, 30]], np.uint8)


def labelled_picture(w, h, rng):
    """Labels in up to 4 vertical and horizontal bands (at least 4 px wide), the image their colours."""
    labels = np.zeros((h, w), np.int64)
    cuts = sorted(rng.choice(np.arange(4, w - 3), size=min(2, max(0, w - 7)), replace=False).tolist()) if w > 8 else []
    for k, x in enumerate(cuts):
        labels[:, x:] = k + 1
    if h > 8:
        labels[int(rng.integers(4, h - 3)):] = 3
    return labels, PALETTE[labels]


@pytest.mark.parametrize("target", (32, 224))
def test_masks_stay_aligned_with_their_images_pixel_for_pixel(tmp_path, target):
    rng = np.random.default_rng(1)
    paths, mask_paths = [], []
    sizes = sample_sizes(25, seed=2)
    for i, (w, h) in enumerate(sizes):
        labels, picture = labelled_picture(w, h, rng)
        paths.append(str(tmp_path / f"{i}.png"))
        mask_paths.append(str(tmp_path / f"{i}_mask.png"))
        Image.fromarray(picture).save(paths[-1])
        Image.fromarray(labels.astype(np.uint8)).save(mask_paths[-1])
    for resizing in (dict(image_size=target), dict(image_size=target, short_side=target * 8 // 7),
                     dict(image_size=(target, target + 8), resize="stretch")):
        source = data.FileListSource(paths, mask_paths=mask_paths, **resizing)
        nearest = data.FileListSource(paths, **resizing)
        for i in range(len(source)):
            example = source[i]
            # Same geometry: the image resampled nearest-neighbour is the mask's colours exactly.
            picture = data.read_image(paths[i])
            assert np.array_equal(source.resizing.apply(picture, mask=True), PALETTE[example.mask]), sizes[i]
            # The bicubic image: away from label edges, each pixel is nearest its own label's colour.
            m = example.mask
            interior = np.ones_like(m, bool)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    interior &= np.roll(m, (dy, dx), axis=(0, 1)) == m
            interior[[0, -1], :] = interior[:, [0, -1]] = False
            distance = np.abs(example.image[:, :, None].astype(int) - PALETTE[None, None].astype(int)).sum(-1)
            assert np.array_equal(np.argmin(distance, -1)[interior], m[interior]), sizes[i]
            assert np.array_equal(nearest[i].image, example.image)


def hf_processors():
    """(name, HF slow image processor, our ImageProcessing of the same config) per family that
    defines its preprocessing in an HF processor."""
    out = []
    for size in (32, 224, 336):
        clip = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        out.append((f"clip@{size}", clip, ImageProcessing.from_hf(clip.to_dict(), square_size=False)))
    dino = transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    out.append(("dinov2", dino, ImageProcessing.from_hf(dino.to_dict(), square_size=False)))
    vit = transformers.ViTImageProcessor()
    out.append(("vit", vit, ImageProcessing.from_hf(vit.to_dict(), square_size=True)))
    siglip = transformers.SiglipImageProcessor(size={"height": 384, "width": 384})
    out.append(("siglip", siglip, ImageProcessing.from_hf(siglip.to_dict(), square_size=True)))
    return out


def test_source_then_preprocess_equals_the_hf_processor_on_the_original_image(tmp_path):
    rng = np.random.default_rng(3)
    sizes = [s for s in sample_sizes(30, seed=4) if max(s) / min(s) <= 16]  # beyond, HF allocates huge images
    paths = []
    for i, (w, h) in enumerate(sizes):
        small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        photo = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)) // 2 + \
            rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(photo).save(paths[-1])
    for name, hf, processing in hf_processors():
        source = data.FileListSource(paths, **processing.source_resizing())
        for i, path in enumerate(paths):
            ours = processing(source[i].image[None])[0]
            theirs = hf(data.read_image(path), return_tensors="np", input_data_format="channels_last")["pixel_values"][0].transpose(1, 2, 0)
            np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=f"{name}, {sizes[i]}")


def test_resizing_arguments_are_checked():
    with pytest.raises(ValueError, match="short_side=200 is shorter than image_size"):
        data.Resizing.of(224, short_side=200)
    with pytest.raises(ValueError, match="short_side goes with resize='crop'"):
        data.Resizing.of(224, "stretch", short_side=256)
    with pytest.raises(ValueError, match="resample must be one of"):
        data.Resizing.of(224, resample="cubic")
    with pytest.raises(ValueError, match="image_size must be None"):
        data.Resizing.of((0, 3))
    with pytest.raises(ValueError, match="a source cannot resize"):
        ImageProcessing(resize_shortest=200, crop=(224, 224)).source_resizing()  # HF would zero-pad
    with pytest.raises(ValueError, match="a source cannot resize"):
        ImageProcessing(resize_shortest=256, crop=(223, 223)).source_resizing()  # an odd margin


# --------------------------------------------------------------------------------------------
# Pixel formats


def photo(h=40, w=56, seed=0):
    """A smooth, asymmetric RGB test picture (JPEG-friendly)."""
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 60.0)], -1)
    base[: h // 4, : w // 3] = [250, 250, 250]  # a bright corner: shows rotations
    return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def png16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def save(path, image, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def test_each_pixel_format_follows_the_documented_policy(tmp_path):
    rgb = photo()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(rgb.shape[0], 0)
    cases = {}
    # Lossless formats: exact expectations.
    cases["L png"] = (save(tmp_path / "l.png", Image.fromarray(grey)), np.repeat(grey[..., None], 3, -1))
    cases["LA png: alpha dropped"] = (save(tmp_path / "la.png", Image.fromarray(np.stack([grey, alpha], -1), "LA")),
                                      np.repeat(grey[..., None], 3, -1))
    cases["RGBA png: alpha dropped"] = (save(tmp_path / "rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA")),
                                        rgb)
    pal = Image.fromarray(rgb).quantize(16)
    pal_rgb = np.asarray(pal.convert("RGB"))
    cases["P png"] = (save(tmp_path / "p.png", pal), pal_rgb)
    cases["P png with transparency: dropped"] = (save(tmp_path / "pt.png", pal, transparency=3), pal_rgb)
    bits = grey > 128
    cases["1-bit png"] = (save(tmp_path / "one.png", Image.fromarray(bits).convert("1")),
                          np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1))
    wide = (grey.astype(np.uint16) * 257 + np.arange(grey.size).reshape(grey.shape) % 200).astype(np.uint16)
    cases["16-bit grey png: the high byte"] = (save(tmp_path / "g16.png", Image.fromarray(wide)),
                                               np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, -1))
    rgb16 = rgb.astype(np.uint16) * 257 + 100
    (tmp_path / "rgb16.png").write_bytes(png16(rgb16))
    cases["16-bit RGB png: the high byte"] = (str(tmp_path / "rgb16.png"), (rgb16 >> 8).astype(np.uint8))
    cases["lossless webp"] = (save(tmp_path / "x.webp", Image.fromarray(rgb), lossless=True), rgb)
    frames = [Image.fromarray(rgb).quantize(64), Image.fromarray(rgb[::-1]).quantize(64)]
    cases["animated gif: first frame"] = (save(tmp_path / "anim.gif", frames[0], save_all=True,
                                               append_images=frames[1:]), np.asarray(frames[0].convert("RGB")))
    for name, (path, expected) in cases.items():
        got = data.read_image(path)
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # Lossy formats: within JPEG's error of the picture they encode.
    lossy = {
        "baseline jpeg": save(tmp_path / "b.jpg", Image.fromarray(rgb), quality=95),
        "progressive jpeg": save(tmp_path / "p.jpg", Image.fromarray(rgb), quality=95, progressive=True),
        "CMYK jpeg (Adobe, inverted)": save(tmp_path / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95),
        "lossy webp": save(tmp_path / "lossy.webp", Image.fromarray(rgb), quality=90),
    }
    for name, path in lossy.items():
        got = data.read_image(path)
        assert got.shape == rgb.shape, name
        assert np.abs(got.astype(int) - rgb).mean() < 4, name
    grey_jpeg = data.read_image(save(tmp_path / "g.jpg", Image.fromarray(grey), quality=95))
    assert (grey_jpeg[..., 0] == grey_jpeg[..., 2]).all() and np.abs(grey_jpeg[..., 0].astype(int) - grey).mean() < 3


@pytest.mark.parametrize("orientation, upright", [
    (1, lambda a: a), (2, lambda a: a[:, ::-1]), (3, lambda a: a[::-1, ::-1]), (4, lambda a: a[::-1]),
    (5, lambda a: a.transpose(1, 0, 2)), (6, lambda a: np.rot90(a, -1)), (7, lambda a: np.rot90(a, 2).transpose(1, 0, 2)),
    (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, upright):
    rgb = photo()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "o.jpg", Image.fromarray(rgb), quality=95, exif=exif)
    got = data.read_image(path)
    expected = np.ascontiguousarray(upright(rgb))
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).mean() < 4
    # A mask drawn on the stored pixels turns with its image; so does an image-sized one.
    labels = ((rgb[..., 0] > 128) + 2 * (rgb[..., 1] > 128)).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "o.png")
    example = data.FileListSource([path], mask_paths=[str(tmp_path / "o.png")])[0]
    np.testing.assert_array_equal(example.mask, np.ascontiguousarray(upright(labels[..., None])[..., 0]))


def test_unreadable_files_are_errors_naming_them_or_skipped_and_counted(tmp_path):
    good = save(tmp_path / "good.jpg", Image.fromarray(photo()), quality=90)
    whole = open(good, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    floats = save(tmp_path / "float.tif", Image.fromarray(np.ones((8, 8), np.float32)))
    for name in ("truncated.jpg", "empty.jpg", "text.png"):
        with pytest.raises(data.UnreadableImageError, match=f"cannot read image .*{name}"):
            data.read_image(tmp_path / name)
    with pytest.raises(data.UnreadableImageError, match="float.tif.*mode F"):
        data.read_image(floats)
    paths = [good, str(tmp_path / "truncated.jpg"), str(tmp_path / "empty.jpg"), floats]
    source = data.FileListSource(paths, labels=[0, 1, 2, 3], image_size=16, skip_unreadable=True)
    (batch,) = list(data.batches(source, 4, shuffle=False, epochs=1))
    assert batch.ids.tolist() == [0, 0, 0, 0] and batch.images.shape == (4, 16, 16, 3)
    assert sorted(source.skipped) == [1, 2, 3] and "truncated.jpg" in source.skipped[1]


def test_mask_quirks_soft_rgb_and_other_resolutions(tmp_path):
    rgb = photo(60, 80)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    labels = np.zeros((60, 80), np.uint8)
    labels[10:50, 20:60] = 7
    # A grey mask saved as RGB, and one at half the resolution (the same picture).
    Image.fromarray(np.repeat(labels[..., None], 3, -1)).save(tmp_path / "rgb_mask.png")
    Image.fromarray(labels[::2, ::2]).save(tmp_path / "half_mask.png")
    Image.fromarray(labels[:, :60]).save(tmp_path / "other_mask.png")
    Image.fromarray(np.dstack([labels, labels])[..., :2], "LA").save(tmp_path / "la_mask.png")
    image = str(tmp_path / "im.png")
    for name in ("rgb_mask.png", "la_mask.png"):
        np.testing.assert_array_equal(data.FileListSource([image], mask_paths=[str(tmp_path / name)])[0].mask, labels)
    half = data.FileListSource([image], mask_paths=[str(tmp_path / "half_mask.png")])[0].mask
    assert half.shape == (60, 80) and np.mean(half == labels) > 0.97
    with pytest.raises(data.UnreadableImageError, match=r"other_mask.png.*60 x 60 \(h x w\), its image 60 x 80"):
        data.FileListSource([image], mask_paths=[str(tmp_path / "other_mask.png")])[0]
    colour = np.asarray(rgb)
    Image.fromarray(colour).save(tmp_path / "colour_mask.png")
    with pytest.raises(data.UnreadableImageError, match="colour_mask.png.*single-channel"):
        data.FileListSource([image], mask_paths=[str(tmp_path / "colour_mask.png")])[0]
    Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8)).save(tmp_path / "ignore_mask.png")
    with pytest.raises(data.UnreadableImageError, match="ignore_mask.png: label 255 is out of range 0..150"):
        data.FileListSource([image], mask_paths=[str(tmp_path / "ignore_mask.png")], max_label=150)[0]
