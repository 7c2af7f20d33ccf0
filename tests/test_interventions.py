import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import interventions as iv
from saejax import sae
from saejax.core.normalization import estimate_normalization


def setup(ae=None):
    ae = ae or sae.relu(16, 64)
    params = ae.init(jax.random.key(0))
    params = params.replace(b_enc=0.1 + 0.05 * jax.random.normal(jax.random.key(1), (ae.d_sae,)),
                            b_dec=0.2 * jax.random.normal(jax.random.key(2), (16,)))
    resid = jax.random.normal(jax.random.key(3), (2, 5, 16))
    return ae, params, resid


@pytest.mark.parametrize("ae", [sae.relu(16, 64), sae.topk(16, 64, k=8)], ids=["relu", "topk"])
def test_noop_edits_return_the_residual_exactly(ae):
    ae, params, resid = setup(ae)
    for edit in (iv.scale([3, 4], 1.0), iv.add(7, 0.0), iv.chain(), iv.set_to(3, 1.0, mask=jnp.zeros((2, 5), bool))):
        np.testing.assert_array_equal(iv.sae_edit(ae, params, edit)(resid), resid)
    np.testing.assert_array_equal(jax.jit(iv.sae_edit(ae, params, iv.scale(0, 1.0)).__call__)(resid), resid)


