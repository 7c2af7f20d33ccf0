"""Every binary at its full config, compiled without weights: device memory, FLOPs and the
predicted accelerator time, before anyone queues for a pod.

    python -m benchmarks.paper_scale            # a few minutes on 2 CPU cores (compiles only; nothing runs)
    python -m benchmarks.paper_scale --small    # the same table for tiny programs (what the test checks)

Each jitted program a binary runs is lowered with abstract inputs (`jax.ShapeDtypeStruct`,
the real shardings; backbones from `saejax.backbones.abstract`, no weights) and compiled on
8 fake CPU devices, as a `data=8` mesh, a `data=4, model=2` mesh and one device. Per program:
- the per-device peak (`memory_analysis`: arguments + outputs - donated + temporaries) on
  each mesh;
- FLOPs and bytes accessed per call (`cost_analysis`, of the one-device program) and the calls
  the binary makes;
(the notebooks' defaults too: the quickstart's TopK sweep; the other two notebooks run the
browser's and the CUB edit's programs on a few images.)
- the predicted time of the whole binary on an H100, an A100, a TPU v5e-8 and a v4-8: a
  roofline at 50% of their bf16 peak (`benchmarks.peak`) and of their memory bandwidth (the
  larger of FLOPs / compute and bytes / bandwidth), spread over the chips as the data axis
  spreads it, and whether the per-device peak (one device, or one of the `data=8` / `data=4`
  meshes' devices for 8 and 4 chips) fits their memory (less 10%).
Per binary: the host memory each process holds, from the arrays it keeps. The script exits
with an error naming the program or the array when a program does not fit 80 GiB per device
or a process needs more than 64 GB of host memory.

The moonshot: the paper's 3 x 3 CLIP sweep (100M patches, 24,576 latents, harvest on the
fly), from the harvest's and the SAE step's compiled costs: the floor (FLOPs / peak), and the
prediction at 50% of peak with the harvest and the step overlapped as much as `--overlap` says
(the share of the shorter stage hidden behind the longer one, which `benchmarks.pipeline`
measures on the machine it runs on: the stream dispatches the next fill's forward passes
between steps; default 1, fully hidden) and, as an upper bound, one after the other.

These are XLA:CPU's compilations: XLA:GPU and XLA:TPU fuse differently, so memory figures are
estimates within tens of percent, and the times are predictions, not measurements.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 fake devices for the sharded layouts (before jax is imported)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import peak  # noqa: E402
from saejax.core.sweep_step import jit_sweep_step  # noqa: E402
from saejax import backbones, fidelity, sae, sharding, train  # noqa: E402
from saejax.core.losses import Objective  # noqa: E402
from saejax.analysis.site import Site  # noqa: E402
from saejax.data import activations  # noqa: E402

GIB = 1024**3
DEVICE_LIMIT = 80 * GIB  # a program must fit an 80 GiB device
HOST_LIMIT = 64e9  # and a process 64 GB of host memory
# name: (bf16 TFLOP/s per chip, chips, memory per chip in bytes, memory bandwidth per chip in bytes/s;
# datasheet figures: H100 SXM 3.35 TB/s, A100 80 GB 2.0 TB/s, v5e 819 GB/s, v4 1.2 TB/s). A v4-8 is 4 chips.
CHIPS = {"H100": (peak.PEAK_TFLOPS["H100"][0], 1, 80 * GIB, 3.35e12),
         "A100": (peak.PEAK_TFLOPS["A100"][0], 1, 80 * GIB, 2.0e12),
         "v5e-8": (peak.PEAK_TFLOPS["TPU v5 lite"][0], 8, 16 * GIB, 819e9),
         "v4-8": (peak.PEAK_TFLOPS["TPU v4"][0], 4, 32 * GIB, 1.2e12)}
UTILISATION = 0.5



@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program of a binary: `build(mesh) -> (jitted, abstract args)`, called `calls` times."""

    name: str
    build: Callable[[Any], tuple[Callable, tuple]]
    calls: int


@dataclasses.dataclass(frozen=True)
class Binary:
    name: str
    programs: tuple[Program, ...]
    host_arrays: dict[str, float]  # name -> bytes one process keeps


