"""Checks every backbone family must pass, shared by test_backbones.py and test_backbone_families.py."""

import jax.numpy as jnp
import numpy as np


def check_edit_equals_running_the_remaining_blocks_by_hand(bb, params, x, *, at=1):
    """An edit at block `at` (a shift of the patch tokens) equals: run blocks 0..at by hand,
    edit, run the rest by hand, read out. `captured[at]` is the residual before the edit."""
    shift = jnp.linspace(-1.0, 1.0, bb.d_model)

    def edit(r):
        return r.at[:, bb.layout.patches[0]:].add(shift)

    last = bb.n_layers - 1
    out = bb.forward(params, x, capture=(at, last), edits={at: edit})
    resid = bb.run_blocks(params, bb.embed(params, x), 0, at + 1)
    np.testing.assert_allclose(out.captured[at], resid, atol=1e-6)
    resid = bb.run_blocks(params, edit(resid), at + 1, bb.n_layers)
    np.testing.assert_allclose(out.captured[last], resid, atol=1e-6)
    tokens, pooled, logits = bb.readout(params, resid)
    np.testing.assert_allclose(out.tokens, tokens, atol=1e-6)
    np.testing.assert_allclose(out.pooled, pooled, atol=1e-6)
    if logits is not None:
        np.testing.assert_allclose(out.logits, logits, atol=1e-6)
    finished = bb.finish(params, edit(out.captured[at]), at)  # the one continuation the analyses use
    for got, want in zip(finished, (out.tokens, out.pooled, out.logits)):
        if want is not None:
            np.testing.assert_allclose(got, want, atol=1e-6)
    plain = bb.forward(params, x)
    assert np.abs(np.asarray(out.pooled) - np.asarray(plain.pooled)).max() > 1e-3  # the edit changed the output
