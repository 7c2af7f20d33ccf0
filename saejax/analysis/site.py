"""`Site`: an SAE at one block of a backbone, the object the analysis wing works on.

>>> site = Site(bb, bb_params, layer=10, ae=ae, sae_params=params, norm=norm)
>>> out = site.encode(images_uint8)           # codes [B, P, F], resid, tokens, pooled, at_layer
>>> edit = site.edit(interventions.set_to(1234, 0.0))   # a latent edit as a residual edit
>>> edited = site.edited(edit, images_uint8)  # the forward finished after `edit` at the layer
>>> again = site.finish(edit, out["at_layer"])  # the same from the captured residual (later blocks only)

Every pass is jitted once per site. The browser (`browser.collect`), semprobe, the probe edits
(E2), segmentation (E3), the paper binaries and the demo read the SAE through it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from saejax.analysis import interventions
from saejax.core.normalization import Normalization


class Site:
    """Jitted forward passes of a backbone through an SAE at one block: the codes of every
    patch, and the final tokens and pooled CLS with or without a residual edit.

    Args:
        bb, bb_params: the backbone.
        layer: the block whose residual the SAE reads and the edits change (a block the
            backbone does not have is an error).
        ae, sae_params, norm: the SAE (and the normalisation it was trained with, or None).
        processing: how uint8 images become pixels (default `bb.preprocess`; give
            `cropped_processing(bb, size)` for images a source already resized and cropped).
    """

    def __init__(self, bb, bb_params, *, layer: int, ae, sae_params, norm: Normalization | None = None,
                 processing=None):
        bb._check_layers((layer,), "layer")  # pylint: disable=protected-access
        self.bb, self.bb_params, self.layer, self.ae, self.sae_params, self.norm = bb, bb_params, layer, ae, sae_params, norm
        self.processing = processing or bb.preprocess
        patches = slice(*bb.layout.patches)

        @jax.jit
        def encode(pixels):
            out = bb.forward(bb_params, pixels, capture=(layer,))
            at_layer = out.captured[layer]
            resid = at_layer[:, patches]
            x = resid.reshape(-1, bb.d_model)
            x = x if norm is None else norm.apply(x)
            codes = ae.encode(sae_params, x).reshape(*resid.shape[:2], -1)
            return {"resid": resid, "normalized": x.reshape(resid.shape), "codes": codes,
                    "tokens": out.tokens[:, patches], "pooled": out.pooled, "at_layer": at_layer}

        @jax.jit
        def edited(edit, pixels):
            out = bb.forward(bb_params, pixels, edits={layer: edit})
            return {"tokens": out.tokens[:, patches], "pooled": out.pooled}

        @jax.jit
        def finish(edit, at_layer):
            tokens, pooled, _ = bb.finish(bb_params, edit(at_layer), layer)
            return {"tokens": tokens[:, patches], "pooled": pooled}

        self._encode, self._edited, self._finish = encode, edited, finish

    def edit(self, latent_edit) -> interventions.SAEEdit:
        """The residual edit (`interventions.sae_edit`) that applies `latent_edit` (`set_to`,
        `scale`, ...) to this site's SAE codes, in the SAE's normalised space."""
        return interventions.sae_edit(self.ae, self.sae_params, latent_edit, self.norm)

    def pixels(self, images) -> jax.Array:
        return jnp.asarray(self.processing(images))

    def encode(self, images) -> dict[str, jax.Array]:
        """uint8 images -> at the layer: `resid` (raw) and `normalized` patch residuals [B, P, D],
        `codes` [B, P, F] and the whole residual `at_layer` [B, T, D]; the final patch `tokens`
        and `pooled`."""
        return self._encode(self.pixels(images))

    def edited(self, edit, images) -> dict[str, jax.Array]:
        """Final patch `tokens` and `pooled` with `edit` applied at the layer."""
        return self._edited(edit, self.pixels(images))

    def finish(self, edit, at_layer: jax.Array) -> dict[str, jax.Array]:
        """The same as `edited`, from a residual `at_layer` [B, T, D] already captured by
        `encode`: only the blocks after the layer run."""
        return self._finish(edit, at_layer)


def cropped_processing(bb, size: int):
    """`bb`'s preprocessing for images already resized and cropped to `size` x `size` (by a
    source): rescale and normalise only."""
    return dataclasses.replace(bb.processing, resize_shortest=None, resize_to=None, crop=(int(size), int(size)))
