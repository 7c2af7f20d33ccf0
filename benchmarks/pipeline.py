"""The whole pipeline (images -> harvest -> shuffle buffer -> SAE step) in tokens per second,
three ways in one process:

    (a) from JPEG files on disk (decoded and resized by the host threads),
    (b) from the same images, already decoded, in memory,
    (c) the harvest alone (forward passes on images already on the device),

plus (d) the SAE step alone on a batch already on the device.

    python -m benchmarks.pipeline            # a ViT-S/16-sized random CLIP, 224 px
    python -m benchmarks.pipeline --small    # a quick check

Targets (ratios, measured in the same run):
- (a) / (b) >= 0.9: the host's decoding is hidden behind the device's work.
- (b) / device-only >= 0.9, where device-only = 1 / (1/(c) + 1/(d)) is the rate the device
  reaches when it only harvests and steps: the stream adds little of its own.

On a CPU-only machine the "device" is the same cores that decode, so (a) / (b) measures how
much the decoding costs there rather than whether it is hidden.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax import activations, backbones, data, loop, sae, sharding, stream, train
from saejax.losses import Objective


def write_jpegs(folder: str, n: int, size: int, seed: int = 0) -> None:
    """`n` smooth random JPEGs of size x size (photographs compress and decode like these)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{i:05d}.jpg"),
                                                                        quality=90)


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
    args = parser.parse_args()
    if args.small:
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
                     patch_size=16)
        args.image_batch_size, args.batch_size, args.buffer_tokens, args.layer, steps, n_images = 16, 256, 1024, 0, 48, 256
    else:
        sizes = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16)
        args.image_batch_size, args.batch_size, args.buffer_tokens, args.layer, steps, n_images = 32, 1024, 2**14, 4, 60, 1024
    work = tempfile.mkdtemp(prefix="saejax-pipeline-")
    bb, params = backbones.load(backbones.create_random("clip", os.path.join(work, "clip"), seed=0, **sizes),
                                cache_dir=False)
    folder = os.path.join(work, "jpeg")
    os.makedirs(folder)
    write_jpegs(folder, n_images, sizes["image_size"] + sizes["image_size"] // 7)
    on_disk = data.ImageFolderSource(folder, image_size=sizes["image_size"])
    in_memory = data.ArraySource(np.stack([on_disk[i].image for i in range(len(on_disk))]))
    mesh = sharding.make_mesh()
    trainer = train.make_trainer(sae.topk(bb.d_model, 8 * bb.d_model, k=32), objective=Objective(sparsity="none"))
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
    step, _ = trainer.jit_sweep(states, mesh)
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


if __name__ == "__main__":
    main()
