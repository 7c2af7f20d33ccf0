"""CLIP's text tower, for zero-shot heads (`saejax.fidelity.zero_shot_head`).

>>> bb, params = saejax.backbones.load("openai/clip-vit-base-patch16")   # a full CLIPModel checkpoint
>>> text = clip_text_embeddings(bb, params, input_ids, attention_mask)   # [C, P], CLIPModel.get_text_features
>>> head = saejax.fidelity.zero_shot_head(params["visual_projection"]["kernel"], text,
...                                       float(jnp.exp(params["logit_scale"])))

Token ids come from CLIP's tokenizer (`transformers.CLIPTokenizer.from_pretrained(model_dir)`,
prompts padded to one length); the text transformer is `transformers`' Flax CLIP text module,
pooled at each sequence's highest token id (CLIP's end-of-text token) and projected by
`text_projection`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saejax.backbones import _hf


def clip_text_embeddings(bb, params, input_ids, attention_mask=None) -> jax.Array:
    """[C, L] token ids -> [C, P] projected text embeddings (not normalised).

    Raises:
        ValueError: `bb` is not a full CLIP checkpoint (no text tower or projection loaded).
    """
    text_config = getattr(bb, "text_config", None)
    if bb.family != "clip" or text_config is None or "text_model" not in params or "text_projection" not in params:
        raise ValueError(f"clip_text_embeddings needs a full CLIPModel checkpoint with its text tower and "
                         f"text_projection; this {bb.family} backbone has none (load the CLIPModel directory, not "
                         "CLIPVisionModel's)")
    m = _hf.flax_module("clip.modeling_flax_clip")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    with _hf.quiet():
        out = m.FlaxCLIPTextTransformer(text_config).apply({"params": params["text_model"]}, input_ids, mask, positions)
    return out.pooler_output @ params["text_projection"]["kernel"]
