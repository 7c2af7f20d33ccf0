"""The Gated SAE against SAELens' `GatedTrainingSAE` (golden `fixtures/gated_sae.npz`, made by
`fixtures/make_gated_fixture.py`), and through sweeps, checkpoints and the portable formats."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import sae, train
from saejax.checkpoint import TrainCheckpointer, load_sae, save_sae
from saejax.checkpoint.export import export_saelens, import_saelens
from saejax.core.losses import Objective
from saejax.core.normalization import Normalization

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
G = np.load(os.path.join(FIXTURES, "gated_sae.npz"))
D = 8


def golden_params():
    return sae.SAEParams(w_enc=jnp.asarray(G["W_enc"]), b_enc=jnp.asarray(G["b_gate"]), w_dec=jnp.asarray(G["W_dec"]),
                         b_dec=jnp.asarray(G["b_dec"]), r_mag=jnp.asarray(G["r_mag"]), b_mag=jnp.asarray(G["b_mag"]))


def test_forward_matches_saelens():
    ae, params, x = sae.gated(D, 16), golden_params(), jnp.asarray(G["x"])
    enc = ae.encode_train(params, x)
    np.testing.assert_allclose(enc.z, G["feature_acts"], atol=1e-5)
    np.testing.assert_allclose(ae.encode(params, x), G["feature_acts"], atol=1e-5)
    np.testing.assert_allclose(ae(params, x), G["sae_out"], atol=1e-5)
    pi_mag = (enc.pre_acts - params.b_enc) * jnp.exp(params.r_mag) + params.b_mag  # SAELens' hidden_pre
    np.testing.assert_allclose(pi_mag, G["hidden_pre"], atol=1e-5)
    assert 0 < float(jnp.mean(enc.z > 0)) < 1  # the gate closes some latents and opens others


def test_loss_terms_and_gradients_match_saelens():
    """saejax averages the squared errors over dimensions too, where SAELens sums them, so with
    the coefficient divided by D every term and every gradient is SAELens' over D."""
    ae, params, x = sae.gated(D, 16, aux_decoder_grad=True), golden_params(), jnp.asarray(G["x"])
    objective = Objective(sparsity="l1_decoder_norm")

    def loss(p):
        return objective(ae, p, x, sparsity_coeff=0.3 / D)

    (value, (_, terms)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert float(terms.reconstruction) * D == pytest.approx(float(G["mse_loss"]), rel=1e-5)
    assert float(terms.sparsity) * D == pytest.approx(float(G["l1_loss"]), rel=1e-5)
    assert float(terms.auxiliary) * D == pytest.approx(float(G["auxiliary_reconstruction_loss"]), rel=1e-5)
    assert float(value) * D == pytest.approx(float(G["loss"]), rel=1e-5)
    for ours, theirs in (("w_enc", "W_enc"), ("b_enc", "b_gate"), ("r_mag", "r_mag"), ("b_mag", "b_mag"),
                         ("w_dec", "W_dec"), ("b_dec", "b_dec")):
        np.testing.assert_allclose(getattr(grads, ours) * D, G[f"grad_{theirs}"], rtol=1e-4, atol=1e-5, err_msg=ours)

    # The paper's choice (the default): the auxiliary reconstruction does not train the decoder.
    frozen = jax.grad(lambda p: objective(sae.gated(D, 16), p, x, sparsity_coeff=0.3 / D)[0])(params)
    for name in ("w_enc", "b_enc", "r_mag", "b_mag"):
        np.testing.assert_allclose(getattr(frozen, name), getattr(grads, name), rtol=1e-5, atol=1e-7)
    assert not np.allclose(frozen.w_dec, grads.w_dec, atol=1e-4)


def test_reads_saelens_own_directory():
    ae, params, info = import_saelens(os.path.join(FIXTURES, "gated_saelens"))
    assert ae.architecture == "gated" and info["config"]["architecture"] == "gated"
    np.testing.assert_allclose(ae.encode(params, jnp.asarray(G["x"])), G["feature_acts"], atol=1e-5)


def test_sweep_training_checkpoint_portable_and_saelens_round_trips(tmp_path):
    ae = sae.gated(D, 32)
    trainer = train.make_trainer(ae, objective=Objective(sparsity="l1"), dead_after_tokens=64, resample_every=3)
    hparams = train.Hparams.grid(learning_rate=(1e-3, 3e-3), sparsity_coeff=(1e-2,))
    states = trainer.init_sweep(jax.random.key(0), hparams)
    assert states.params.r_mag.shape == (2, 32) and states.params.b_mag.shape == (2, 32)
    x = jax.random.normal(jax.random.key(1), (64, D))
    step = jax.jit(trainer.sweep_step)
    for _ in range(5):
        states, metrics = step(states, x)
    assert np.all(np.isfinite(metrics["loss"])) and np.all(metrics["auxiliary"] > 0)
    assert not np.allclose(states.params.r_mag, 0.0)  # the magnitude path trains
    states, count = jax.jit(trainer.sweep_resample)(states, x)  # resampling handles the extra params

    ckpt = TrainCheckpointer(str(tmp_path / "ckpt"))
    ckpt.save(5, {"0": states}, config={"sae": ae.to_config()})
    ckpt.wait_until_finished()
    restored = ckpt.restore({"0": states}).state["0"]
    ckpt.close()
    for a, b in zip(jax.tree.leaves((states.params, states.opt_state)),
                    jax.tree.leaves((restored.params, restored.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)

    member = train.member(states, 1).params
    norm = Normalization(mean=jnp.linspace(-1, 1, D), scalar=jnp.asarray(2.0))
    save_sae(tmp_path / "portable", ae, member, normalization=norm)
    loaded_ae, loaded, info = load_sae(tmp_path / "portable")
    assert loaded_ae == ae and loaded_ae.to_config() == {"architecture": "gated", "d_model": D, "d_sae": 32,
                                                        "tied_init": False, "gated_aux_decoder_grad": False}
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)

    export_saelens(tmp_path / "saelens", ae, member, normalization=norm)
    raw_ae, raw, _ = import_saelens(tmp_path / "saelens")
    raw_x = 3.0 * x
    np.testing.assert_allclose(raw_ae.encode(raw, raw_x), ae.encode(member, norm.apply(raw_x)), atol=1e-5)


def test_missing_gated_params_are_named():
    ae = sae.gated(D, 16)
    with pytest.raises(ValueError, match="missing 'r_mag' \\(needed by gated\\)"):
        ae.check_params(golden_params().replace(r_mag=None))
    assert {"relu", "topk", "batchtopk", "jumprelu", "gated"} <= set(sae.architectures())
