"""Export to saev's sae.pt and SAELens' directory: read back, the codes and reconstructions are
the saejax SAE's (normalisation folded in), for every architecture each format has."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import sae
from saejax.checkpoint import CheckpointError, import_saev
from saejax.checkpoint.export import export_saelens, export_saev, import_saelens
from saejax.core.normalization import estimate_normalization


def trained_like(ae, seed=0):
    params = ae.init(jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    params = params.replace(b_enc=0.1 * jax.random.normal(keys[0], (ae.d_sae,)),
                            b_dec=0.5 * jax.random.normal(keys[1], (ae.d_model,)))
    if params.threshold is not None:
        params = params.replace(threshold=jnp.full((ae.d_sae,), 0.05))
    return params


ARCHITECTURES = {"relu": sae.relu(8, 32), "topk": sae.topk(8, 32, k=4), "batchtopk": sae.batchtopk(8, 32, k=4),
                 "jumprelu": sae.jumprelu(8, 32)}


def same_sae(ae, params, norm, other_ae, other_params):
    x = 3 * jax.random.normal(jax.random.key(7), (20, 8)) + 1
    z = ae.encode(params, x if norm is None else norm.apply(x))
    x_hat = ae.decode(params, z)
    x_hat = x_hat if norm is None else norm.invert(x_hat)
    np.testing.assert_allclose(other_ae.encode(other_params, x), z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(other_ae.decode(other_params, other_ae.encode(other_params, x)), x_hat, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk"])
@pytest.mark.parametrize("normalized", [False, True])
def test_saev_export_reads_back_as_the_same_sae(tmp_path, name, normalized):
    ae = ARCHITECTURES[name]
    params = trained_like(ae)
    norm = estimate_normalization(2 * jax.random.normal(jax.random.key(3), (64, 8)) + 0.5) if normalized else None
    path = export_saev(tmp_path / "sae.pt", ae, params, normalization=norm)
    other_ae, other_params, info = import_saev(path)
    assert (other_ae.architecture, info["schema"], info["forward"]) == (name, 5, "no_b_dec")
    same_sae(ae, params, norm, other_ae, other_params)


@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_export_reads_back_as_the_same_sae(tmp_path, name):
    ae = ARCHITECTURES[name]
    params = trained_like(ae)
    norm = estimate_normalization(2 * jax.random.normal(jax.random.key(3), (64, 8)) + 0.5)
    directory = export_saelens(tmp_path / "sae", ae, params, normalization=norm,
                               metadata={"model_name": "openai/clip-vit-base-patch16", "hook_name": "block_10"})
    other_ae, other_params, info = import_saelens(directory)
    assert info["config"]["architecture"] == {"relu": "standard", "topk": "topk"}.get(name, "jumprelu")
    assert info["config"]["metadata"]["hook_name"] == "block_10"
    same_sae(ae, params, norm, other_ae, other_params)


def test_what_a_format_cannot_hold_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="saev has no jumprelu SAE"):
        export_saev(tmp_path / "a.pt", ARCHITECTURES["jumprelu"], trained_like(ARCHITECTURES["jumprelu"]))
    ae = ARCHITECTURES["batchtopk"]
    uneven = trained_like(ae).replace(threshold=jnp.linspace(0, 1, 32))
    with pytest.raises(ValueError, match="saev's BatchTopK keeps one threshold"):
        export_saev(tmp_path / "b.pt", ae, uneven)
    with pytest.raises(CheckpointError, match="cfg.json: missing"):
        import_saelens(tmp_path / "nothing")
