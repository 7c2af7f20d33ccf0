"""Editing a classifier's input residual through an SAE and reading the class probabilities
(the paper's CUB experiment, as pure functions a notebook can call).

1. Select patches of an image; 2. `propose_latents` sums each latent over them, drops dense
ones (frequency >= 1e-2) and offers the top 3; 3. set the chosen latents to `slider x max`
on the selected patches, at one block, keeping the SAE error; 4. the model finishes its pass:
remaining blocks, final norm, probe; 5. class probabilities. `slider_curve` does step 3-5 for
many slider values in one jitted, vmapped call.

>>> curve = slider_curve(Site(bb, bb_params, layer=10, ae=ae, sae_params=params), probe)
>>> probs_SK = curve(pixels_1HW3, token_mask_T, latents_L, max_values_L, jnp.linspace(-20, 20, 41))
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from saejax.analysis import interventions as iv
from saejax.analysis.features import propose_latents
from saejax.analysis.probes import LinearProbe
from saejax.analysis.site import Site
from saejax.core.metrics import FiringStats

__all__ = ["check_choice", "latent_stats", "patch_token_mask", "propose_latents", "slider_curve"]


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


def slider_curve(site: Site, probe: LinearProbe, *, read: str = "pooled") -> Callable:
    """A jitted `curve(pixels [1, H, W, 3], token_mask [T], latents [L], max_values [L],
    sliders [S]) -> probabilities [S, K]`: for each slider value s, the probe's softmax after
    setting every latent to `s * max_value` on the masked tokens at the site's layer.

    Args:
        site: the SAE at its block.
        probe: reads the final pooled CLS or tokens.
        read: what the probe reads: "pooled" (the CLS after the final norm) or "tokens" (the
            final tokens, probabilities per token `[S, T, K]`).

    Latent ids are traced here (one compilation for every choice); check concrete ones first
    with `check_choice`.
    """

    bb, bb_params, layer = site.bb, site.bb_params, site.layer

    def probabilities(slider, pixels, token_mask, latents, max_values):
        edit = site.edit(iv.set_to(latents, slider * max_values, mask=token_mask))
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
    iv.check_latent_ids(iv.set_to(np.asarray(latents), 0.0), ae.d_sae)



def latent_stats(readout: Site, image_batches) -> dict[str, np.ndarray]:
    """Each latent's firing frequency over patches and its max value, streamed over image
    batches (bounded memory: `saejax.metrics.FiringStats`). The max sets edit values
    (`slider x max`)."""
    stats = FiringStats.zeros(readout.ae.d_sae)
    for images in image_batches:
        stats = _add_codes(stats, readout.encode(images)["codes"])
    if not stats.n_inputs:
        raise ValueError("latent_stats: no images")
    return {"frequency": np.asarray(stats.frequency()), "max": np.asarray(stats.maxes), "patches": int(stats.n_inputs)}


@jax.jit
def _add_codes(stats: FiringStats, codes_BPF: jax.Array) -> FiringStats:
    return stats.update(codes_BPF.reshape(-1, codes_BPF.shape[-1]))
