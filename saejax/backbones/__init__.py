"""Vision transformer backbones as pure JAX functions, with residual capture and edits.

The only place in saejax that imports `transformers` (4.40 or later, 4.x or 5.x; lazily), and
only for its config classes and CLIP's tokenizer: every model is saejax's own Flax modules
(`layers`), loaded from PyTorch checkpoints without torch.

>>> bb, params = saejax.backbones.load("openai/clip-vit-base-patch16")      # doctest: +SKIP
>>> x = bb.preprocess(images_uint8)                   # [N, H, W, 3] uint8 -> [N, 224, 224, 3]
>>> out = bb.forward(params, x, capture=(10,), edits={10: edit})
>>> out.captured[10]                                  # [N, 197, 768], residual after block 10

Hook `i` is the residual stream after transformer block `i` (HF `hidden_states[i + 1]`).
Families (`FAMILIES`): "clip" (CLIPVisionModel / CLIPModel checkpoints, with the text tower,
and open_clip checkpoints such as BioCLIP, see `open_clip`), "dinov2", "dinov2_registers",
"vit" (ViTForImageClassification with its head, or ViTModel with its pooler), "siglip"
(SigLIP and fixed-size SigLIP 2), "siglip2" (SigLIP 2 NaFlex) and "dinov3".
"""

from saejax.backbones.base import ForwardOutput, Heads, LoadInfo, TokenLayout
from saejax.backbones.families import FAMILIES, get_family, make_backbone
from saejax.backbones.loading import KNOWN_MODELS, MODEL_TYPES, default_processing, load, resolve
from saejax.backbones.model import Backbone
from saejax.backbones.preprocess import ImageProcessing
from saejax.backbones.random import abstract, create_random
from saejax.backbones.weights import find_weights
from saejax.backbones.text import clip_logit_scale, clip_projection, clip_text_embeddings, clip_tokenize

__all__ = [
    "FAMILIES",
    "KNOWN_MODELS",
    "MODEL_TYPES",
    "Backbone",
    "ForwardOutput",
    "Heads",
    "ImageProcessing",
    "LoadInfo",
    "TokenLayout",
    "abstract",
    "clip_logit_scale",
    "clip_projection",
    "clip_text_embeddings",
    "clip_tokenize",
    "create_random",
    "default_processing",
    "find_weights",
    "get_family",
    "load",
    "make_backbone",
    "resolve",
]