def test_set_changes_masked_tokens_by_exactly_v_minus_f_times_the_decoder_row():
    ae, params, resid = setup()
    latent, value = 11, 3.5
    mask = jnp.array([[True, False, True, False, False], [False, False, False, False, True]])
    edited = iv.sae_edit(ae, params, iv.set_to(latent, value, mask=mask))(resid)
    f = ae.encode(params, resid.reshape(-1, 16)).reshape(2, 5, -1)[..., latent]
    expected_change = (value - f)[..., None] * params.w_dec[latent]
    np.testing.assert_allclose(edited - resid, jnp.where(mask[..., None], expected_change, 0.0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(edited[~mask], resid[~mask])
    # Without a mask every token is edited; the result is the paper's x + sum_i (v_i - f_i) W_dec[i].
    edited_all = iv.sae_edit(ae, params, iv.set_to([latent, 3], [value, 0.0]))(resid)
    f3 = ae.encode(params, resid.reshape(-1, 16)).reshape(2, 5, -1)[..., 3]
    np.testing.assert_allclose(edited_all, resid + expected_change - f3[..., None] * params.w_dec[3], rtol=1e-5, atol=1e-5)


def test_set_where_active_leaves_silent_tokens_alone():
    z = jnp.array([[0.0, 2.0, 0.0], [1.5, 0.0, 3.0], [0.0, 0.0, 0.0]])
    edited = iv.set_to([0, 2], -4.0, where_active=True)(z)
    np.testing.assert_array_equal(edited, [[0.0, 2.0, 0.0], [-4.0, 0.0, -4.0], [0.0, 0.0, 0.0]])
    masked = iv.set_to(0, -4.0, mask=jnp.array([True, False, True]), where_active=True)(z)
    np.testing.assert_array_equal(masked, z)  # the only active token is masked out
    ae, params, resid = setup(sae.topk(16, 64, k=8))
    latent = int(jnp.argmax(jnp.sum(ae.encode(params, resid.reshape(-1, 16)) > 0, axis=0)))
    f = ae.encode(params, resid.reshape(-1, 16)).reshape(2, 5, -1)[..., latent]
    edited = iv.sae_edit(ae, params, iv.set_to(latent, -1.0, where_active=True))(resid)
    expected = jnp.where((f > 0)[..., None], (-1.0 - f)[..., None] * params.w_dec[latent], 0.0)
    assert 0 < int(jnp.sum(f > 0)) < f.size
    np.testing.assert_allclose(edited - resid, expected, rtol=1e-5, atol=1e-5)


def test_edit_kinds_and_chain():
    z = jnp.arange(12.0).reshape(2, 6)
    np.testing.assert_array_equal(iv.scale([1, 2], [2.0, 0.5])(z)[0, :3], [0.0, 2.0, 1.0])
    np.testing.assert_array_equal(iv.add(5, 10.0)(z)[:, 5], [15.0, 21.0])
    np.testing.assert_array_equal(iv.ablate([0, 4])(z)[:, [0, 4]], 0.0)
    chained = iv.chain(iv.set_to(1, 5.0), iv.scale(1, 2.0), iv.add(1, 1.0, mask=jnp.array([True, False])))
    np.testing.assert_array_equal(chained(z)[:, 1], [11.0, 10.0])


def test_normalised_sae_maps_the_change_back_to_raw_space():
    ae, params, _ = setup()
    raw = 3.0 + 4.0 * jax.random.normal(jax.random.key(5), (2, 5, 16))
    norm = estimate_normalization(raw.reshape(-1, 16))
    edited = iv.sae_edit(ae, params, iv.set_to(11, 2.0), norm=norm)(raw)
    f = ae.encode(params, norm.apply(raw.reshape(-1, 16)))[:, 11].reshape(2, 5)
    expected = raw + norm.scalar * (2.0 - f)[..., None] * params.w_dec[11]
    np.testing.assert_allclose(edited, expected, rtol=1e-5, atol=1e-4)


def test_new_values_and_latents_do_not_recompile():
    ae, params, resid = setup()

    @jax.jit
    def run(edit, resid):
        return edit(resid)

    outs = [run(iv.sae_edit(ae, params, iv.set_to(latent, value)), resid) for latent, value in ((1, 0.0), (7, 2.0), (30, -4.0))]
    outs.append(run(iv.sae_edit(ae, params, iv.set_to(2, 1.0, mask=jnp.ones((2, 5), bool))), resid))
    outs.append(run(iv.sae_edit(ae, params, iv.set_to(3, 1.0, mask=jnp.zeros((2, 5), bool))), resid))
    assert run._cache_size() == 2  # one without a mask, one with
    assert not np.array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[-1], resid)


def test_vmap_over_latents_and_values():
    ae, params, resid = setup()
    latents, values = jnp.array([1, 7, 30]), jnp.array([0.0, 2.0, -4.0])
    batched = jax.vmap(lambda i, v: iv.sae_edit(ae, params, iv.set_to(i, v))(resid))(latents, values)
    for j in range(3):
        np.testing.assert_allclose(batched[j], iv.sae_edit(ae, params, iv.set_to(int(latents[j]), float(values[j])))(resid),
                                   rtol=1e-6, atol=1e-6)
    grid = jax.vmap(lambda v: iv.sae_edit(ae, params, iv.set_to(11, v))(resid))(jnp.linspace(-2, 2, 5))
    assert grid.shape == (5, 2, 5, 16)


def test_direction_edit():
    resid = jnp.zeros((2, 3, 4))
    direction = jnp.array([1.0, 0.0, 0.0, 0.0])
    mask = jnp.array([True, False, True])
    out = iv.direction_edit(direction, 2.0, mask=mask)(resid)
    np.testing.assert_array_equal(out[:, :, 0], [[2.0, 0.0, 2.0]] * 2)
    np.testing.assert_array_equal(out[:, :, 1:], 0.0)
    # Gradients flow into the edit's numbers.
    g = jax.grad(lambda s: jnp.sum(iv.direction_edit(direction, s)(resid)))(1.0)
    assert float(g) == 6.0


def test_edits_compose_with_the_backbone_forward_under_jit():
    import os

    from saejax import backbones

    bb, bb_params = backbones.load(os.path.join(os.path.dirname(__file__), "fixtures", "backbones", "vit"), cache_dir=False)
    ae = sae.topk(bb.d_model, 4 * bb.d_model, k=8)
    params = ae.init(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, bb.image_size, bb.image_size, 3))
    patches = jnp.zeros(bb.layout.n_tokens, bool).at[bb.layout.patches[0]:bb.layout.patches[1]].set(True)

    @jax.jit
    def logits_with(edit, images):
        return bb.forward(bb_params, images, edits={1: edit}).logits

    plain = bb.forward(bb_params, images)
    np.testing.assert_array_equal(logits_with(iv.sae_edit(ae, params, iv.scale(3, 1.0)), images),
                                  jax.jit(lambda x: bb.forward(bb_params, x).logits)(images))
    edit = iv.sae_edit(ae, params, iv.set_to(3, 5.0, mask=patches))
    resid = bb.forward(bb_params, images, capture=(1,)).captured[1]
    by_hand = bb.readout(bb_params, bb.run_blocks(bb_params, edit(resid), 2, bb.n_layers))[2]
    np.testing.assert_allclose(logits_with(edit, images), by_hand, rtol=1e-5, atol=1e-5)
    assert not np.allclose(by_hand, plain.logits)
    logits_with(iv.sae_edit(ae, params, iv.set_to(9, -2.0, mask=patches)), images)
    assert logits_with._cache_size() == 2  # one per mask structure, none per value

    # A dose-response curve in one call: vmap over the value.
    curve = jax.jit(jax.vmap(lambda v: logits_with(iv.sae_edit(ae, params, iv.set_to(3, v, mask=patches)), images)))(
        jnp.array([0.0, 5.0]))
    np.testing.assert_allclose(curve[1], by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda i: iv.set_to(i, -2.0), lambda i: iv.set_to(i, 0.0, where_active=True),
                                  lambda i: iv.scale(i, 0.0), lambda i: iv.add(i, 5.0), lambda i: iv.ablate(i),
                                  lambda i: iv.chain(iv.scale(3, 2.0), iv.ablate(i))],
                         ids=["set", "where_active", "scale", "add", "ablate", "chain"])