def compiled_costs(jitted, args) -> dict[str, float]:
    """`{peak, arguments, outputs, temporaries, flops, bytes}` of one compiled program, per device."""
    compiled = jitted.lower(*args).compile()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"peak": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
            "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temporaries": m.temp_size_in_bytes, "flops": float(cost.get("flops", 0.0)),
            "bytes": float(cost.get("bytes accessed", 0.0))}


def duration(seconds: float) -> str:
    """A time in the unit that reads best (s, min or h), 8 characters wide."""
    if seconds < 120:
        return f"{seconds:6.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:4.1f} min"
    return f"{seconds / 3600:6.2f} h"


def predicted_seconds(flops_per_call: float, calls: int, chip: str, bytes_per_call: float = 0.0) -> float:
    """The time of `calls` calls over all the chip's chips, a roofline at `UTILISATION`: the
    larger of the FLOPs at that share of the bf16 peak and the bytes accessed at that share of
    the memory bandwidth."""
    tflops, chips, _, bandwidth = CHIPS[chip]
    return calls * max(flops_per_call / (tflops * 1e12), bytes_per_call / bandwidth) / (UTILISATION * chips)


# ------------------------------------------------------------------------------- programs

def sae_step(d_model: int, d_sae: int, batch: int, members: int, name: str, calls: int, k: int | None = None) -> Program:
    """The paper's ReLU + L1 sweep step, or with `k` a TopK + AuxK one (the quickstart's)."""
    if k is None:
        trainer = train.make_trainer(sae.relu(d_model, d_sae, compute_dtype=jnp.bfloat16),
                                     objective=Objective(sparsity="l1"))
    else:
        trainer = train.make_trainer(sae.topk(d_model, d_sae, k=k, compute_dtype=jnp.bfloat16),
                                     objective=Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=64))
    hparams = train.Hparams.grid(learning_rate=[1e-3] * members, sparsity_coeff=[4e-4])

    def build(mesh):
        states = jax.eval_shape(lambda: trainer.init_sweep(jax.random.key(0), hparams))
        step, _ = jit_sweep_step(trainer, states, mesh)
        return step, (states, jax.ShapeDtypeStruct((batch, d_model), jnp.float32))

    return Program(name, build, calls)


def harvest(bb, params, images: int, layer: int, name: str, calls: int) -> Program:
    def build(mesh):
        fn = activations.make_harvest(bb, (layer,), mesh=mesh)
        return fn, (params, jax.ShapeDtypeStruct((images, bb.image_size, bb.image_size, 3), jnp.float32),
                    jax.ShapeDtypeStruct((images,), jnp.int32))

    return Program(name, build, calls)


def site_encode(bb, params, d_sae: int, images: int, layer: int, name: str, calls: int) -> Program:
    """What a Site's encode runs (the browser, semprobe, the probe features): the forward to the
    end with the layer captured, the SAE on the patches."""
    ae = sae.relu(bb.d_model, d_sae, compute_dtype=jnp.bfloat16)
    sae_params = jax.eval_shape(lambda: ae.init(jax.random.key(0)))
    patches = slice(*bb.layout.patches)

    def encode(bp, sp, pixels):
        out = bb.forward(bp, pixels, capture=(layer,))
        resid = out.captured[layer][:, patches]
        codes = ae.encode(sp, resid.reshape(-1, bb.d_model)).reshape(*resid.shape[:2], -1)
        return codes.max(axis=1), out.pooled  # what the collectors reduce it to

    def build(mesh):
        fn = jax.jit(encode, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                           sharding.batch_sharding(mesh, 4)))
        return fn, (params, sae_params, jax.ShapeDtypeStruct((images, bb.image_size, bb.image_size, 3), jnp.float32))

    return Program(name, build, calls)


