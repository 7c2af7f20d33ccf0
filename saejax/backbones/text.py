"""CLIP's text tower, for zero-shot heads (`saejax.fidelity.zero_shot_head`).

>>> bb, params = saejax.backbones.load("openai/clip-vit-base-patch16")   # a full CLIPModel checkpoint
>>> input_ids, attention_mask = clip_tokenize(bb, ["a photo of a cat", "a photo of a dog"])
>>> text = clip_text_embeddings(bb, params, input_ids, attention_mask)   # [C, P], CLIPModel.get_text_features
>>> head = saejax.fidelity.zero_shot_head(params["visual_projection"]["kernel"], text,
...                                       float(jnp.exp(params["logit_scale"])))

Token ids come from CLIP's tokenizer in the checkpoint's directory (`clip_tokenize`: prompts
padded to the longest); the text transformer is `transformers`' Flax CLIP text module,
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


def clip_tokenize(bb, prompts) -> tuple[jax.Array, jax.Array]:
    """`(input_ids, attention_mask)` [C, L] of `prompts` with the CLIP tokenizer saved next to
    the checkpoint (`vocab.json` + `merges.txt`), padded to the longest prompt.

    Raises:
        FileNotFoundError: the checkpoint's directory has no tokenizer files (the message names it).
    """
    import os  # noqa: PLC0415

    path = getattr(bb.load_info, "path", None)
    if path is None or not all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
        raise FileNotFoundError(f"no CLIP tokenizer (vocab.json and merges.txt) in {path!r}; download the checkpoint "
                                "with its tokenizer files, or tokenize the prompts yourself")
    with _hf.quiet():
        tokenizer = _hf.hf().CLIPTokenizer.from_pretrained(path)
        batch = tokenizer(list(prompts), padding=True, return_tensors="np")
    return jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["attention_mask"], jnp.int32)
