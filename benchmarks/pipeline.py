"""The whole pipeline (images -> harvest -> shuffle buffer -> SAE step) in tokens per second,
three ways in one process:

    (a) from JPEG files on disk (decoded and resized by the host threads),
    (b) from the same images, already decoded, in memory,
    (c) the harvest alone (forward passes on images already on the device),

plus (d) the SAE step alone on a batch already on the device.

    python -m benchmarks.pipeline            # a ViT-S/16-sized random CLIP, 224 px
    python -m benchmarks.pipeline --small    # a quick check
    python -m benchmarks.pipeline --max-threads 16   # decode rows up to 16 threads (default 8; 4 with --small)
    python -m benchmarks.pipeline --paper    # on an accelerator: ViT-B/16 size, 24,576 latents, batch 16,384

Targets (ratios, measured in the same run):
- (a) / (b) >= 0.9: the host's decoding is hidden behind the device's work.
- (b) / device-only >= 0.9, where device-only = 1 / (1/(c) + 1/(d)) is the rate the device
  reaches when it only harvests and steps: the stream adds little of its own.

Then the decode path of real data sets: photograph-like JPEGs (quality 90; pixel noise brings
them to about 2.5 bits per pixel, as photographs) of 500 x 375 (CUB / ImageNet-like; a quarter
of them portrait, 375 x 500) and of 2,048 x 1,536 (large photographs, as among ADE20K's), read
by `ImageFolderSource` and resized / centre-cropped on the host to the model's size (224 px;
64 under --small). For each size:

- files / (b): the whole pipeline fed from these files, over (b);
- decode, T: the images/s that `data.batches(..., num_threads=T)` alone delivers,
  for T = 1, 2, 4, ... up to --max-threads, over the images/s the device consumes
  (device-only tokens/s / patches per image);
- threads needed = ceil(consumed / decode rate at T = 1): the decode threads, hence CPU cores,
  that keep the step fed; the machine can if it has that many cores and some T reaches
  decode / consumed >= 1.

Targets for these rows: files / (b) >= 0.9 where the threads needed are available (on a machine
with more cores than that beside the accelerator), and decode / consumed growing about
linearly in T up to the number of cores. The files are read from the page cache (they were just
written), so the rows measure decoding, not the disk or a network file system.

On a CPU-only machine the "device" is the same cores that decode, so (a) / (b) and files / (b)
measure how much the decoding costs there rather than whether it is hidden, and the threads
needed compete with the step for the cores.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax.core.sweep_step import jit_sweep_step
from saejax import activations, backbones, data, loop, sae, sharding, stream, train
from saejax.core.losses import Objective


PHOTO_SIZES = {  # the (width, height)s that each row's files cycle through
    "500x375": [(500, 375)] * 3 + [(375, 500)],  # CUB / ImageNet-like, a quarter portrait
    "2048x1536": [(2048, 1536)],  # large photographs (ADE20K / COCO upper sizes)
}


def write_jpegs(folder: str, n: int, sizes, noise: float = 0.0, seed: int = 0) -> float:
    """`n` JPEGs (quality 90) of smooth random content upsampled, which decode like photographs;
    their (width, height) cycle through `sizes`. `noise` (the std of pixel noise added) gives
    them a photograph's entropy too. Returns the bits per pixel written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bits = pixels = 0
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        if noise:
            noisy = np.asarray(image) + noise * rng.standard_normal((height, width, 3), dtype=np.float32)
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        path = os.path.join(folder, f"{i:05d}.jpg")
        image.save(path, quality=90)
        bits, pixels = bits + 8 * os.path.getsize(path), pixels + width * height
    return bits / pixels


def decode_rate(source, batch_size: int, threads: int, seconds: float) -> float:
    """Images per second that `threads` grain threads read, decode and resize from `source`,
    over whole batches for at least `seconds` (a fixed time suits small and large images alike)."""
    it = data.batches(source, batch_size, seed=0, num_threads=threads)
    next(it)  # starts the threads; the consumer is faster, so nothing piles up ahead of it
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += len(next(it).ids)
    rate = images / (time.perf_counter() - start)
    it.close()
    return rate


