"""bf16 compute with float32 state: the SAE step (`SAE.compute_dtype`) and the backbone harvest
(`backbones.load(dtype=jnp.bfloat16)`)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import backbones, sae, train
from saejax.datasets import synthetic
from saejax.core.losses import Objective
from saejax.core.normalization import estimate_normalization

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


def _dots(hlo_text):
    """`(lhs, rhs, out)` element types of every dot_general in StableHLO text."""
    return re.findall(r"dot_general .*: \(tensor<[\dx]*x?(\w+)>, tensor<[\dx]*x?(\w+)>\) -> tensor<[\dx]*x?(\w+)>",
                      hlo_text)


def test_relu_step_runs_all_five_matmuls_in_bf16_and_keeps_float32_state():
    d, f, n = 64, 256, 512
    hparams = train.Hparams.of(1e-3, 4e-4)
    x = jax.random.normal(jax.random.key(1), (n, d))
    plain, mixed = (train.make_trainer(sae.relu(d, f, compute_dtype=cd)) for cd in (None, jnp.bfloat16))
    state = plain.init(jax.random.key(0), hparams)
    dots = _dots(jax.jit(mixed.step).lower(state, x).as_text())
    matmuls = [t for t in dots if t[2] == "f32" and t[:2] == ("bf16", "bf16")]
    assert len(matmuls) == 5, dots  # x@W_enc, z@W_dec and the three gradient matmuls
    assert all(t == ("f32", "f32", "f32") for t in dots if t not in matmuls)  # the b_dec gradient's vector product
    assert not any("bf16" in t for t in _dots(jax.jit(plain.step).lower(state, x).as_text()))

    new, metrics = jax.jit(mixed.step)(state, x)
    assert {leaf.dtype for leaf in jax.tree.leaves((new.params, new.opt_state))} == {jnp.dtype(jnp.float32),
                                                                                       jnp.dtype(jnp.int32)}
    assert metrics["loss"].dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(new.params.w_dec, axis=1), 1.0, atol=1e-6)  # renormalised in float32


def test_bf16_gradients_are_close_to_float32():
    d, f = 32, 128
    x = jax.random.normal(jax.random.key(1), (256, d))
    params = sae.relu(d, f).init(jax.random.key(0))

    def grads(ae):
        return jax.grad(lambda p: jnp.mean((ae(p, x) - x) ** 2))(params)

    g32, g16 = grads(sae.relu(d, f)), grads(sae.relu(d, f, compute_dtype="bfloat16"))
    for name in ("w_enc", "w_dec", "b_enc", "b_dec"):
        a, b = getattr(g32, name), getattr(g16, name)
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
        assert 0 < rel < 2e-2, (name, rel)  # bf16 has 8 bits of mantissa: close, but not equal


def test_compute_dtype_is_checked_and_left_out_of_the_config():
    assert sae.relu(8, 16, compute_dtype=jnp.float32).compute_dtype is None
    assert sae.topk(8, 16, k=2, compute_dtype="bfloat16").compute_dtype == jnp.dtype(jnp.bfloat16)
    assert "compute_dtype" not in sae.relu(8, 16, compute_dtype=jnp.bfloat16).to_config()
    with pytest.raises(ValueError, match="compute_dtype must be a float dtype such as bfloat16, got 'int8'"):
        sae.relu(8, 16, compute_dtype="int8")


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_bf16_training_recovers_the_same_planted_features(architecture):
    """The same SAE, init and data in both precisions on the planted-feature world: the bf16 run
    ends within 2% (relative) of float32's NMSE, and each planted feature is matched by the same
    latent; TopK recovers every feature in both."""
    d, g, f, b, steps = 32, 64, 128, 512, 600
    world = synthetic.make_world(jax.random.key(0), d_model=d, n_features=g, mean_active=2.0)
    norm = estimate_normalization(world.sample(jax.random.key(1), 8192))
    sample = jax.jit(lambda key: norm.apply(world.sample(key, b)))
    held_out = norm.apply(world.sample(jax.random.key(5), 8192))
    results = []
    for compute_dtype in (None, jnp.bfloat16):
        if architecture == "topk":
            ae = sae.topk(d, f, k=4, compute_dtype=compute_dtype)
            objective, hparams = Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=32), train.Hparams.of(3e-3)
        else:
            ae = sae.relu(d, f, compute_dtype=compute_dtype)
            objective, hparams = Objective(sparsity="l1", sparsity_warmup_steps=100), train.Hparams.of(3e-3, 3e-2)
        trainer = train.make_trainer(ae, objective=objective, warmup_steps=50, dead_after_tokens=100_000)
        state = trainer.init(jax.random.key(3), hparams, b_dec=sae.data_mean(sample(jax.random.key(2))))
        step = jax.jit(trainer.step, donate_argnums=0)
        for i in range(steps):
            state, _ = step(state, sample(jax.random.fold_in(jax.random.key(4), i)))
        x_hat = ae(state.params, held_out)
        nmse = float(jnp.sum((x_hat - held_out) ** 2) / jnp.sum((held_out - held_out.mean(0)) ** 2))
        rows = state.params.w_dec / jnp.linalg.norm(state.params.w_dec, axis=1, keepdims=True)
        cosines = jnp.abs(world.features @ rows.T)
        results.append((nmse, np.asarray(jnp.argmax(cosines, axis=1)), np.asarray(jnp.max(cosines, axis=1))))
    (nmse32, match32, best32), (nmse16, match16, best16) = results
    assert abs(nmse16 - nmse32) / nmse32 < 0.02, (nmse32, nmse16)
    assert np.mean(match16 == match32) >= 0.9
    if architecture == "topk":
        assert best32.min() > 0.9 and best16.min() > 0.9  # every planted feature recovered in both


@pytest.mark.parametrize("case, dense_per_block", [("clip_vision", 6), ("dinov2", 6), ("dinov3", 6), ("siglip", 6)])
def test_bf16_harvest_runs_dense_matmuls_in_bf16_and_keeps_the_residual_float32(case, dense_per_block):
    """`load(dtype=bfloat16)`: every dense layer's matmul (q, k, v, o, fc1, fc2 per block) takes
    bf16 inputs and returns float32; the attention scores, norms and the residual stream stay
    float32, as under torch.autocast. The captured residuals stay within 2% of PyTorch's."""
    directory = os.path.join(FIXTURES, case)
    golden = np.load(os.path.join(FIXTURES, f"{case}.npz"))
    size = golden["pixel_values"].shape[1]
    bb, params = backbones.load(directory, dtype=jnp.bfloat16, cache_dir=False, image_size=size)
    x = golden["pixel_values"]
    forward = jax.jit(lambda p, im: bb.forward(p, im, capture=(0, 1, 2), full=False))
    dots = _dots(forward.lower(params, x).as_text())
    low = [t for t in dots if t[:2] == ("bf16", "bf16")]
    assert len(low) == dense_per_block * 3 and all(t[2] == "f32" for t in low), dots
    assert all(t == ("f32", "f32", "f32") for t in dots if t not in low)  # attention scores and values
    out = forward(params, x)
    for i in range(3):
        resid, want = np.asarray(out.captured[i]), golden["hidden_states"][i + 1]
        assert resid.dtype == np.float32
        rel = np.linalg.norm(resid - want) / np.linalg.norm(want)
        assert 1e-5 < rel < 2e-2, (i, rel)


def test_configs_choose_bf16_on_accelerators_and_float32_on_cpu():
    import ml_collections

    from saejax.configs import clip_vit_b16
    from saejax.cli.builders import build_trainer, compute_dtype

    assert jax.default_backend() == "cpu"
    assert compute_dtype("auto") == jnp.float32 and compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype 'fp16': expected 'float32', 'bfloat16' or 'auto'"):
        compute_dtype("fp16")
    paper = clip_vit_b16.get_config()
    assert paper.backbone.dtype == "auto" and paper.sae.compute_dtype == "auto"
    config = ml_collections.ConfigDict(dict(paper))
    config.sae.update(expansion=2, compute_dtype="bfloat16")
    trainer, _ = build_trainer(config, d_model=16)
    assert trainer.ae.compute_dtype == jnp.bfloat16 and trainer.ae.d_sae == 32
