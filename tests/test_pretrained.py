"""load_pretrained: saev's published SAEs through the hub cache (offline here), with the
normalisation each needs attached, and a clear error when a file is neither cached nor reachable."""

import os
import shutil

from huggingface_hub import constants as hub_constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.checkpoint import CheckpointError, load_pretrained, load_sae, save_sae
from saejax.checkpoint.pretrained_stats import DINOV2_IN1K_MEAN
from saejax.core.normalization import Normalization
from test_saev_import import SAE_PT, _random_sae, _write_torch_sae


def cache_with(cache, repo_id, file_path):
    """Lay out a file the way huggingface_hub caches it: refs/main -> snapshots/<commit>/sae.pt."""
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"))
    os.makedirs(os.path.join(folder, "snapshots", "0123abcd"))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write("0123abcd")
    shutil.copy(file_path, os.path.join(folder, "snapshots", "0123abcd", "sae.pt"))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_dinov2_sae_comes_with_saev_statistics(tmp_path, offline):
    arrays = _random_sae(d=768, f=768)
    sae_pt = _write_torch_sae(tmp_path / "sae.pt", arrays, config={"d_vit": 768, "exp_factor": 1})
    cache_with(tmp_path / "hub", "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K", sae_pt)
    ae, params, info = load_pretrained("osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K", cache_dir=tmp_path / "hub")
    assert (ae.d_model, info["backbone"], info["layer"]) == (768, "facebook/dinov2-with-registers-base", 10)
    norm = info["normalization"]
    assert float(norm.scalar) == pytest.approx(2.0181241035461426) and norm.clip == (-1e-5, 1e5)
    assert float(norm.mean[0]) == pytest.approx(0.1450997292995453) and norm.mean.shape == (768,)
    x = jnp.asarray(np.linspace(-3, 3, 768, dtype=np.float32))[None]
    want = (np.clip(np.asarray(x), -1e-5, 1e5) - np.asarray(DINOV2_IN1K_MEAN, np.float32)) / 2.0181241035461426
    np.testing.assert_allclose(norm.apply(x), want, rtol=1e-6)
    np.testing.assert_array_equal(params.w_enc, arrays["W_enc"])
    # The clip survives saejax's portable format.
    _, _, again = load_sae(save_sae(tmp_path / "portable", ae, params, normalization=norm))
    assert again["normalization"].clip == (-1e-5, 1e5)


def test_clip_sae_reads_raw_activations(tmp_path, offline):
    cache_with(tmp_path / "hub", "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K", SAE_PT)
    ae, _, info = load_pretrained("osunlp/SAE_CLIP_24K_ViT-B-16_IN1K", cache_dir=tmp_path / "hub")
    assert info["normalization"] is None and info["backbone"] == "openai/clip-vit-base-patch16"
    assert info["repo_id"] == "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K" and ae.d_sae == 64


def test_an_uncached_sae_offline_is_a_clear_error(tmp_path, offline):
    with pytest.raises(CheckpointError, match=r"osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21/sae.pt: not in the cache "
                                              + str(tmp_path / "empty") + r" and the hub is unreachable "
                                              r"\(HF_HUB_OFFLINE is set\)"):
        load_pretrained("osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21", cache_dir=tmp_path / "empty")
    cache_with(tmp_path / "hub", "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K", SAE_PT)  # a 16-wide SAE
    with pytest.raises(CheckpointError, match="the SAE reads d_model=16, saev's DINOv2 statistics have 768"):
        load_pretrained("osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K", cache_dir=tmp_path / "hub")


def test_normalization_clip_is_static_and_jits():
    norm = Normalization(jnp.zeros(4), jnp.asarray(2.0), (-1.0, 1.0))
    out = jax.jit(lambda n, x: n.apply(x))(norm, jnp.asarray([[-5.0, 0.5, 3.0, 0.0]]))
    np.testing.assert_allclose(out, [[-0.5, 0.25, 0.5, 0.0]])


def test_a_clipping_normalization_is_not_folded():
    from saejax import sae
    from saejax.core.normalization import fold_normalization

    ae = sae.relu(4, 8)
    with pytest.raises(ValueError, match=r"clips activations to \(-1.0, 1.0\) cannot be folded"):
        fold_normalization(ae.init(jax.random.key(0)), Normalization(jnp.zeros(4), jnp.asarray(2.0), (-1.0, 1.0)))
