"""PyTorch checkpoint names <-> saejax parameter keys: the one conversion path of every family.

Each family states its PyTorch names once, as a `NameTable` of `(torch, own)` pairs of paths
with `{i}` for a block index:

    ("encoder.layer.{i}.attention.attention.query", "blocks.{i}.attn.q")   # a module
    ("embeddings.cls_token", "embed.cls")                                   # a tensor
    ("encoder.layer.{i}.mlp.weights_in", ("blocks.{i}.mlp.gate", "blocks.{i}.mlp.up"))  # split

A module pair maps the module's `weight` / `bias`: a Linear weight [out, in] is transposed to a
Flax `kernel` [in, out], a Conv2d weight OIHW becomes HWIO, a LayerNorm weight (1-D) becomes
`scale`. A tensor pair (a parameter of its own: CLS token, position table, layer scale) is taken
as it is. A split pair cuts the PyTorch tensor into equal parts along its first (output) axis,
as DINOv2's SwiGLU packs its gate and its up projection (and `nn.MultiheadAttention`'s
`in_proj_weight` is read as the weight of a module `in_proj`, split into q, k, v). The table reads both ways: `to_own`
turns a PyTorch state dict into flat saejax params, `to_torch` writes saejax params back under
the PyTorch names, so a checkpoint that saejax writes (`create_random`, the shapes ViT) is one
`transformers` reads too.

Everything that loads goes through `to_own`: safetensors (one file or shards),
`pytorch_model.bin`, open_clip's files (renamed to CLIP's names first) and old `transformers`
Flax msgpack files (`flax_to_torch` turns their trees into PyTorch names).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

Path = tuple[str, ...]
_MODULE_LEAVES = ("weight", "bias")
# `nn.MultiheadAttention` names its packed q, k, v projection `in_proj_weight` / `in_proj_bias`:
# read as a module `in_proj` (split into q, k, v by the table) and written back so.
_PACKED = re.compile(r"\.in_proj_(weight|bias)$")


@dataclasses.dataclass(frozen=True)
class NameTable:
    """A family's PyTorch names and their saejax keys.

    Attributes:
        pairs: `(torch, own)` templates of the vision tower, under `prefix`; `own` is a tuple
            of keys for a split tensor.
        prefix: the vision tower's PyTorch prefix (`"vit."`, `"vision_model."`), which a
            checkpoint may carry or not (a `*ForImageClassification` model saves `vit.` in front
            of what `ViTModel` saves). `to_torch` writes it.
        top_level: `(torch, own)` templates of the names outside the tower (a classifier,
            CLIP's projections and text tower), never prefixed.
    """

    pairs: tuple[tuple[str, str | tuple[str, ...]], ...]
    prefix: str = ""
    top_level: tuple[tuple[str, str | tuple[str, ...]], ...] = ()

    def __post_init__(self):
        entries = [(torch_name, (own,) if isinstance(own, str) else tuple(own), outside)
                   for outside, pairs in ((False, self.pairs), (True, self.top_level)) for torch_name, own in pairs]
        # Names outside the tower first: "classifier.weight" is never the tower's "classifier".
        object.__setattr__(self, "_torch", tuple((_template(t), t, owns, outside)
                                                 for t, owns, outside in sorted(entries, key=lambda e: not e[2])))
        object.__setattr__(self, "_own", tuple((_template(o), t, owns, part, outside) for t, owns, outside in entries
                                               for part, o in enumerate(owns)))


def _template(path: str) -> re.Pattern:
    return re.compile("^" + re.escape(path).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?:\.(?P<leaf>[A-Za-z_0-9]+))?$")


def to_own(state: Mapping[str, np.ndarray], table: NameTable) -> tuple[dict[Path, np.ndarray], list[str]]:
    """A PyTorch state dict -> flat saejax params (`{("blocks", "0", "attn", "q", "kernel"): array}`).

    Returns:
        `(params, unused)`: the converted params, and the PyTorch names the table does not take
        (a mask token, `position_ids`, a text tower the family does not read, ...).
    """
    out, unused = {}, []
    for name, value in state.items():
        converted = _convert_name(name, value, table)
        if converted is None:
            unused.append(name)
        else:
            out.update(converted)
    return out, unused


def _convert_name(name, value, table):
    name = _PACKED.sub(r".in_proj.\1", name)
    bare = name[len(table.prefix):] if table.prefix and name.startswith(table.prefix) else name
    for pattern, torch_name, owns, outside in table._torch:
        m = pattern.match(name if outside else bare)
        if m is None:
            continue
        i, leaf = m.group("i") if "{i}" in torch_name else None, m.group("leaf")
        keys = [tuple(o.format(i=i).split(".")) for o in owns]
        if leaf is None:  # a tensor taken as it is
            if len(keys) != 1:
                return None
            return {keys[0]: value}
        if leaf not in _MODULE_LEAVES:
            continue
        parts = np.split(value, len(keys), axis=0) if len(keys) > 1 else [value]
        return {key + (_own_leaf(leaf, part),): _to_flax(leaf, part) for key, part in zip(keys, parts, strict=True)}
    return None


def _own_leaf(leaf: str, value) -> str:
    if leaf == "bias":
        return "bias"
    return "scale" if value.ndim == 1 else "kernel"


def _to_flax(leaf: str, value):
    if leaf == "weight" and value.ndim == 2:
        return value.T  # Linear [out, in] -> Dense [in, out]
    if leaf == "weight" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # Conv2d OIHW -> HWIO
    return value


def _to_torch_value(leaf: str, value):
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return value


def to_torch(params: Mapping[Path, np.ndarray], table: NameTable) -> dict[str, np.ndarray]:
    """Flat saejax params -> a PyTorch state dict under the table's names (the inverse of `to_own`).

    Raises:
        ValueError: a key the table has no PyTorch name for, or half of a split tensor.
    """
    out: dict[str, np.ndarray] = {}
    pending: dict[str, dict[int, np.ndarray]] = {}
    for key, value in params.items():
        dotted = ".".join(key)
        for pattern, torch_name, owns, part, outside in table._own:
            m = pattern.match(dotted)
            if m is None:
                continue
            i, leaf = m.group("i") if "{i}" in owns[part] else None, m.group("leaf")
            name = ("" if outside else table.prefix) + torch_name.format(i=i)
            if leaf is None:
                out[name] = np.asarray(value)
                break
            if leaf not in ("kernel", "bias", "scale"):
                continue
            torch_leaf = "bias" if leaf == "bias" else "weight"
            converted = np.asarray(_to_torch_value(leaf, np.asarray(value)))
            if len(owns) == 1:
                out[f"{name}.{torch_leaf}"] = converted
            else:
                pending.setdefault(f"{name}.{torch_leaf}", {})[part] = converted
            break
        else:
            raise ValueError(f"parameter {dotted!r} has no PyTorch name in this family's table")
    for name, parts in pending.items():
        if len(parts) != max(parts) + 1 or any(p not in parts for p in range(len(parts))):
            raise ValueError(f"{name}: only parts {sorted(parts)} of a split tensor are present")
        out[name] = np.concatenate([parts[p] for p in sorted(parts)], axis=0)
    return {re.sub(r"\.in_proj\.(weight|bias)$", r".in_proj_\1", k): np.ascontiguousarray(v) if v.ndim else v
            for k, v in out.items()}


def flax_to_torch(flat: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """A `transformers` Flax params tree (flat) -> the PyTorch names of the same model: `kernel`
    back to `weight` (transposed), `scale` and `embedding` to `weight`. Reads the
    `flax_model.msgpack` files that `transformers` 4 wrote (and saejax's shapes ViT before 0.2)."""
    out = {}
    for key, value in flat.items():
        *path, leaf = key
        if leaf == "kernel":
            value, leaf = _to_torch_value("kernel", value), "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join((*path, leaf))] = value
    return out
