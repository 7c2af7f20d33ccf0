"""Editing a classifier's input residual through an SAE and reading the class probabilities
(the paper's CUB experiment, as pure functions a notebook can call).

1. Select patches of an image; 2. `propose_latents` sums each latent over them, drops dense
ones (frequency >= 1e-2) and offers the top 3; 3. set the chosen latents to `slider x max`
on the selected patches, at one block, keeping the SAE error; 4. the model finishes its pass:
remaining blocks, final norm, probe; 5. class probabilities. `slider_curve` does step 3-5 for
many slider values in one jitted, vmapped call.

>>> curve = slider_curve(bb, bb_params, layer=10, ae=ae, sae_params=params, norm=None, probe=probe)
>>> probs_SK = curve(pixels_1HW3, token_mask_T, latents_L, max_values_L, jnp.linspace(-20, 20, 41))
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis import interventions as iv
from saejax.analysis.features import propose_latents
from saejax.analysis.probes import LinearProbe

__all__ = ["Readout", "check_choice", "cropped_processing", "latent_stats", "patch_token_mask", "propose_latents",
           "slider_curve"]


def patch_token_mask(bb, patches) -> np.ndarray:
    """bool [T]: the tokens of the given patch indices (row-major over the patch grid).

    Raises:
        ValueError: a patch index outside the grid (named).
    """
    start, stop = bb.layout.patches
    patches = np.asarray(patches, np.int64).ravel()
    bad = patches[(patches < 0) | (patches >= stop - start)]
    if bad.size:
        raise ValueError(f"patch {int(bad[0])} is outside the {stop - start}-patch grid {bb.grid}")
    mask = np.zeros(bb.layout.n_tokens, bool)
    mask[start + patches] = True
    return mask


def slider_curve(bb, bb_params, *, layer: int, ae, sae_params, norm, probe: LinearProbe,
                 read: str = "pooled") -> Callable:
    """A jitted `curve(pixels [1, H, W, 3], token_mask [T], latents [L], max_values [L],
    sliders [S]) -> probabilities [S, K]`: for each slider value s, the probe's softmax after
    setting every latent to `s * max_value` on the masked tokens at `layer`.

    Args:
        read: what the probe reads: "pooled" (the CLS after the final norm) or "tokens" (the
            final tokens, probabilities per token `[S, T, K]`).

    Latent ids are traced here (one compilation for every choice); check concrete ones first
    with `check_choice`.
    """

    def probabilities(slider, pixels, token_mask, latents, max_values):
        edit = iv.sae_edit(ae, sae_params, iv.set(latents, slider * max_values, mask=token_mask), norm)
        out = bb.forward(bb_params, pixels, edits={layer: edit})
        features = out.pooled[0] if read == "pooled" else out.tokens[0]
        return jax.nn.softmax(probe.logits(features), axis=-1)

    over_sliders = jax.vmap(probabilities, in_axes=(0, None, None, None, None))

    @jax.jit
    def curve(pixels, token_mask, latents, max_values, sliders):
        return over_sliders(sliders, pixels, token_mask, latents, max_values)

    return curve


def check_choice(ae, latents) -> None:
    """Concrete latent ids must be valid before they go into a traced curve."""
    iv.check_latent_ids(iv.set(np.asarray(latents), 0.0), ae.d_sae)



class Readout:
    """Jitted forward passes of a backbone through an SAE at one block: the codes of every
    patch, and the final tokens and pooled CLS with or without a residual edit.

    Args:
        bb, bb_params: the backbone.
        layer: the block whose residual the SAE reads and the edits change.
        ae, sae_params, norm: the SAE (and the normalisation it was trained with, or None).
        processing: how uint8 images become pixels (default `bb.preprocess`; give
            `cropped_processing(bb, size)` for images a source already resized and cropped).
    """

    def __init__(self, bb, bb_params, *, layer: int, ae, sae_params, norm=None, processing=None):
        bb._check_layers((layer,), "layer")  # pylint: disable=protected-access  (a wrong block is an error)
        self.bb, self.layer, self.ae = bb, layer, ae
        self.processing = processing or bb.preprocess
        patches = slice(*bb.layout.patches)

        @jax.jit
        def encode(pixels):
            out = bb.forward(bb_params, pixels, capture=(layer,))
            resid = out.captured[layer][:, patches]
            x = resid.reshape(-1, bb.d_model)
            codes = ae.encode(sae_params, x if norm is None else norm.apply(x)).reshape(*resid.shape[:2], -1)
            return {"resid": resid, "codes": codes, "tokens": out.tokens[:, patches], "pooled": out.pooled}

        @jax.jit
        def edited(edit, pixels):
            out = bb.forward(bb_params, pixels, edits={layer: edit})
            return {"tokens": out.tokens[:, patches], "pooled": out.pooled}

        self._encode, self._edited = encode, edited

    def pixels(self, images) -> jax.Array:
        return jnp.asarray(self.processing(images))

    def encode(self, images) -> dict[str, jax.Array]:
        """uint8 images -> `resid`, `codes` [B, P, .] at the layer; final patch `tokens`; `pooled`."""
        return self._encode(self.pixels(images))

    def edited(self, edit, images) -> dict[str, jax.Array]:
        """Final patch `tokens` and `pooled` with `edit` applied at the layer."""
        return self._edited(edit, self.pixels(images))


def cropped_processing(bb, size: int):
    """`bb`'s preprocessing for images already resized and cropped to `size` x `size` (by a
    source): rescale and normalise only."""
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(bb.processing, resize_shortest=None, resize_to=None, crop=(int(size), int(size)))



def latent_stats(readout: Readout, image_batches) -> dict[str, np.ndarray]:
    """Each latent's firing frequency over patches and its max value, streamed over image
    batches (bounded memory: [F] accumulators). The max sets edit values (`slider x max`)."""
    fired = maxima = None
    patches = 0

    @jax.jit
    def reduce(codes):
        return jnp.sum(codes > 0, axis=(0, 1)), jnp.max(codes, axis=(0, 1))

    for images in image_batches:
        count, peak = reduce(readout.encode(images)["codes"])
        fired = count if fired is None else fired + count
        maxima = peak if maxima is None else jnp.maximum(maxima, peak)
        patches += images.shape[0] * readout.bb.layout.n_patches
    if fired is None:
        raise ValueError("latent_stats: no images")
    return {"frequency": np.asarray(fired) / patches, "max": np.asarray(maxima), "patches": patches}
