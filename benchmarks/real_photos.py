"""The paper binaries on data trees made of real photos, with the sizes, aspect ratios, pixel
formats and broken files of real data sets. Not a test: it needs two things the project does
not depend on, and stops saying which is missing.

    python -m benchmarks.real_photos --workdir=DIR            # build the trees, run everything
    python -m benchmarks.real_photos --workdir=DIR --only=cub_edit,semprobe   # rerun some, same trees
    python -m benchmarks.real_photos --workdir=DIR --dinov2   # also cub_edit on a real DINOv2 ViT-S/14

Needs:
- scikit-image (`pip install scikit-image`): `skimage.data` ships the real photos (astronaut,
  cat, chelsea, coffee, rocket, camera, page, text, hubble_deep_field, retina, motorcycle, ...,
  and 200 LFW faces);
- Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`): 70,000 28x28
  greyscale product photos, 10 classes, gzip'd IDX in /usr/share/datasets/fashion-mnist.
- `--dinov2` also needs ../shared/tools/real_dinov2.sh (beside the checkout; it fetches a wheel
  from PyPI), which it runs when DIR/dinov2 is missing.

Writes under DIR (kept, and reused unless `--rebuild`):
- folder/<class>/: Fashion-MNIST (PNG, and JPEGs upscaled 2-8x) and one class per photo;
- cub/: CUB-200-2011's layout (images/, images.txt, ..., soft segmentations/, a few of them
  1 px off their image's size, as in CUB);
- ade20k/: ADEChallengeData2016's layout, annotations 0..150 from a colour quantisation;
- concepts/: positives/<concept>/ and negatives/.
Photos are cropped and rescaled to 500x375, 375x500, 500x333, 640x480, 70x49, 2048x1536, ...
and saved as RGB, greyscale (L), CMYK and progressive JPEGs, RGBA and palette PNGs, WebP and a
PNG named .jpg; every tree also holds one truncated JPEG and one zero-byte .jpg.

Then runs train_sae, browse, cub_edit, ade20k_edit and semprobe (their `:small` configs, tiny
random models, pointed at the trees with `data.skip_unreadable=True`) as subprocesses and
prints a table (binary, tree, images, exit code, seconds, images skipped when the output says,
and the last line of any error); DIR/real_photos.json holds the same, DIR/logs/<run>.log each
run's output. `--dinov2` names the model with `--config.backbone.name`, which takes the place
of the `:small` configs' random backbone.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DINOV2_TOOL = os.path.join(REPO, "..", "shared", "tools", "real_dinov2.sh")  # the checkout's shared/ beside it
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text")
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (640, 480), (480, 640), (70, 49), (49, 70), (400, 400),
         (300, 200), (1024, 683), (120, 160))  # (width, height)
JPEG_KINDS = ("rgb", "l", "progressive", "cmyk")
ALL_KINDS = JPEG_KINDS + ("rgba_png", "p_png", "webp", "png_named_jpg")
CUB_CLASSES = ("Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani", "Crested_Auklet",
               "Least_Auklet", "Parakeet_Auklet", "Rhinoceros_Auklet", "Brewer_Blackbird", "Red_winged_Blackbird",
               "Rusty_Blackbird", "Yellow_headed_Blackbird")
ADE_LABELS = (0, 1, 13, 87, 150)  # per colour cluster, darkest first: 0 ("other") and labels across 1..150
CONCEPTS = {"cat": ("cat", "chelsea"), "astronaut": ("astronaut",), "rocket": ("rocket",), "text": ("page", "text"),
            "motorcycle": ("motorcycle_left", "motorcycle_right")}
def require():
    """skimage and the Fashion-MNIST files, or exit naming what to install."""
    missing = []
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        missing.append("scikit-image: pip install scikit-image (into this venv)")
    if not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
        missing.append("Fashion-MNIST: apt-get install dataset-fashion-mnist")
    if missing:
        sys.exit("benchmarks.real_photos needs:\n  " + "\n  ".join(missing))


def load_photos():
    """name -> PIL image: every real photo in skimage.data (RGB or L, 102x102 to 1411x1411)."""
    from PIL import Image
    from skimage import data

    photos = {name: getattr(data, name)() for name in PHOTOS}
    photos["motorcycle_left"], photos["motorcycle_right"], _ = data.stereo_motorcycle()
    faces = [(f * 255).round().astype(np.uint8) for f in data.lfw_subset()]
    return {k: Image.fromarray(v) for k, v in photos.items()}, [Image.fromarray(f) for f in faces]


def load_fashion(per_class):
    """[(PIL L 28x28, label)], the first `per_class` of each class of the training set."""
    from PIL import Image

    with gzip.open(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    return [(Image.fromarray(images[i]), int(labels[i])) for i in keep]


def view(photo, size, rng):
    """A random crop of `photo` with `size`'s aspect ratio (70-100% of the largest), resized to it."""
    from PIL import Image

    w, h = size
    scale = min(photo.width / w, photo.height / h) * rng.uniform(0.7, 1.0)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    x, y = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    return photo.resize((w, h), Image.LANCZOS, box=(x, y, x + cw, y + ch))


