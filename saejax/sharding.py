"""The device mesh and the logical-axis rules, stated once.

Two mesh axes: `data` (batches of images and of activations are split over it) and `model`
(independent sweep members, or the latents of one large SAE, are split over it). Arrays name
their axes logically (`batch`, `member`, `latent`, ...) and `RULES` maps those names to mesh
axes. `resolve` turns logical names into a `PartitionSpec` for a concrete shape: a mesh axis
is used once per array (first come, first served) and only for a dimension it divides, so a
sweep of 4 members on a 4-way `model` axis splits its members, while a single SAE splits its
latents over the same axis.

>>> mesh = make_mesh()                       # every device on `data`
>>> images = jax.device_put(images, sharding(mesh, "batch", None, None, None))
>>> resolve(mesh, (4, 768, 16384), ("member", "embed", "latent"))   # on a (2, 4) mesh
PartitionSpec('model', None, None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "batch": DATA,  # images, or rows of activations
    "member": MODEL,  # members of an SAE sweep (independent of each other)
    "latent": MODEL,  # SAE latents (when the members do not already use `model`)
    "embed": None,  # d_model
    "layer": None,
    "tokens": None,
    "height": None,
    "width": None,
    "channels": None,
}


@dataclasses.dataclass(frozen=True)
class Logical:
    """The logical axis names of one array (a pytree leaf, so trees of them mirror state trees).

    >>> Logical("member", "embed", "latent")
    """

    axes: tuple[str | None, ...]

    def __init__(self, *axes: str | None):
        object.__setattr__(self, "axes", tuple(axes))


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` mesh with Auto axes.

    Every backbone family runs under Explicit axes too (the forward with the batch split, no
    collective; `tests/multidevice_checks.py`), but the shuffle buffer's `shard_map` and the SAE
    step still lean on Auto's propagation: under Explicit axes the harvested rows reach the
    buffer's `shard_map` split on another dimension than its `in_specs`, so the mesh stays Auto
    until that code states its shardings (`jax.reshard`, `out_sharding`).

    Args:
        data: devices on the data axis; default all devices / `model`.
        model: devices on the model axis.
        devices: the devices to use; default `jax.devices()` (all processes' devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    data = len(devices) // model if data is None else data
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"a ({data}, {model}) mesh needs {data * model} devices; {len(devices)} available")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def spec(*logical_axes: str | None) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names (None: replicated)."""
    _check_names(logical_axes)
    return PartitionSpec(*(None if a is None else RULES[a] for a in logical_axes))


def resolve(mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` on `mesh`, following `RULES`.

    A mesh axis shards the first dimension that names it and that it divides evenly; other
    dimensions naming it stay replicated. Mesh axes of size 1 are left out.
    """
    _check_names(logical_axes)
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} axes, logical axes {tuple(logical_axes)} name "
                         f"{len(logical_axes)}")
    used, out = set(), []
    for size, name in zip(shape, logical_axes):
        axis = None if name is None else RULES[name]
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return PartitionSpec(*out)


def tree_shardings(mesh: Mesh, abstract_tree: Any, logical_tree: Any) -> Any:
    """NamedShardings for every leaf of `abstract_tree` (arrays or `jax.ShapeDtypeStruct` objects),
    from a tree of the same structure whose leaves are `Logical` axis names."""
    return jax.tree.map(lambda x, logical: NamedSharding(mesh, resolve(mesh, x.shape, logical.axes)),
                        abstract_tree, logical_tree)


def sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axes."""
    return NamedSharding(mesh, spec(*logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis split over `data`, the rest replicated."""
    return sharding(mesh, "batch", *([None] * (ndim - 1)))


def data_size(mesh: Mesh | None) -> int:
    """Devices on the `data` axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[DATA])


def _check_names(logical_axes) -> None:
    unknown = [a for a in logical_axes if a is not None and a not in RULES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {sorted(RULES)}")