def run_stream(bb, params, source, trainer, hparams, mesh, args, steps: int) -> float:
    """Tokens per second of `steps` training steps fed by an ActivationStream (after warm-up)."""
    acts = stream.ActivationStream(bb, params, source, layers=(args.layer,), batch_size=args.batch_size,
                                   image_batch_size=args.image_batch_size, buffer_tokens=args.buffer_tokens,
                                   mesh=mesh, key=jax.random.key(0))
    states = {args.layer: trainer.init_sweep_sharded(jax.random.key(1), hparams, mesh)}
    warm = acts.batches_per_fill  # compiles, and the first fill, which is built before its first batch
    states = loop.fit(trainer, states, acts, steps=warm, mesh=mesh, handle_signals=False)
    jax.block_until_ready(states)
    start = time.perf_counter()  # fit's jitted steps are cached: the second call does not compile
    states = loop.fit(trainer, states, acts, steps=warm + steps, start_step=warm, mesh=mesh, handle_signals=False)
    jax.block_until_ready(states)
    seconds = time.perf_counter() - start
    acts.close()
    return steps * args.batch_size / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model and few steps")
    parser.add_argument("--max-threads", type=int, help="most decode threads tried (default 8; 4 with --small)")
    parser.add_argument("--paper", action="store_true", help="the paper's sizes on an accelerator: a ViT-B/16-sized "
                        "random CLIP, a 24,576-latent ReLU SAE, batches of 16,384 (no photo rows)")
    args = parser.parse_args()
    if args.paper:
        sizes = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=224, patch_size=16)
        args.image_batch_size, args.batch_size, args.buffer_tokens, args.layer, steps, n_images = 256, 16384, 2**18, 10, 30, 1024
        photo_files, photo_steps, decode_seconds, max_threads = {}, 0, 0.0, 8
    elif args.small:
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
                     patch_size=16)
        args.image_batch_size, args.batch_size, args.buffer_tokens, args.layer, steps, n_images = 16, 256, 1024, 0, 48, 256
        photo_files, photo_steps, decode_seconds, max_threads = {"500x375": 32, "2048x1536": 16}, 16, 1.0, 4
    else:
        sizes = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16)
        args.image_batch_size, args.batch_size, args.buffer_tokens, args.layer, steps, n_images = 32, 1024, 2**14, 4, 60, 1024
        photo_files, photo_steps, decode_seconds, max_threads = {"500x375": 128, "2048x1536": 32}, 60, 3.0, 8
    max_threads = args.max_threads or max_threads
    work = tempfile.mkdtemp(prefix="saejax-pipeline-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the large photos take ~1 MB each
    bb, params = backbones.load(backbones.create_random("clip", os.path.join(work, "clip"), seed=0, **sizes),
                                cache_dir=False)
    folder = os.path.join(work, "jpeg")
    os.makedirs(folder)
    write_jpegs(folder, n_images, [(sizes["image_size"] + sizes["image_size"] // 7,) * 2])
    on_disk = data.ImageFolderSource(folder, image_size=sizes["image_size"])
    in_memory = data.ArraySource(np.stack([on_disk[i].image for i in range(len(on_disk))]))
    mesh = sharding.make_mesh()
    trainer = (train.make_trainer(sae.relu(bb.d_model, 32 * bb.d_model)) if args.paper else  # the paper's recipe
               train.make_trainer(sae.topk(bb.d_model, 8 * bb.d_model, k=32), objective=Objective(sparsity="none")))
    hparams = train.Hparams.grid([1e-3])

    rate_disk = run_stream(bb, params, on_disk, trainer, hparams, mesh, args, steps)
    rate_memory = run_stream(bb, params, in_memory, trainer, hparams, mesh, args, steps)

    harvest = activations.make_harvest(bb, (args.layer,), mesh=mesh)
    images = jax.device_put(bb.preprocess(in_memory.images[:args.image_batch_size]), sharding.batch_sharding(mesh, 4))
    ids = jnp.arange(args.image_batch_size, dtype=jnp.int32)
    jax.block_until_ready(harvest(params, images, ids))
    passes = max(4, steps * args.batch_size // (args.image_batch_size * bb.layout.n_patches))
    start = time.perf_counter()
    for _ in range(passes):
        out = harvest(params, images, ids)
    jax.block_until_ready(out)
    rate_harvest = passes * args.image_batch_size * bb.layout.n_patches / (time.perf_counter() - start)

    states = trainer.init_sweep_sharded(jax.random.key(1), hparams, mesh)
    step, _ = jit_sweep_step(trainer, states, mesh)
    x = jax.device_put(jax.random.normal(jax.random.key(2), (args.batch_size, bb.d_model)),
                       sharding.batch_sharding(mesh, 2))
    states, _ = step(states, x)
    jax.block_until_ready(states)
    start = time.perf_counter()
    for _ in range(steps):
        states, _ = step(states, x)
    jax.block_until_ready(states)
    rate_step = steps * args.batch_size / (time.perf_counter() - start)
    device_only = 1 / (1 / rate_harvest + 1 / rate_step)

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; ViT d={bb.d_model}, {bb.n_layers} blocks, "
          f"{bb.layout.n_patches} patches; SAE {trainer.ae.d_sae} latents; batch {args.batch_size}")
    print(f"(a) JPEG files on disk       {rate_disk:12,.0f} tokens/s")
    print(f"(b) decoded images in memory {rate_memory:12,.0f} tokens/s")
    print(f"(c) harvest alone            {rate_harvest:12,.0f} tokens/s")
    print(f"(d) SAE step alone           {rate_step:12,.0f} tokens/s")
    print(f"(a) / (b)           = {rate_disk / rate_memory:.3f}   (target >= 0.9: host decoding hidden)")
    print(f"(b) / device-only   = {rate_memory / device_only:.3f}   (device-only = 1 / (1/(c) + 1/(d)) "
          f"= {device_only:,.0f} tokens/s)")
    # The share of the shorter stage hidden behind the longer one: 1 when the stream overlaps
    # harvest and step fully, 0 when it runs them one after the other. paper_scale --overlap takes it.
    t_harvest, t_step, t_both = 1 / rate_harvest, 1 / rate_step, 1 / rate_memory
    print(f"overlap             = {(t_harvest + t_step - t_both) / min(t_harvest, t_step):.3f}   "
          f"(python -m benchmarks.paper_scale --overlap=<this> predicts the sweep with it)")

    consumed = device_only / bb.layout.n_patches  # images/s
    cores = len(os.sched_getaffinity(0))
    shared = ", shared with the CPU 'device'" if jax.devices()[0].platform == "cpu" else ""
    print(f"photo-like JPEGs resized to {sizes['image_size']} px on the host; the device-only path consumes "
          f"{consumed:,.1f} images/s; {cores} cores here{shared}")
    threads = [2**i for i in range(max_threads.bit_length())]  # 1, 2, 4, ... <= max_threads
    for name, photo_sizes in PHOTO_SIZES.items():
        if name not in photo_files:
            continue
        photo_folder = os.path.join(work, name)
        os.makedirs(photo_folder)
        bits_per_pixel = write_jpegs(photo_folder, photo_files[name], photo_sizes, noise=6.0, seed=1)  # ~2.5 bits/px
        photos = data.ImageFolderSource(photo_folder, image_size=sizes["image_size"])
        rate_photos = run_stream(bb, params, photos, trainer, hparams, mesh, args, photo_steps)
        decoded = {t: decode_rate(photos, args.image_batch_size, t, decode_seconds) for t in threads}
        needed = math.ceil(consumed / decoded[1])
        fed = needed <= cores and max(decoded.values()) >= consumed
        print(f"{name} ({len(photos)} files, {bits_per_pixel:.1f} bits/pixel)")
        print(f"  files / (b)          = {rate_photos / rate_memory:.3f}   (target >= 0.9 with the threads needed "
              f"available; {rate_photos:,.0f} tokens/s)")
        for t, rate in decoded.items():
            print(f"  decode, T = {t:<2d}     = {rate / consumed:.3f} x consumed   ({rate:,.1f} images/s, "
                  f"{rate / t:,.1f} per thread)")
        print(f"  threads needed = ceil(consumed / 1-thread decode) = {needed}: this machine "
              f"{'keeps' if fed else 'cannot keep'} the step fed")


if __name__ == "__main__":
    main()