def save(image, stem, kind):
    """`image` saved as `kind` (see ALL_KINDS) at `stem` + the usual extension; the path."""
    from PIL import Image

    path = stem + {"rgba_png": ".png", "p_png": ".png", "webp": ".webp"}.get(kind, ".jpg")
    rgb = image if image.mode == "L" and kind == "rgb" else image.convert("RGB")
    if kind in ("rgb", "l", "cmyk"):
        rgb.convert({"rgb": rgb.mode, "l": "L", "cmyk": "CMYK"}[kind]).save(path, quality=90)
    elif kind == "progressive":
        rgb.save(path, quality=85, progressive=True, optimize=True)
    elif kind == "rgba_png":
        alpha = np.linspace(255, 0, rgb.width, dtype=np.uint8)[None].repeat(rgb.height, 0)
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(path)
    elif kind == "p_png":
        rgb.quantize(64).save(path)
    elif kind == "webp":
        rgb.save(path, "WEBP", quality=80)
    elif kind == "png_named_jpg":  # ImageNet has one of these
        rgb.save(path, "PNG")
    return path


def write_broken(path, photo, rng):
    """At `path` (.jpg): a JPEG cut to 40% of its bytes when `photo` is given, else zero bytes."""
    blob = b""
    if photo is not None:
        blob = open(save(view(photo, (500, 375), rng), path[:-4], "rgb"), "rb").read()
    open(path, "wb").write(blob[: len(blob) * 2 // 5])


def views(photos, names, n, kinds, rng, offset=0):
    """`n` views of each named photo, cycling through the sizes and `kinds`: [(name, image, kind)]."""
    out = []
    for p, name in enumerate(names):
        for i in range(n):
            k = offset + p * n + i
            out.append((name, view(photos[name], SIZES[k % len(SIZES)], rng), kinds[k % len(kinds)]))
    return out


def build_folder(root, photos, faces, rng, per_class):
    for j, (image, label) in enumerate(load_fashion(per_class)):
        folder = os.path.join(root, f"fashion_{FASHION_CLASSES[label]}")
        os.makedirs(folder, exist_ok=True)
        if j % 3:
            image.save(os.path.join(folder, f"{j:05d}.png"))
        else:
            s = (2, 3, 8)[j // 3 % 3]
            image.resize((28 * s, 28 * s), resample=3).save(os.path.join(folder, f"{j:05d}.jpg"), quality=90)
    for i, (name, image, kind) in enumerate(views(photos, list(photos), 8, ALL_KINDS, rng)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        save(image, os.path.join(root, name, f"{name}_{i:03d}"), kind)
    save(view(photos["hubble_deep_field"], (2048, 1536), rng), os.path.join(root, "hubble_deep_field", "large"), "rgb")
    os.makedirs(os.path.join(root, "lfw_faces"), exist_ok=True)
    for i, face in enumerate(faces[:40]):
        face = face if i % 2 else face.resize((100, 100), resample=3)
        save(face, os.path.join(root, "lfw_faces", f"face_{i:03d}"), ("rgb", "l", "p_png", "webp")[i % 4])
    write_broken(os.path.join(root, "astronaut", "astronaut_truncated.jpg"), photos["astronaut"], rng)
    write_broken(os.path.join(root, "astronaut", "astronaut_empty.jpg"), None, rng)


def soft_mask(image, blur):
    """A crude foreground (far from the border's colour), blurred: L, 0..255."""
    from PIL import Image, ImageFilter

    a = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    d = np.linalg.norm(a - np.median(border, 0), axis=-1)
    hard = Image.fromarray(((d > np.percentile(d, 55)) * 255).astype(np.uint8))
    return hard.filter(ImageFilter.GaussianBlur(blur))


def build_cub(root, photos, rng, per_class=8):
    from PIL import Image

    names = [n for n in photos if n not in ("brick", "grass", "gravel")][: len(CUB_CLASSES)]
    rows = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    items = [(i // per_class, image, kind, None)
             for i, (_, image, kind) in enumerate(views(photos, names, per_class, JPEG_KINDS, rng))]
    items += [(0, None, None, "truncated"), (0, None, None, "empty")]
    counts = {}
    for image_id, (c, image, kind, bad) in enumerate(items, start=1):
        folder = f"{c + 1:03d}.{CUB_CLASSES[c]}"
        if folder not in counts:
            rows["classes.txt"].append(f"{c + 1} {folder}")
        counts[folder] = counts.get(folder, 0) + 1
        title = "_".join(w.capitalize() for w in CUB_CLASSES[c].split("_"))
        stem = f"{title}_{counts[folder]:04d}_{int(rng.integers(1, 800_000))}"
        for sub in ("images", "segmentations"):
            os.makedirs(os.path.join(root, sub, folder), exist_ok=True)
        if bad:
            write_broken(os.path.join(root, "images", folder, stem + ".jpg"),
                         photos[names[0]] if bad == "truncated" else None, rng)
            mask = Image.new("L", (500, 375))
        else:
            save(image, os.path.join(root, "images", folder, stem), kind)
            mask = soft_mask(image, max(1.0, min(image.size) / 60))
            if image_id % 29 == 0:  # CUB has a few segmentations a pixel off their image's size
                mask = mask.resize((mask.width + 1, mask.height - 1))
        mask.save(os.path.join(root, "segmentations", folder, stem + ".png"))
        rows["images.txt"].append(f"{image_id} {folder}/{stem}.jpg")
        rows["image_class_labels.txt"].append(f"{image_id} {c + 1}")
        rows["train_test_split.txt"].append(f"{image_id} {int(bad == 'truncated' or (bad is None and image_id % 2))}")
    for name, lines in rows.items():
        open(os.path.join(root, name), "w").write("\n".join(lines) + "\n")
    return len(items)


def build_ade20k(root, photos, rng, n_train=20, n_val=10):
    from PIL import Image

    names = list(photos)
    count = 0
    for split, n, prefix in (("training", n_train, "train"), ("validation", n_val, "val")):
        for sub in ("images", "annotations"):
            os.makedirs(os.path.join(root, sub, split), exist_ok=True)
        for i in range(n):
            image = view(photos[names[(i * 7 + len(split)) % len(names)]], SIZES[i % len(SIZES)], rng)
            stem = f"ADE_{prefix}_{i + 1:08d}"
            save(image, os.path.join(root, "images", split, stem), JPEG_KINDS[i % len(JPEG_KINDS)])
            quantised = image.convert("RGB").quantize(len(ADE_LABELS))
            palette = np.asarray(quantised.getpalette()[: 3 * len(ADE_LABELS)], np.float32).reshape(-1, 3)
            rank = np.argsort(np.argsort(palette.sum(1)))  # cluster -> brightness rank
            labels = np.asarray(ADE_LABELS, np.uint8)[rank[np.asarray(quantised)]]
            Image.fromarray(labels).save(os.path.join(root, "annotations", split, stem + ".png"))
            count += 1
        stem = f"ADE_{prefix}_{n + 1:08d}"  # truncated in training, empty in validation
        write_broken(os.path.join(root, "images", split, stem + ".jpg"),
                     photos["coffee"] if split == "training" else None, rng)
        Image.new("L", (500, 375)).save(os.path.join(root, "annotations", split, stem + ".png"))
        count += 1
    return count


def build_concepts(root, photos, faces, rng, per_concept=20, negatives=20):
    for concept, names in CONCEPTS.items():
        folder = os.path.join(root, "positives", concept)
        os.makedirs(folder, exist_ok=True)
        for i, (name, image, kind) in enumerate(views(photos, names, per_concept // len(names), ALL_KINDS, rng)):
            save(image, os.path.join(folder, f"{name}_{i:03d}"), kind)
    folder = os.path.join(root, "positives", "face")  # LFW's 25x25 crops, some upscaled
    os.makedirs(folder, exist_ok=True)
    for i, face in enumerate(faces[100:100 + per_concept]):
        save(face if i % 2 else face.resize((90, 90), resample=3), os.path.join(folder, f"face_{i:03d}"),
             ALL_KINDS[i % len(ALL_KINDS)])
    folder = os.path.join(root, "negatives")
    os.makedirs(folder)
    others = [n for n in photos if not any(n in names for names in CONCEPTS.values())]
    for i, (name, image, kind) in enumerate(views(photos, others, 2, ALL_KINDS, rng)[:negatives]):
        save(image, os.path.join(folder, f"{name}_{i:03d}"), kind)
    write_broken(os.path.join(folder, "negative_truncated.jpg"), photos["brick"], rng)
    write_broken(os.path.join(folder, "negative_empty.jpg"), None, rng)


def count_images(root):
    from saejax.data import IMAGE_EXTENSIONS

    return sum(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, fs in os.walk(root) for f in fs)


def build(workdir, rebuild, per_class):
    trees = {t: os.path.join(workdir, t) for t in ("folder", "cub", "ade20k", "concepts")}
    if rebuild or not all(os.path.isdir(p) for p in trees.values()):
        photos, faces = load_photos()
        builders = {"folder": lambda root, rng: build_folder(root, photos, faces, rng, per_class),
                    "cub": lambda root, rng: build_cub(root, photos, rng),
                    "ade20k": lambda root, rng: build_ade20k(root, photos, rng),
                    "concepts": lambda root, rng: build_concepts(root, photos, faces, rng)}
        for seed, (name, path) in enumerate(trees.items()):
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            builders[name](path, np.random.default_rng(seed))
    counts = {name: count_images(os.path.join(path, "images") if name in ("cub", "ade20k") else path)
              for name, path in trees.items()}
    return trees, counts


def commands(workdir, trees, counts, dinov2):
    """(run name, binary, tree, flags)."""
    skip = "--config.data.skip_unreadable=True"
    folder = ["--config.data.kind=folder", f"--config.data.validation_dir={trees['folder']}", skip]
    tokens = -(-counts["folder"] * 16 // 256) * 256 + 256 * 8  # an epoch of 16-patch images (32 px), and more
    runs = [
        ("train_sae", "train_sae", "folder",
         ["--config=clip_vit_b16:small", *folder, f"--config.data.train_dir={trees['folder']}",
          "--config.data.image_size=32", f"--config.total_tokens={tokens}"]),
        ("browse", "browse", "folder", ["--config=browse:small", *folder, "--config.data.image_size=40",
                                        f"--config.images={counts['folder']}"]),
        ("cub_edit", "cub_edit", "cub", ["--config=cub:small",
                                         f"--config.data.root={trees['cub']}", skip]),
        ("ade20k_edit", "ade20k_edit", "ade20k",
         ["--config=ade20k:small", f"--config.data.root={trees['ade20k']}",
          "--config.probe_images=21", "--config.eval_images=11", skip]),
        ("semprobe", "semprobe", "concepts", ["--config=semprobe:small",
                                              f"--config.data.root={trees['concepts']}", skip]),
    ]
    if dinov2:
        model = os.path.join(workdir, "dinov2")
        runs.append(("cub_edit_dinov2", "cub_edit", "cub",
                     ["--config=cub:small", f"--config.data.root={trees['cub']}", skip,
                      f"--config.backbone.name={model}", "--config.layer=10",
                      "--config.data.image_size=224", "--config.batch_size=16", "--config.probe.epochs=100",
                      "--config.stats_images=48", "--config.image=0", "--config.patches=(100,101,116,117)"]))
    return runs


def json_skips(out):
    """The largest `skipped_images` count in the run's JSON outputs (`{"count"}`, or one per split), or None."""
    def count(v):
        return v if isinstance(v, int) else v["count"] if "count" in v else sum(count(x) for x in v.values())

    counts = []
    for name in os.listdir(out) if os.path.isdir(out) else ():
        if name.endswith(".json"):
            doc = json.load(open(os.path.join(out, name)))
            if isinstance(doc, dict) and isinstance(doc.get("skipped_images"), (int, dict)):
                counts.append(count(doc["skipped_images"]))
    return max(counts, default=None)


def run_one(workdir, name, binary, tree, flags, images, timeout):
    out = os.path.join(workdir, "runs", name)
    shutil.rmtree(out, ignore_errors=True)
    log = os.path.join(workdir, "logs", name + ".log")
    cmd = [sys.executable, "-m", f"experiments.{binary}", *flags, f"--workdir={out}"]
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    text = open(log).read()
    pattern = r"skipped (\d+) unreadable|(\d+) unreadable (?:images? )?skipped"  # train_sae's, browse's
    found = [int(a or b) for a, b in re.findall(pattern, text)]
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
    row = {"run": name, "binary": binary, "tree": tree, "images": images, "exit": code,
           "seconds": round(seconds, 1), "skipped": found[-1] if found else json_skips(out),
           "error": (errors or lines or [""])[-1] if code != 0 else "", "log": log, "command": " ".join(cmd)}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--rebuild", action="store_true", help="rewrite the trees even if they exist")
    parser.add_argument("--per_class", type=int, default=150, help="Fashion-MNIST images per class")
    parser.add_argument("--dinov2", action="store_true", help="also cub_edit on a real DINOv2 ViT-S/14")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    args = parser.parse_args()
    require()
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    t0 = time.perf_counter()
    trees, counts = build(workdir, args.rebuild, args.per_class)
    print(f"trees in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{k} {v} images" for k, v in counts.items()),
          flush=True)
    if args.dinov2 and not os.path.isdir(os.path.join(workdir, "dinov2")):
        subprocess.run(["bash", DINOV2_TOOL, os.path.join(workdir, "dinov2")], check=True)
    only = set(filter(None, args.only.split(",")))
    results_path = os.path.join(workdir, "real_photos.json")
    rows = {r["run"]: r for r in json.load(open(results_path))} if only and os.path.isfile(results_path) else {}
    for name, binary, tree, flags in commands(workdir, trees, counts, args.dinov2):
        if only and name not in only:
            continue
        rows[name] = row = run_one(workdir, name, binary, tree, flags, counts[tree], args.timeout)
        print(f"{name}: exit {row['exit']} in {row['seconds']} s {row['error']}", flush=True)
    rows = list(rows.values())
    json.dump(rows, open(results_path, "w"), indent=2)
    print(f"\n{'binary':<16}{'tree':<10}{'images':>7}{'exit':>8}{'seconds':>9}{'skipped':>9}  error")
    for r in rows:
        skipped = "-" if r["skipped"] is None else r["skipped"]
        print(f"{r['run']:<16}{r['tree']:<10}{r['images']:>7}{r['exit']!s:>8}{r['seconds']:>9.1f}{skipped!s:>9}  "
              + r["error"][:110])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {results_path}")


if __name__ == "__main__":
    main()
