"""`Site`: an SAE at one block of a backbone, the object the analysis wing works on.

>>> site = Site(bb, bb_params, layer=10, ae=ae, sae_params=params, norm=norm)
>>> out = site.encode(images_uint8)           # codes [B, P, F], resid, tokens, pooled, at_layer
>>> edit = site.edit(interventions.set_to(1234, 0.0))   # a latent edit as a residual edit
>>> edited = site.edited(edit, images_uint8)  # the forward finished after `edit` at the layer
>>> again = site.finish(edit, out["at_layer"])  # the same from the captured residual (later blocks only)

A Site is a pytree: the backbone, the layer, the SAE's architecture and the preprocessing are
static, the parameters and the normalisation are leaves. So it passes through `jax.jit` as an
argument, a `vmap` over a sweep's stacked parameters reads
`jax.vmap(lambda p: f(site.replace(sae_params=p)))(stacked)`, and every Site over the same
backbone object, layer and SAE shares one compiled program per pass. The browser
(`browser.collect`), semprobe, the probe edits (E2), segmentation (E3), discovery's
attribution, fidelity, the paper binaries and the demo read the SAE through it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from saejax.analysis import interventions
from saejax.core.normalization import Normalization


def _static(**kwargs):
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A backbone with an SAE at one block: the codes of every patch, and the final tokens and
    pooled CLS with or without a residual edit (each pass jitted).

    Args:
        bb, bb_params: the backbone.
        layer: the block whose residual the SAE reads and the edits change (a block the
            backbone does not have is an error).
        ae, sae_params, norm: the SAE (and the normalisation it was trained with, or None).
        processing: how uint8 images become pixels (default `bb.preprocess`; give
            `cropped_processing(bb, size)` for images a source already resized and cropped).
    """

    bb: Any = _static()
    bb_params: Any
    _: dataclasses.KW_ONLY
    layer: int = _static()
    ae: Any = _static()
    sae_params: Any
    norm: Normalization | None = None
    processing: Any = _static(default=None)

    def __post_init__(self):
        self.bb._check_layers((self.layer,), "layer")  # pylint: disable=protected-access

    def replace(self, **changes) -> Site:
        """This site with some fields changed (`site.replace(sae_params=other)`)."""
        return dataclasses.replace(self, **changes)

    def edit(self, latent_edit) -> interventions.SAEEdit:
        """The residual edit (`interventions.sae_edit`) that applies `latent_edit` (`set_to`,
        `scale`, ...) to this site's SAE codes, in the SAE's normalised space."""
        return interventions.sae_edit(self.ae, self.sae_params, latent_edit, self.norm)

    def pixels(self, images) -> jax.Array:
        return jnp.asarray((self.processing or self.bb.preprocess)(images))

    def encode(self, images) -> dict[str, jax.Array]:
        """uint8 images -> at the layer: `resid` (raw) and `normalized` patch residuals [B, P, D],
        `codes` [B, P, F] and the whole residual `at_layer` [B, T, D]; the final patch `tokens`,
        `pooled` and `logits` (None without a classifier)."""
        return _encode(self, self.pixels(images))

    def edited(self, edit, images) -> dict[str, jax.Array]:
        """Final patch `tokens`, `pooled` and `logits` (None without a classifier) with `edit`
        applied at the layer."""
        return _edited(self, edit, self.pixels(images))

    def finish(self, edit, at_layer: jax.Array) -> dict[str, jax.Array]:
        """The same as `edited`, from a residual `at_layer` [B, T, D] already captured by
        `encode`: only the blocks after the layer run. The one place a forward pass continues
        from a site (`Backbone.finish` at its layer); pure, so it also runs inside your `jit`
        or `vmap`. `edit` is any `resid -> resid` ([B, T, D]): an `interventions` edit, a
        `splice`, a `replace_tokens`."""
        return _finish(self, edit, at_layer)

    def encode_pixels(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """`encode` of preprocessed pixels (pure: call it inside your own `jit`; `encode` is
        this, jitted)."""
        bb, layer, patches = self.bb, self.layer, slice(*self.bb.layout.patches)
        out = bb.forward(self.bb_params, pixels, capture=(layer,))
        at_layer = out.captured[layer]
        resid = at_layer[:, patches]
        x = resid.reshape(-1, bb.d_model).astype(jnp.float32)  # the SAE reads float32, as it was trained
        x = x if self.norm is None else self.norm.apply(x)
        codes = self.ae.encode(self.sae_params, x).reshape(*resid.shape[:2], -1)
        return {"resid": resid, "normalized": x.reshape(resid.shape), "codes": codes,
                "tokens": out.tokens[:, patches], "pooled": out.pooled, "logits": out.logits, "at_layer": at_layer}


@jax.jit
def _encode(site, pixels):
    return site.encode_pixels(pixels)


@jax.jit
def _edited(site, edit, pixels):
    out = site.bb.forward(site.bb_params, pixels, edits={site.layer: edit})
    patches = slice(*site.bb.layout.patches)
    return {"tokens": out.tokens[:, patches], "pooled": out.pooled, "logits": out.logits}


@jax.jit
def _finish(site, edit, at_layer):
    tokens, pooled, logits = site.bb.finish(site.bb_params, edit(at_layer), site.layer)
    patches = slice(*site.bb.layout.patches)
    return {"tokens": tokens[:, patches], "pooled": pooled, "logits": logits}


def accepts_loose_arguments(fn):
    """Until saejax 0.3, `fn` also takes the old spelling `fn(bb, bb_params, ae, sae_params, ...,
    layer=, normalization=|norm=)` in place of a Site, with a DeprecationWarning."""

    @functools.wraps(fn)
    def wrapper(site, *args, **kwargs):
        if isinstance(site, Site):
            return fn(site, *args, **kwargs)
        bb_params, ae, sae_params, *rest = args
        norm = kwargs.pop("normalization", None)
        norm = kwargs.pop("norm", norm)
        warnings.warn(f"{fn.__name__}(bb, bb_params, ae, sae_params, ..., layer=, normalization=) is deprecated and "
                      f"goes in saejax 0.3; pass a Site: {fn.__name__}(Site(bb, bb_params, layer=..., ae=..., "
                      "sae_params=..., norm=...), ...)", DeprecationWarning, stacklevel=2)
        return fn(Site(site, bb_params, layer=kwargs.pop("layer"), ae=ae, sae_params=sae_params, norm=norm), *rest,
                  **kwargs)

    return wrapper


def cropped_processing(bb, size: int):
    """`bb`'s preprocessing for images already resized and cropped to `size` x `size` (by a
    source): rescale and normalise only."""
    return dataclasses.replace(bb.processing, resize_shortest=None, resize_to=None, crop=(int(size), int(size)))
