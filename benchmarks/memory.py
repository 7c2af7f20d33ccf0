"""Peak device memory of one SAE training step at paper scale, from XLA's buffer assignment.

    python -m benchmarks.memory            # about 1 min on 2 CPU cores (compiles only; nothing runs)

Each step is `saejax.core.sweep_step.jit_sweep_step` (the step `train_sae` runs: state donated, batch split over
`data`) compiled for abstract inputs, and `compiled.memory_analysis()` read per device:
peak = arguments + outputs - aliased (donated) + temporaries. Three layouts of 8 devices
(fake CPU devices here, `--xla_force_host_platform_device_count=8`):

* `1 device`: everything on one device (a 1 x 1 mesh).
* `data=8`: the batch split 8 ways, the SAE replicated (what a data-parallel sweep does).
* `model=8`: one SAE's latents split 8 ways (encoder columns, decoder rows, their Adam
  moments), the batch replicated ("latent-sharded").

Cases: the paper's ReLU SAE (D=768, F=24,576, B=16,384) and a 131,072-latent TopK SAE (k=32,
same D and B), each with float32 matmuls and with bf16 matmuls (`SAE.compute_dtype`; the state
stays float32 either way). "fits" compares the peak with 16 GiB and 80 GiB devices less 10%
for the runtime and fragmentation (14.4 and 72 GiB).

These are XLA:CPU's buffer assignments: XLA:GPU and XLA:TPU fuse differently, so treat the
numbers as estimates within a few tens of percent, not as a device's exact figure.

Measured here (2-core dev box, jax 0.10.2, XLA:CPU), `python -m benchmarks.memory` (6 s):

    case                        1 device GiB    data=8 GiB   model=8 GiB  fits (16 GiB / 80 GiB)
    relu F=24576 f32                    6.66          1.32          0.91  yes/yes everywhere
    topk F=131072 k=32 f32             19.42          5.38          3.57  1 device: no/yes; sharded: yes/yes
    relu F=24576 bf16                   5.94          1.27          0.82  yes/yes everywhere
    topk F=131072 k=32 bf16            19.42          5.38          3.57  1 device: no/yes; sharded: yes/yes

and with `--batch=4096`: relu 2.09 / 0.78 / 0.28 GiB (bf16 1.93 / 0.78 / 0.25), topk-131k
7.39 / 3.75 / 1.21 GiB, so the 131k TopK SAE fits one 16 GiB device at B=4,096.

What the numbers say: the [B, F] float32 pre-activations dominate (16,384 x 131,072 x 4 bytes
= 8 GiB for the 131k SAE; 1.5 GiB at paper scale), not the parameters and Adam moments (3 x
0.75 GiB for the 131k SAE). bf16 matmul inputs save only their bf16 copies (0.7 GiB at paper
scale; nothing for TopK, whose selection and sparse gradient read the float32 pre-activations);
the pre-activations stay float32 on purpose (the top-k selection and the loss see accumulated
float32 values). Splitting the batch (`data`) or the latents (`model`) divides the
[B, F] temporaries by 8: either layout fits the 131k SAE on 16 GiB devices at paper batch.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 fake devices for the sharded layouts (before jax is imported)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from saejax.core.sweep_step import jit_sweep_step  # noqa: E402
from saejax import sae as sae_lib  # noqa: E402
from saejax import sharding, train  # noqa: E402
from saejax.core.losses import Objective  # noqa: E402

GIB = 1024**3
DEVICES = {"16 GiB": 16 * GIB * 0.9, "80 GiB": 80 * GIB * 0.9}
_D = flags.DEFINE_integer("d_model", 768, "D.")
_B = flags.DEFINE_integer("batch", 16_384, "B, activations per step.")


def cases(d):
    for dtype in (None, jnp.bfloat16):
        name = "bf16" if dtype else "f32"
        yield (f"relu F=24576 {name}", train.make_trainer(sae_lib.relu(d, 24_576, compute_dtype=dtype)),
               train.Hparams.of(1e-3, 4e-4))
        yield (f"topk F=131072 k=32 {name}",
               train.make_trainer(sae_lib.topk(d, 131_072, k=32, compute_dtype=dtype), objective=Objective(sparsity="none")),
               train.Hparams.of(1e-3))


def peak_bytes(trainer, hparams, mesh, d, b):
    states = jax.eval_shape(lambda: trainer.init_sweep(jax.random.key(0), train.Hparams.stack([hparams])))
    step, _ = jit_sweep_step(trainer, states, mesh)
    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    m = step.lower(states, x).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def main(argv):
    del argv
    d, b = _D.value, _B.value
    devices = jax.devices()
    layouts = {"1 device": sharding.make_mesh(1, 1, devices[:1])}
    if len(devices) >= 8:
        layouts.update({"data=8": sharding.make_mesh(8, 1), "model=8": sharding.make_mesh(1, 8)})
    print(f"peak device memory of one training step, D={d} B={b} | jax {jax.__version__} "
          f"{devices[0].platform} x{len(devices)}")
    head = f"{'case':26s}" + "".join(f" {name + ' GiB':>13s}" for name in layouts) + "  fits (16 GiB / 80 GiB)"
    print(head + "\n" + "-" * len(head))
    t0 = time.perf_counter()
    for name, trainer, hparams in cases(d):
        peaks = {layout: peak_bytes(trainer, hparams, mesh, d, b) for layout, mesh in layouts.items()}
        fits = ", ".join(f"{layout}: {'/'.join('yes' if p <= cap else 'no' for cap in DEVICES.values())}"
                         for layout, p in peaks.items())
        print(f"{name:26s}" + "".join(f" {p / GIB:13.2f}" for p in peaks.values()) + f"  {fits}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
