"""DINOv2 and DINOv2 with registers (`dinov2`, `dinov2_registers`) on saejax's own modules.

`Dinov2Model` / `Dinov2ForImageClassification` and `Dinov2WithRegistersModel` checkpoints: the
ViT embedding (`vit.ClsEmbed`) with its position grid always resized to the input's, as
PyTorch's is (bicubic; antialiased for the register models), register tokens after CLS,
pre-norm blocks with layer scale on both branches, a GELU MLP or, in the giant models
(`use_swiglu_ffn`), SwiGLU (`weights_in` packs the gate and the up projection; the hidden width
is `(int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8`). The classifier reads the final CLS row and
the mean of the patch tokens. `layerscale_value` is only PyTorch's initial value of the learned
scales, so it is not read.
"""

from __future__ import annotations

import functools

from saejax.backbones._hf import config_class as config_class_named
from saejax.backbones.convert import NameTable
from saejax.backbones.layers import Block, Family, NormReadout, OwnModel, block_names, cls_layout
from saejax.backbones.preprocess import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, ImageProcessing
from saejax.backbones.vit import ClsEmbed

_TOWER = (
    ("embeddings.patch_embeddings.projection", "embed.patch"),
    ("embeddings.cls_token", "embed.cls"),
    ("embeddings.position_embeddings", "embed.positions"),
    ("embeddings.register_tokens", "embed.registers"),
    *block_names("encoder.layer.{i}", ln1="norm1", attn="attention.attention", q="query", k="key", v="value",
                 o="attention.output.dense", ln2="norm2", up="mlp.fc1", down="mlp.fc2"),
    ("encoder.layer.{i}.layer_scale1.lambda1", "blocks.{i}.ls1.scale"),
    ("encoder.layer.{i}.layer_scale2.lambda1", "blocks.{i}.ls2.scale"),
    ("layernorm", "readout.norm"),
)
_CLASSIFIER = (("classifier", "readout.classifier"),)
_SWIGLU = {"encoder.layer.{i}.mlp.fc1": ("encoder.layer.{i}.mlp.weights_in", ("blocks.{i}.mlp.gate", "blocks.{i}.mlp.up")),
           "encoder.layer.{i}.mlp.fc2": ("encoder.layer.{i}.mlp.weights_out", "blocks.{i}.mlp.down")}


def names(cfg, prefix: str) -> NameTable:
    """The weights' PyTorch names: the SwiGLU MLP's (`weights_in` holds the gate, then the up
    projection) in place of `fc1` / `fc2` when the config says `use_swiglu_ffn`."""
    pairs = _TOWER
    if bool(getattr(cfg, "use_swiglu_ffn", False)):
        pairs = tuple(_SWIGLU.get(torch_name, (torch_name, own)) for torch_name, own in pairs)
    return NameTable(pairs, prefix=prefix, top_level=_CLASSIFIER)


def mlp_width(cfg) -> int:
    """The MLP's hidden width: `D * mlp_ratio`, or SwiGLU's rounded two thirds of it."""
    hidden = int(int(cfg.hidden_size) * float(cfg.mlp_ratio))
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if bool(getattr(cfg, "use_swiglu_ffn", False)) else hidden


def _build(cfg, dtype, grid, heads, text_cfg, *, registers):
    n_registers = int(cfg.num_register_tokens) if registers else 0
    side = int(cfg.image_size) // int(cfg.patch_size)
    embed = ClsEmbed(int(cfg.hidden_size), int(cfg.patch_size), tuple(grid), 1 + side * side, n_registers,
                     antialias=registers, dtype=dtype)
    swiglu = bool(getattr(cfg, "use_swiglu_ffn", False))
    qkv = bool(getattr(cfg, "qkv_bias", True))
    block = Block(int(cfg.num_attention_heads), mlp_width(cfg), "silu" if swiglu else cfg.hidden_act,
                  float(cfg.layer_norm_eps), gated=swiglu, layer_scale=True, qkv_bias=(qkv, qkv, qkv), dtype=dtype)
    start = 1 + n_registers
    readout = NormReadout(float(cfg.layer_norm_eps), n_classes=heads.n_classes, classify_patch_mean=True,
                          patches=(start, start + grid[0] * grid[1]), dtype=dtype)
    return OwnModel(embed, block, readout, n_layers=int(cfg.num_hidden_layers), image_size=grid[0] * int(cfg.patch_size))


def _processing(cfg):
    # The hub processors (BitImageProcessor): short side 256, bicubic, centre crop 224; the
    # config's image_size (518) is only the position-embedding grid.
    return ImageProcessing(resize_shortest=256, crop=(224, 224), resample=BICUBIC, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD)


def _family(name, model_type, config_class, prefix, hub_ids, registers):
    return Family(
        name=name,
        model_types=(model_type,),
        hub_ids=hub_ids,
        config_class=config_class,
        configs=lambda cfg_json: (config_class_named(config_class).from_dict(dict(cfg_json)), None),
        build=functools.partial(_build, registers=registers),
        layout=lambda cfg, grid: cls_layout(cfg, grid, int(cfg.num_register_tokens) if registers else 0),
        names=functools.partial(names, prefix=prefix),
        default_processing=_processing,
        processing_from_hf=lambda processor, cfg: ImageProcessing.from_hf(processor, square_size=False),
        interpolate="always",
        resize_square=False,
    )


DINOV2 = _family("dinov2", "dinov2", "Dinov2Config", "dinov2.",
                 tuple(f"facebook/dinov2-{s}" for s in ("small", "base", "large", "giant")), registers=False)
DINOV2_REGISTERS = _family("dinov2_registers", "dinov2_with_registers", "Dinov2WithRegistersConfig",
                           "dinov2_with_registers.",
                           tuple(f"facebook/dinov2-with-registers-{s}" for s in ("small", "base", "large", "giant")),
                           registers=True)
