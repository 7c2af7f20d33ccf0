"""The device mesh and the logical-axis rules, stated once.

Two mesh axes: `data` (batches of images and of activations are split over it) and `model`
(reserved for splitting SAE latents; size 1 unless asked for). Arrays name their axes
logically (`batch`, `latent`, ...) and `RULES` maps those names to mesh axes.

>>> mesh = make_mesh()                       # every device on `data`
>>> images = jax.device_put(images, sharding(mesh, "batch", None, None, None))
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "batch": DATA,  # images, or rows of activations
    "latent": MODEL,  # SAE latents
    "embed": None,  # d_model
    "tokens": None,
    "height": None,
    "width": None,
    "channels": None,
}


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` mesh with Auto axes (the HF Flax modules fail under Explicit axes).

    Args:
        data: devices on the data axis; default all devices / `model`.
        model: devices on the model axis.
        devices: the devices to use; default `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    data = len(devices) // model if data is None else data
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"a ({data}, {model}) mesh needs {data * model} devices; {len(devices)} available")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def spec(*logical_axes: str | None) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names (None: replicated)."""
    unknown = [a for a in logical_axes if a is not None and a not in RULES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {sorted(RULES)}")
    return PartitionSpec(*(None if a is None else RULES[a] for a in logical_axes))


def sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axes."""
    return NamedSharding(mesh, spec(*logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis split over `data`, the rest replicated."""
    return sharding(mesh, "batch", *([None] * (ndim - 1)))