def test_out_of_range_latent_ids_are_errors_never_no_ops_or_wraps(make):
    ae, params, resid = setup()  # d_sae = 64
    for latent in (64, 1000):
        with pytest.raises(ValueError, match=f"latent id {latent} is out of range for an SAE with d_sae=64"):
            iv.sae_edit(ae, params, make(latent))
        with pytest.raises(ValueError, match=f"latent id {latent} is out of range"):  # built without an SAE, applied
            jax.jit(lambda r: iv.SAEEdit(ae, params, make(latent))(r))(resid)  # noqa: B023
    for latent in (-1, -65):
        with pytest.raises(ValueError, match=f"latent id {latent} is negative"):
            make(latent)
    with pytest.raises(TypeError, match="latent ids must be integers, got 3.7"):
        make(3.7)


def test_traced_out_of_range_ids_edit_nothing_and_are_flagged_by_checkify():
    from jax.experimental import checkify

    ae, params, resid = setup()

    def run(latent):
        return iv.sae_edit(ae, params, iv.set_to(latent, 5.0))(resid)

    checked = checkify.checkify(jax.jit(run), errors=checkify.user_checks)
    err, out = checked(jnp.int32(7))
    assert err.get() is None and not np.allclose(out, resid)
    for latent in (64, -1):  # -1 must not wrap to 63
        np.testing.assert_array_equal(jax.jit(run)(jnp.int32(latent)), resid)
        err, out = checked(jnp.int32(latent))
        with pytest.raises(checkify.JaxRuntimeError, match="latent id out of range for d_sae=64"):
            err.throw()


def test_the_old_name_set_still_works_for_one_release_and_says_so():
    with pytest.warns(DeprecationWarning, match="saejax.interventions.set is deprecated .*: use set_to"):
        old = iv.set
    assert old is iv.set_to
    with pytest.raises(AttributeError, match="has no attribute 'sett'"):
        iv.sett  # noqa: B018