def spliced(bb, params, d_sae: int, members: int, images: int, layer: int, name: str, calls: int) -> Program:
    ae = sae.relu(bb.d_model, d_sae, compute_dtype=jnp.bfloat16)
    sweep = jax.eval_shape(lambda: jax.vmap(ae.init)(jax.random.split(jax.random.key(0), members)))
    token_index = tuple(int(i) for i in activations.token_indices(bb.layout, "patches"))

    def sums(bp, sp, pixels):
        return fidelity.fidelity_sums(Site(bb, bp, layer=layer, ae=ae, sae_params=sp), pixels, None,
                                      token_index=token_index, head=None, ablation_mean=jnp.zeros(bb.d_model))

    def build(mesh):
        fn = jax.jit(sums, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                         sharding.batch_sharding(mesh, 4)))
        return fn, (params, sweep, jax.ShapeDtypeStruct((images, bb.image_size, bb.image_size, 3), jnp.float32))

    return Program(name, build, calls)


def linear_probe_step(d_model: int, n_classes: int, batch: int, name: str, calls: int) -> Program:
    import optax  # noqa: PLC0415

    tx = optax.adamw(1e-3)

    def step(params, opt_state, x, y):
        def loss(p):
            logits = x @ p["w"] + p["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def build(mesh):
        params = {"w": jax.ShapeDtypeStruct((d_model, n_classes), jnp.float32),
                  "b": jax.ShapeDtypeStruct((n_classes,), jnp.float32)}
        opt_state = jax.eval_shape(tx.init, params)
        fn = jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                         sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)))
        return fn, (params, opt_state, jax.ShapeDtypeStruct((batch, d_model), jnp.float32),
                    jax.ShapeDtypeStruct((batch,), jnp.int32))

    return Program(name, build, calls)


# ------------------------------------------------------------------------------- binaries

def vit_b(family: str, patch: int, small: bool, **extra):
    if small:
        return backbones.abstract(family, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=128, patch_size=8, image_size=32, input_size=32, **extra)
    return backbones.abstract(family, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, patch_size=patch, image_size=224, input_size=224, **extra)


