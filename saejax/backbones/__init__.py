"""Vision transformer backbones as pure JAX functions, with residual capture and edits.

The only place in saejax that imports `transformers` (4.x, for its Flax modules, configs and
nothing else; lazily).

>>> bb, params = saejax.backbones.load("openai/clip-vit-base-patch16")      # doctest: +SKIP
>>> x = bb.preprocess(images_uint8)                   # [N, H, W, 3] uint8 -> [N, 224, 224, 3]
>>> out = bb.forward(params, x, capture=(10,), edits={10: edit})
>>> out.captured[10]                                  # [N, 197, 768], residual after block 10

Hook `i` is the residual stream after transformer block `i` (HF `hidden_states[i + 1]`).
Families (`FAMILIES`): built on `transformers`' Flax blocks, "clip" (CLIPVisionModel /
CLIPModel checkpoints, and open_clip checkpoints such as BioCLIP, see `open_clip`), "dinov2",
"dinov2_registers" (Flax DINOv2 blocks + register tokens) and "vit" (ViTForImageClassification
with its head, or ViTModel); built from saejax's own Flax modules (`layers`, `OWN_FAMILIES`),
"siglip" (SigLIP and fixed-size SigLIP 2), "siglip2" (SigLIP 2 NaFlex) and "dinov3".
"""

from saejax.backbones.base import ForwardOutput, LoadInfo, TokenLayout
from saejax.backbones.families import FAMILIES, HF_FAMILIES, OWN_FAMILIES, make_backbone
from saejax.backbones.loading import KNOWN_MODELS, MODEL_TYPES, default_processing, load, resolve
from saejax.backbones.model import Backbone
from saejax.backbones.preprocess import ImageProcessing
from saejax.backbones.random import abstract, create_random
from saejax.backbones.weights import find_weights
from saejax.backbones.text import clip_text_embeddings, clip_tokenize

__all__ = [
    "FAMILIES",
    "HF_FAMILIES",
    "KNOWN_MODELS",
    "MODEL_TYPES",
    "OWN_FAMILIES",
    "Backbone",
    "ForwardOutput",
    "ImageProcessing",
    "LoadInfo",
    "TokenLayout",
    "clip_text_embeddings",
    "clip_tokenize",
    "abstract",
    "create_random",
    "default_processing",
    "find_weights",
    "load",
    "make_backbone",
    "resolve",
]
