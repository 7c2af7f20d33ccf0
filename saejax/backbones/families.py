"""The registry of backbone families.

`transformers` Flax families (`HF_FAMILIES`: their blocks are HF's Flax modules, see
`saejax.backbones.model`) and saejax's own-module families (`OWN_FAMILIES`: built from
`saejax.backbones.layers`, one file each). Adding a family is one file that defines an
`OwnFamily`, one entry below, and one golden fixture from the PyTorch model.
"""

from __future__ import annotations

from saejax.backbones import dinov3, siglip
from saejax.backbones.layers import OwnFamily

HF_FAMILIES = ("clip", "dinov2", "dinov2_registers", "vit")
OWN_FAMILIES: dict[str, OwnFamily] = {f.name: f for f in (siglip.SIGLIP, siglip.SIGLIP2_NAFLEX, dinov3.DINOV3)}
FAMILIES = HF_FAMILIES + tuple(OWN_FAMILIES)