def binaries(small: bool) -> list[Binary]:
    """The paper's binaries at their full configs (`small`: tiny sizes, the same arithmetic)."""
    clip, clip_params = vit_b("clip", 16, small)
    dino, dino_params = vit_b("dinov2_registers", 14, small, num_register_tokens=4)
    layer = 2 if small else 10
    d_sae = 256 if small else 24_576
    batch, images = (256, 16) if small else (16_384, 256)
    tokens = 100_000 if small else 100_000_000
    result = []
    for name, bb, params in (("train_sae clip_vit_b16", clip, clip_params), ("train_sae dinov2_b14", dino, dino_params)):
        patches = bb.layout.n_patches
        steps = tokens // batch
        harvest_calls = -(-(tokens + 2**19) // (images * patches))  # training and the normalisation sample
        eval_images, fidelity_images = (64, 32) if small else (10_000, 512)
        result.append(Binary(name, (
            sae_step(bb.d_model, d_sae, batch, 9, "SAE sweep step (9 members)", steps),
            harvest(bb, params, images, layer, f"harvest ({images} images)", harvest_calls + eval_images // images),
            spliced(bb, params, d_sae, 9, 32, layer, "spliced fidelity (32 images x 9)", fidelity_images // 32)),
            # Two buffer fills of `buffer_tokens` rows live on the devices, not the host; the host keeps
            # the decoded image batches in flight (prefetch 2) and the checkpoint it writes.
            {"prefetched image batches (2 x 256 uint8 224 px)": 2 * images * 224 * 224 * 3,
             "one checkpoint on its way to disk (9 SAEs + Adam)": 9 * 3 * 2 * bb.d_model * d_sae * 4}))
    n_train, n_test = (64, 64) if small else (5_994, 5_794)
    result.append(Binary("cub_edit", (
        site_encode(clip, clip_params, d_sae, 64, layer, "Site.encode (64 images)", -(-(2 * n_train + 2 * n_test) // 64)),
        linear_probe_step(clip.d_model, 200, 512, "CLS probe step (512)", 20 * 7 * -(-n_train // 512))),
        {"pooled CLS features of both splits": (n_train + n_test) * clip.d_model * 4}))
    ade_train, ade_val = (64, 16) if small else (20_210, 2_000)
    ade_patches = dino.layout.n_patches
    # The probe's tokens are encoded again every epoch (20) through a 2**18-token buffer; the edits
    # re-run the validation images once per class and feature (about 8 per class, 150 classes).
    result.append(Binary("ade20k_edit", (
        site_encode(dino, dino_params, d_sae, 64, layer, "Site.encode (64 images)",
                    -(-(20 * ade_train + ade_val) // 64) + 8 * 150 * -(-ade_val // 64)),
        linear_probe_step(dino.d_model, 151, 4096, "patch probe step (4096)", 20 * -(-ade_train * ade_patches // 4096))),
        {"the probe's token buffer (2**18 float32 rows)": 2**18 * dino.d_model * 4,
         "validation images (uint8) and masks, for the edits": ade_val * 224 * 224 * 4,
         "residual sample for random directions": 65_536 * dino.d_model * 4}))
    concept_images = 64 if small else 2_000
    result.append(Binary("semprobe (2 models)", (
        site_encode(clip, clip_params, d_sae, 32, layer, "Site.encode, CLIP (32 images)", -(-concept_images // 32)),
        site_encode(dino, dino_params, d_sae, 32, layer, "Site.encode, DINOv2 (32 images)", -(-concept_images // 32))),
        {"per-image latent sums, both models": 2 * concept_images * d_sae * 4}))
    steps, nb_batch = (20, 256) if small else (2_000, 4_096)  # colab/quickstart.ipynb's defaults
    result.append(Binary("quickstart notebook (TopK k=16, 2 SAEs)", (
        sae_step(clip.d_model, d_sae, nb_batch, 2, "SAE sweep step (2 members)", steps, k=16),
        harvest(clip, clip_params, 16, layer, "harvest (16 images)", -(-steps * nb_batch // (16 * clip.layout.n_patches)))),
        {"the stream's decoded images in flight": 2 * 16 * 224 * 224 * 3}))
    browse_images = 256 if small else 1_281_167  # ImageNet-1k train
    result.append(Binary("browse (ImageNet-1k)", (
        site_encode(clip, clip_params, d_sae, 64, layer, "Site.encode (64 images)", -(-browse_images // 64)),),
        {"top-20 exemplars with maps per latent": d_sae * 20 * (clip.layout.n_patches + 2) * 4,
         "per-latent counts and sums": 4 * d_sae * 8}))
    return result


def meshes():
    devices = jax.devices()
    found = {"1 device": sharding.make_mesh(1, 1, devices[:1])}
    if len(devices) >= 8:
        found.update({"data=8": sharding.make_mesh(8, 1, devices[:8]), "data=4": sharding.make_mesh(4, 1, devices[:4]),
                      "data=4 model=2": sharding.make_mesh(4, 2, devices[:8])})
    return found


def over_limits(binary: str, program_costs: dict[str, dict[str, dict]], host_arrays: dict[str, float]) -> list[str]:
    """What does not fit: a program over `DEVICE_LIMIT` per device on any mesh
    (`{program: {mesh: compiled_costs}}`), an array over `HOST_LIMIT` of host memory."""
    problems = [f"{binary}: {program} needs {c['peak'] / GIB:.1f} GiB per device on {mesh} (arguments "
                f"{c['arguments'] / GIB:.1f}, temporaries {c['temporaries'] / GIB:.1f}; limit {DEVICE_LIMIT / GIB:.0f})"
                for program, by_mesh in program_costs.items() for mesh, c in by_mesh.items() if c["peak"] > DEVICE_LIMIT]
    return problems + [f"{binary}: '{name}' holds {size / 1e9:.1f} GB of host memory (limit {HOST_LIMIT / 1e9:.0f})"
                       for name, size in host_arrays.items() if size > HOST_LIMIT]


def main(argv):
    del argv
    start = time.perf_counter()
    layouts = meshes()
    print(f"paper scale{' (small)' if flags.FLAGS.small else ''}: jax {jax.__version__}, {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices; predictions at {UTILISATION:.0%} of bf16 peak")
    problems, totals = [], {}
    for binary in binaries(flags.FLAGS.small):
        print(f"\n{binary.name}")
        head = (f"  {'program':34s} {'calls':>9s} {'GFLOP/call':>11s} {'GB/call':>8s}"
                + "".join(f" {m + ' GiB':>15s}" for m in layouts) + "".join(f" {c:>9s}" for c in CHIPS))
        print(head)
        seconds = dict.fromkeys(CHIPS, 0.0)
        for program in binary.programs:
            costs = {m: compiled_costs(*program.build(mesh)) for m, mesh in layouts.items()}
            one = costs["1 device"]
            # The data axis spreads the calls over the chips; a chip holds what one device of
            # the `data=<chips>` mesh holds.
            fits = {c: costs.get(f"data={CHIPS[c][1]}", one)["peak"] <= 0.9 * CHIPS[c][2] for c in CHIPS}
            line = (f"  {program.name:34s} {program.calls:9d} {one['flops'] / 1e9:11.1f} {one['bytes'] / 1e9:8.2f}"
                    + "".join(f" {c['peak'] / GIB:15.2f}" for c in costs.values()))
            for chip in CHIPS:
                t = predicted_seconds(one["flops"], program.calls, chip, one["bytes"])
                seconds[chip] += t
                line += f" {duration(t):>9s}" + ("" if fits[chip] else "!")
            print(line, flush=True)
            problems += over_limits(binary.name, {program.name: costs}, {})
            totals.setdefault(binary.name, {})[program.name] = one
        host = sum(binary.host_arrays.values())
        print(f"  {'whole binary':34s} " + " " * 31 + " " * 16 * len(layouts)
              + "".join(f" {duration(seconds[c]):>9s}" for c in CHIPS))
        print(f"  host memory per process: {host / 1e9:.2f} GB (" + "; ".join(
            f"{k} {v / 1e9:.2f} GB" for k, v in binary.host_arrays.items()) + ")")
        problems += over_limits(binary.name, {}, binary.host_arrays)
    moonshot(totals, flags.FLAGS.small, flags.FLAGS.overlap)
    print(f"\n(! = does not fit that chip's memory.) {time.perf_counter() - start:.0f} s")
    if problems:
        raise SystemExit("does not fit:\n  " + "\n  ".join(problems))


def overlapped_seconds(t_step: float, t_harvest: float, overlap: float) -> float:
    """Steps and harvest with `overlap` of the shorter one hidden (1: the longer alone; 0: both)."""
    return t_step + t_harvest - overlap * min(t_step, t_harvest)


def moonshot(totals, small: bool, overlap: float = 1.0) -> None:
    clip = totals["train_sae clip_vit_b16"]
    step = next(v for k, v in clip.items() if k.startswith("SAE sweep"))
    harvest_cost = next(v for k, v in clip.items() if k.startswith("harvest"))
    batch, images, tokens = (256, 16, 100_000) if small else (16_384, 256, 100_000_000)
    steps = tokens // batch
    calls = -(-tokens // (images * vit_b("clip", 16, small)[0].layout.n_patches))  # training alone
    print(f"\nThe paper's 3 x 3 CLIP sweep: {tokens:,} patches, {steps} steps of {batch:,}, {calls} harvest calls "
          f"of {images} images (predicted, not measured)")
    for chip in CHIPS:
        tflops, chips, _, bandwidth = CHIPS[chip]
        t_step = predicted_seconds(step["flops"], steps, chip, step["bytes"])
        t_harvest = predicted_seconds(harvest_cost["flops"], calls, chip, harvest_cost["bytes"])
        floor = (step["flops"] * steps + harvest_cost["flops"] * calls) / (tflops * 1e12 * chips)
        overlapped = overlapped_seconds(t_step, t_harvest, overlap)
        print(f"  {chip:6s} FLOP floor {duration(floor)}; at {UTILISATION:.0%}: {duration(overlapped)} "
              f"with overlap {overlap:g}, {duration(t_step + t_harvest)} one after the other (SAE steps {duration(t_step)}, "
              f"harvest {duration(t_harvest)})")


if __name__ == "__main__":
    # Defined here, not at import, so tests can import this module beside the other benchmarks.
    flags.DEFINE_bool("small", False, "Tiny programs (seconds): the arithmetic, not the paper's numbers.")
    flags.DEFINE_float("overlap", 1.0, "Share of the shorter of harvest and SAE steps hidden behind the longer "
                       "(benchmarks.pipeline prints it as measured on its machine).", upper_bound=1.0)
    app.run(main)
