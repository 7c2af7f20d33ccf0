"""Checks that need 8 (fake CPU) devices; run by test_multidevice.py in a fresh process.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python tests/multidevice_checks.py NAME
"""

import os
import re
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS first"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from saejax.core.sweep_step import jit_sweep_step  # noqa: E402
from saejax import activations as acts  # noqa: E402
from saejax import sharding as shd  # noqa: E402


COLLECTIVES = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(")


def collectives(compiled_text):
    """[(result type, collective)] of a compiled HLO module."""
    return [(m.group(1), m.group(2)) for m in COLLECTIVES.finditer(compiled_text)]


def check_buffer_sharded_equals_unsharded():
    assert jax.device_count() == 8
    rows = jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4)
    ids = jnp.arange(64, dtype=jnp.int32)
    results = []
    for mesh in (None, shd.make_mesh(data=2), shd.make_mesh(data=2, model=4), shd.make_mesh()):
        buf = acts.ShuffleBuffer.create(64, 4, groups=8, mesh=mesh)
        for c in range(4):
            buf = jax.jit(acts.push)(buf, rows[c * 16:(c + 1) * 16], ids[c * 16:(c + 1) * 16], ids[c * 16:(c + 1) * 16])
        buf = jax.jit(acts.shuffle)(buf, jax.random.key(0))
        take = jax.jit(acts.take, static_argnums=1)
        if mesh is not None:
            assert buf.rows.sharding.is_equivalent_to(shd.batch_sharding(mesh, 3), 3), buf.rows.sharding
            # Each device holds 8 / data whole groups: 8 / data * 8 rows.
            assert {s.data.shape for s in buf.rows.addressable_shards} == {(8 // mesh.shape["data"], 8, 4)}
            # Pushing, shuffling and reading are per device: no collective at all.
            for fn, args in ((jax.jit(acts.push), (buf, rows[:16], ids[:16], ids[:16])),
                             (jax.jit(acts.shuffle), (buf, jax.random.key(1))), (take, (buf, 8))):
                assert collectives(fn.lower(*args).compile().as_text()) == [], fn
        taken = []
        for _ in range(8):
            buf, batch = take(buf, 8)
            if mesh is not None:  # batches come out split over `data`: B / data rows per device
                assert batch.acts[0].sharding.is_equivalent_to(shd.batch_sharding(mesh, 2), 2)
                assert {s.data.shape for s in batch.acts[0].addressable_shards} == {(8 // mesh.shape["data"], 4)}
            taken.append(np.asarray(batch.acts[0]))
        results.append(np.concatenate(taken))
    assert sorted(results[0][:, 0] // 4) == list(range(64))
    # Group g holds pushed rows 2g, 2g+1 of each push of 16: every batch takes one row per group.
    np.testing.assert_array_equal((results[0][:8, 0] // 4) % 16 // 2, np.arange(8))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def check_mesh_shapes():
    mesh = shd.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    assert dict(shd.make_mesh(data=2, model=4).shape) == {"data": 2, "model": 4}
    try:
        shd.make_mesh(data=4, model=4)
    except ValueError as e:
        assert "needs 16 devices; 8 available" in str(e)
    else:
        raise AssertionError("expected an error")


def check_harvest_sharded_equals_unsharded():
    from saejax import backbones

    bb, params = backbones.load(os.path.join(os.path.dirname(__file__), "fixtures", "backbones", "clip_vision"),
                                cache_dir=False)
    images = jax.random.normal(jax.random.key(0), (8, bb.image_size, bb.image_size, 3))
    ids = jnp.arange(8, dtype=jnp.int32) + 100
    plain = acts.make_harvest(bb, (0, 2), tokens="patches")(params, images, ids)
    for data in (1, 2, 8):
        mesh = shd.make_mesh(data=data)
        out = acts.make_harvest(bb, (0, 2), tokens="patches", mesh=mesh)(params, images, ids)
        assert len(out.acts[2].sharding.device_set) == data and out.acts[2].sharding.spec == shd.spec("batch", None)
        for layer in (0, 2):
            np.testing.assert_allclose(out.acts[layer], plain.acts[layer], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.image_ids, plain.image_ids)
        np.testing.assert_array_equal(out.token_ids, plain.token_ids)


def check_backbones_run_under_explicit_sharding_axes():
    """Every family's forward on a mesh with Explicit axes, the batch split over 8 devices:
    each device holds (and computes, with no collective) the residuals of its own images."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from saejax import backbones

    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    for case in ("clip_full", "dinov2_registers", "dinov2_swiglu", "vit", "siglip", "siglip2_naflex", "dinov3"):
        bb, params = backbones.load(os.path.join(fixtures, case), cache_dir=False)
        images = jax.random.normal(jax.random.key(0), (16, bb.image_size, bb.image_size, 3))
        plain = bb.forward(params, images, capture=(1,))
        with jax.set_mesh(mesh):
            fwd = jax.jit(lambda p, x: bb.forward(p, x, capture=(1,), edits={0: lambda r: r * 0.5}))
            args = (jax.device_put(params, NamedSharding(mesh, PartitionSpec())),
                    jax.device_put(images, NamedSharding(mesh, PartitionSpec("data"))))
            out = fwd(*args)
            hlo = fwd.lower(*args).compile().as_text()
        assert out.captured[1].sharding.spec == PartitionSpec("data", None, None), (case, out.captured[1].sharding)
        assert collectives(hlo) == [], (case, collectives(hlo))
        edited = bb.forward(params, images, capture=(1,), edits={0: lambda r: r * 0.5})
        for shard in out.captured[1].addressable_shards:
            rows = shard.index[0]
            assert shard.data.shape[0] == 2, case
            np.testing.assert_allclose(shard.data, edited.captured[1][rows], atol=1e-5, err_msg=case)
        assert not np.allclose(edited.captured[1], plain.captured[1])
    print("ok")


def _trainer(architecture):
    from saejax import sae, train
    from saejax.core.losses import Objective

    if architecture == "topk":
        ae, objective = sae.topk(16, 128, k=4), Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=8)
    else:
        ae, objective = sae.relu(16, 128), Objective(sparsity="l1")
    return train.make_trainer(ae, objective=objective, dead_after_tokens=200, warmup_steps=2, resample_every=4,
                              resample_until=8)


def check_sae_step_is_data_parallel():
    from saejax import train

    mesh = shd.make_mesh()
    for architecture in ("relu", "topk"):
        trainer = _trainer(architecture)
        states = trainer.init_sweep_sharded(jax.random.key(0), train.Hparams.grid([1e-3, 3e-3], [1e-3]), mesh)
        assert states.params.w_enc.sharding.is_fully_replicated  # data-parallel: parameters on every device
        step, _ = jit_sweep_step(trainer, states, mesh)
        compiled = step.lower(states, jax.ShapeDtypeStruct((96, 16), jnp.float32)).compile()
        # Each device is handed 96 / 8 = 12 rows of the batch ...
        batch_sharding = compiled.input_shardings[0][1]
        assert batch_sharding.shard_shape((96, 16)) == (12, 16), batch_sharding
        # ... and the gradients are summed over devices: the encoder's [2, 16, 128] gradient is all-reduced.
        found = collectives(compiled.as_text())
        assert any(kind == "all-reduce" and "16,128" in shape for shape, kind in found), found
        # No device gathers the batch (XLA would, for a top-k left to itself).
        assert not [c for c in found if c[1] == "all-gather"], found


def check_training_equals_one_device():
    from saejax import train

    xs = jax.random.normal(jax.random.key(1), (12, 96, 16))
    for architecture in ("relu", "topk"):
        trainer = _trainer(architecture)
        sweeps = [train.Hparams.grid([1e-3, 3e-3, 1e-2, 2e-2], [1e-3])]
        if architecture == "topk":  # a single SAE: latents split over `model`, distributed top-k
            sweeps.append(train.Hparams.grid([3e-3], [1e-3]))
        for hparams in sweeps:
            results = {}
            for data, model in ((1, 1), (8, 1), (2, 4)):  # one device, data parallel, data x model
                mesh = shd.make_mesh(data=data, model=model)
                states = trainer.init_sweep_sharded(jax.random.key(0), hparams, mesh)
                members = hparams.learning_rate.shape[0]
                if model == 4:  # 4 members spread over `model`; a single SAE splits its latents there
                    expected = ("model", None, None) if members == 4 else (None, None, "model")
                    assert tuple(states.params.w_enc.sharding.spec) == expected, states.params.w_enc.sharding
                step, resample = jit_sweep_step(trainer, states, mesh)
                if model == 4 and members == 1 and architecture == "topk":
                    # Distributed top-k: only the k candidates per latent shard cross devices, never [N, F].
                    gathered = [shape for shape, kind in collectives(step.lower(states, xs[0]).compile().as_text())
                                if kind == "all-gather"]
                    assert gathered and all(",128" not in shape for shape in gathered), gathered
                for t, x in enumerate(xs):
                    x = jax.device_put(x, shd.batch_sharding(mesh, 2))
                    states, _ = step(states, x)
                    if trainer.resample_due(t + 1):
                        states, _ = resample(states, x)
                results[(data, model)] = jax.device_get(states.params)
            for key, params in results.items():
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[(1, 1)])):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{architecture} {key}")


def check_frozen_member_on_a_data_model_mesh():
    """on_nonfinite="freeze" with members split over `model`: the same frozen member and the same
    parameters as on one device."""
    from saejax import loop, train

    trainer = train.make_trainer(_trainer("topk").ae, objective=_trainer("topk").objective, warmup_steps=0)
    xs = jax.random.normal(jax.random.key(1), (6, 96, 16))
    results = {}
    for data, model in ((1, 1), (2, 4)):
        mesh = shd.make_mesh(data=data, model=model)
        states = trainer.init_sweep_sharded(jax.random.key(0), train.Hparams.grid([1e30, 1e-3, 3e-3, 1e-2]), mesh)
        seen = []
        out = loop.fit(trainer, {0: states}, iter({0: x} for x in xs), steps=6, mesh=mesh, on_nonfinite="freeze",
                       hooks=[lambda step, m: seen.append(m[0]["frozen"].tolist())])  # noqa: B023
        assert seen[-1] == [True, False, False, False], seen
        results[(data, model)] = jax.device_get(out[0].params)
    for a, b in zip(jax.tree.leaves(results[(2, 4)]), jax.tree.leaves(results[(1, 1)])):
        assert np.all(np.isfinite(a[0]))  # the frozen member kept a finite (if wild) state
        np.testing.assert_allclose(a[1:], b[1:], rtol=1e-4, atol=1e-5)  # full lr from step 1: more drift


def check_binary_runs_and_resumes_on_eight_devices():
    import signal
    import tempfile

    from test_train_sae import final_params, run, run_until_checkpoint_then

    # The final evaluation is not what this checks (the parameters are): keep it small.
    tmp, steps_60 = tempfile.mkdtemp(), ("--config.total_tokens=15360", "--config.eval_images=16",
                                         "--config.fidelity.images=0")
    one_device = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = run(f"{tmp}/one", f"{tmp}/backbone", *steps_60, env=one_device)
    assert out.returncode == 0, out.stderr[-3000:]
    # Eight devices: stopped by SIGTERM after a checkpoint, then resumed to the end.
    code, _, stderr = run_until_checkpoint_then(signal.SIGTERM, f"{tmp}/eight", f"{tmp}/backbone", 20, *steps_60)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    out = run(f"{tmp}/eight", f"{tmp}/backbone", *steps_60)
    assert out.returncode == 0 and "resuming from step" in out.stdout, out.stderr[-3000:]
    for got, want in zip(final_params(f"{tmp}/eight"), final_params(f"{tmp}/one")):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def check_fidelity_sharded_equals_one_device():
    """Spliced fidelity on 8 devices: each device runs the forward passes of its eighth of the
    batch, the sums are all-reduced, and the numbers are one device's (10 images in batches of
    8: the last one is padded, and padding counts for nothing)."""
    from saejax import backbones, data, fidelity, sae
    from saejax.analysis.site import Site

    bb, params = backbones.load(os.path.join(os.path.dirname(__file__), "fixtures", "backbones", "clip_vision"),
                                cache_dir=False)
    rng = np.random.default_rng(0)
    source = data.ArraySource(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 3, 10))
    ae = sae.relu(bb.d_model, 64)
    sweep = jax.vmap(ae.init)(jax.random.split(jax.random.key(0), 2))
    head = fidelity.linear_probe_head(jax.random.normal(jax.random.key(1), (bb.d_model, 3)), jnp.zeros(3))
    site = Site(bb, params, layer=1, ae=ae, sae_params=sweep)
    one = fidelity.spliced_fidelity(site, source, head=head, batch_size=8, mesh=shd.make_mesh(1, 1, jax.devices()[:1]))
    mesh = shd.make_mesh(8)
    eight = fidelity.spliced_fidelity(site, source, head=head, batch_size=8, mesh=mesh)
    for a, b in zip(one, eight):
        assert a["n_images"] == b["n_images"] == 10
        for key, value in a.items():
            if isinstance(value, float):
                np.testing.assert_allclose(b[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    token_index = tuple(range(*bb.layout.patches))
    step = fidelity.sharded_fidelity_sums(token_index=token_index, head=head, mesh=mesh)
    images = jax.ShapeDtypeStruct((8, bb.image_size, bb.image_size, 3), jnp.float32)
    rows = jax.ShapeDtypeStruct((8,), jnp.float32)
    text = step.lower(site, images, jax.ShapeDtypeStruct((8,), jnp.int32), jnp.zeros(bb.d_model),
                      rows).compile().as_text()
    assert f"f32[1,{bb.image_size},{bb.image_size},3]" in text  # one image per device
    assert any(kind == "all-reduce" for _, kind in collectives(text))  # the sums, reduced over devices


if __name__ == "__main__":
    globals()[f"check_{sys.argv[1]}"]()
    print("ok")

