"""Checks that need 8 (fake CPU) devices; run by test_multidevice.py in a fresh process.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_checks.py NAME
"""

import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS first"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from saejax import activations as acts  # noqa: E402
from saejax import sharding as shd  # noqa: E402


def check_buffer_sharded_equals_unsharded():
    assert jax.device_count() == 8
    rows = jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4)
    ids = jnp.arange(64, dtype=jnp.int32)
    results = []
    for mesh in (None, shd.make_mesh(data=2), shd.make_mesh()):
        buf = acts.ShuffleBuffer.create(64, 4, mesh=mesh)
        for c in range(4):
            buf = jax.jit(acts.push)(buf, rows[c * 16:(c + 1) * 16], ids[c * 16:(c + 1) * 16], ids[c * 16:(c + 1) * 16])
        buf = jax.jit(acts.shuffle)(buf, jax.random.key(0))
        if mesh is not None:
            assert buf.rows.sharding.spec == shd.spec("batch", None), buf.rows.sharding
            assert len(buf.rows.sharding.device_set) == mesh.size
        taken = []
        for _ in range(8):
            buf, batch = jax.jit(acts.take, static_argnums=1)(buf, 8)
            taken.append(np.asarray(batch.acts[0]))
        results.append(np.concatenate(taken))
    assert sorted(results[0][:, 0] // 4) == list(range(64))
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


if __name__ == "__main__":
    globals()[f"check_{sys.argv[1]}"]()
    print("ok")

