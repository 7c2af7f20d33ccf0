"""CLIP's text tower on saejax's own modules, for zero-shot heads (`saejax.fidelity.zero_shot_head`).

>>> bb, params = saejax.backbones.load("openai/clip-vit-base-patch16")   # a full CLIPModel checkpoint
>>> input_ids, attention_mask = clip_tokenize(bb, ["a photo of a cat", "a photo of a dog"])
>>> text = clip_text_embeddings(bb, params, input_ids, attention_mask)   # [C, P], CLIPModel.get_text_features
>>> head = saejax.fidelity.zero_shot_head(clip_projection(params), text, clip_logit_scale(params))

Token ids come from CLIP's tokenizer in the checkpoint's directory (`clip_tokenize`: prompts
padded to the longest; `transformers` 4 or 5). The tower is PyTorch's `CLIPTextTransformer`:
token and position embeddings, the pre-norm blocks under a causal mask and the padding mask,
the final layernorm, pooled at each sequence's end-of-text token (its highest id when the
config's `eos_token_id` is 2, as in OpenAI's hub configs; else the first `eos_token_id`), and
projected by `text_projection`. Its params are `params["text"]`: `embed/{tokens,positions}`,
`blocks/<i>`, `norm`, `projection/kernel` and `logit_scale`.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from saejax.backbones import _hf
from saejax.backbones.layers import Block, prefixed_shapes


class TextEmbed(nn.Module):
    vocab: int
    hidden: int
    n_positions: int

    @nn.compact
    def __call__(self, ids):
        tokens = self.param("tokens", nn.initializers.normal(0.02), (self.vocab, self.hidden), jnp.float32)
        positions = self.param("positions", nn.initializers.normal(0.01), (self.n_positions, self.hidden), jnp.float32)
        return tokens[ids] + positions[: ids.shape[-1]]


class TextHead(nn.Module):
    eps: float
    projection: int

    @nn.compact
    def __call__(self, h, pool_at):
        pooled = jnp.take_along_axis(nn.LayerNorm(self.eps, name="norm")(h), pool_at[:, None, None], axis=1)[:, 0]
        self.param("logit_scale", nn.initializers.constant(2.6592), (), jnp.float32)
        return nn.Dense(self.projection, use_bias=False, name="projection")(pooled)


class TextTower:
    """`CLIPTextModel` + `text_projection` over `params["text"]` (see the module docstring).

    Args:
        cfg: the `transformers` `CLIPTextConfig`.
        projection: the projection's output size (`CLIPConfig.projection_dim`).
    """

    def __init__(self, cfg, projection: int):
        self.eos_token_id = int(cfg.eos_token_id)
        self.n_layers = int(cfg.num_hidden_layers)
        self.embed = TextEmbed(int(cfg.vocab_size), int(cfg.hidden_size), int(cfg.max_position_embeddings))
        self.block = Block(int(cfg.num_attention_heads), int(cfg.intermediate_size), cfg.hidden_act,
                           float(cfg.layer_norm_eps))
        self.head = TextHead(float(cfg.layer_norm_eps), int(projection))

    def __call__(self, p, input_ids, attention_mask):
        """[C, L] int ids and 0/1 mask -> [C, P] projected, unnormalised text embeddings."""
        h = self.embed.apply({"params": p["embed"]}, input_ids)
        length = input_ids.shape[-1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # [C, 1, L, L]
        for i in range(self.n_layers):
            h = self.block.apply({"params": p["blocks"][str(i)]}, h, None, mask)
        if self.eos_token_id == 2:
            pool_at = jnp.argmax(input_ids, axis=-1)
        else:
            pool_at = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return self.head.apply({"params": {k: p[k] for k in ("norm", "projection", "logit_scale")}}, h, pool_at)

    def param_shapes(self) -> dict[tuple, tuple]:
        key = jax.random.key(0)
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        embed = jax.eval_shape(self.embed.init, key, ids)
        resid = jax.eval_shape(lambda p, x: self.embed.apply(p, x), embed, ids)
        block = jax.eval_shape(self.block.init, key, resid)
        head = jax.eval_shape(self.head.init, key, resid, jax.ShapeDtypeStruct((1,), jnp.int32))
        shapes = prefixed_shapes(("embed",), embed)
        for i in range(self.n_layers):
            shapes.update(prefixed_shapes(("blocks", str(i)), block))
        shapes.update(prefixed_shapes((), head))
        return shapes


def _check_full_clip(bb, params):
    if bb.family != "clip" or getattr(bb, "text_config", None) is None or "text" not in params \
            or "projection" not in params.get("readout", {}):
        raise ValueError(f"needs a full CLIPModel checkpoint with its text tower and text_projection; this "
                         f"{bb.family} backbone has none (load the CLIPModel directory, not CLIPVisionModel's)")


def clip_text_embeddings(bb, params, input_ids, attention_mask=None) -> jax.Array:
    """[C, L] token ids -> [C, P] projected text embeddings (not normalised): PyTorch's
    `CLIPModel.get_text_features`.

    Raises:
        ValueError: `bb` is not a full CLIP checkpoint (no text tower or projection loaded).
    """
    try:
        _check_full_clip(bb, params)
    except ValueError as e:
        raise ValueError(f"clip_text_embeddings {e}") from None
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    tower = TextTower(bb.text_config, params["text"]["projection"]["kernel"].shape[1])
    return tower(params["text"], input_ids, mask)


def clip_projection(params) -> jax.Array:
    """CLIP's `visual_projection` [D, P]: `pooled @ clip_projection(params)` is PyTorch's
    `CLIPModel.get_image_features` (open_clip's `encode_image`)."""
    try:
        return params["readout"]["projection"]["kernel"]
    except KeyError:
        raise ValueError("this backbone has no visual_projection (a CLIP checkpoint with its projection has one)") \
            from None


def clip_logit_scale(params) -> float:
    """`exp(logit_scale)` of a full CLIP checkpoint (100 for OpenAI's models)."""
    try:
        return float(jnp.exp(params["text"]["logit_scale"]))
    except KeyError:
        raise ValueError("this backbone has no logit_scale (a full CLIPModel checkpoint has one)") from None


def clip_tokenize(bb, prompts) -> tuple[jax.Array, jax.Array]:
    """`(input_ids, attention_mask)` [C, L] of `prompts` with the CLIP tokenizer saved next to
    the checkpoint (`vocab.json` + `merges.txt`), padded to the longest prompt.

    Raises:
        FileNotFoundError: the checkpoint's directory has no tokenizer files (the message names it).
    """
    path = getattr(bb.load_info, "path", None)
    if path is None or not all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
        raise FileNotFoundError(f"no CLIP tokenizer (vocab.json and merges.txt) in {path!r}; download the checkpoint "
                                "with its tokenizer files, or tokenize the prompts yourself")
    with _hf.quiet():
        tokenizer = _hf.hf().CLIPTokenizer.from_pretrained(path)
        batch = tokenizer(list(prompts), padding=True, return_tensors="np")
    return jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["attention_mask"], jnp.int32)
