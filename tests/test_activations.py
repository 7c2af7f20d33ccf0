import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import activations as acts
from saejax import backbones, stream
from saejax.data.activations import ShuffleBuffer


def fill(buf, chunks):
    push = jax.jit(acts.push)
    for rows, img, tok in chunks:
        buf = push(buf, rows, img, tok)
    return buf


def chunks_of(n_chunks, rows_per_chunk, d=4, offset=0):
    for c in range(n_chunks):
        ids = offset + c * rows_per_chunk + np.arange(rows_per_chunk)
        yield jnp.asarray(np.repeat(ids[:, None], d, axis=1), jnp.float32), jnp.asarray(ids // 3), jnp.asarray(ids % 3)


def drain(buf, batch_size):
    take = jax.jit(acts.take, static_argnums=1)
    out = []
    while int(buf.remaining()) >= batch_size:
        buf, batch = take(buf, batch_size)
        out.append(np.asarray(batch.acts[0][:, 0]).astype(int))
        np.testing.assert_array_equal(batch.image_ids, out[-1] // 3)
        np.testing.assert_array_equal(batch.token_ids, out[-1] % 3)
    return buf, np.concatenate(out)


def test_every_pushed_row_comes_out_exactly_once_per_fill_in_a_seeded_order():
    buf = ShuffleBuffer.create(48, 4)
    buf = fill(buf, chunks_of(4, 12))
    assert bool(buf.full())
    _, first = drain(acts.shuffle(buf, jax.random.key(0)), 8)
    assert sorted(first) == list(range(48))
    assert list(first) != list(range(48))  # mixed
    _, again = drain(acts.shuffle(buf, jax.random.key(0)), 8)
    np.testing.assert_array_equal(first, again)
    _, other = drain(acts.shuffle(buf, jax.random.key(1)), 8)
    assert list(other) != list(first)

    # The next fill: new rows only, each once.
    buf = fill(buf.clear(), chunks_of(4, 12, offset=100))
    _, second = drain(acts.shuffle(buf, jax.random.key(2)), 16)
    assert sorted(second) == list(range(100, 148))


def test_partial_fill_is_read_once_and_overflow_is_dropped():
    buf = fill(ShuffleBuffer.create(40, 4), chunks_of(3, 12))  # 36 rows
    assert not bool(buf.full()) and int(buf.size) == 36
    _, rows = drain(acts.shuffle(buf, jax.random.key(0)), 6)
    assert sorted(rows) == list(range(36))
    buf = fill(buf, chunks_of(1, 12, offset=36))  # only 4 of these fit
    assert int(buf.size) == 40
    _, rows = drain(acts.shuffle(buf, jax.random.key(0)), 8)
    assert sorted(rows)[:36] == list(range(36)) and len(rows) == 40
    with pytest.raises(ValueError, match="pushing 50 rows into a buffer of capacity 40"):
        acts.push(buf, jnp.zeros((50, 4)), jnp.zeros(50, jnp.int32), jnp.zeros(50, jnp.int32))


def test_streaming_normalisation_estimate_per_layer():
    batches = [{4: 3.0 + jax.random.normal(jax.random.key(i), (64, 8)), 7: -jnp.ones((64, 8)) * i}
               for i in range(20)]
    norms = stream.estimate_layer_normalization(iter(batches), 320, jax.random.key(0))
    np.testing.assert_allclose(norms[4].mean, 3.0, atol=0.3)
    # Layer 7's rows are constant within a batch: the sample spans 10 batches (32 rows each).
    np.testing.assert_allclose(norms[7].mean, -np.mean(np.arange(10)), rtol=1e-6)
    with pytest.raises(ValueError, match="ended after 320 rows; 1000 were asked for"):
        stream.estimate_layer_normalization(iter(batches[:10]), 1000, jax.random.key(0))


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")


@pytest.fixture(scope="module")
def dinov2_registers():
    return backbones.load(FIXTURES + "/dinov2_registers", cache_dir=False)


@pytest.mark.parametrize("tokens", ["patches", "cls", "registers", "all"])
def test_harvest_selects_tokens_and_records_provenance(dinov2_registers, tokens):
    bb, params = dinov2_registers
    images = jax.random.normal(jax.random.key(0), (3, bb.image_size, bb.image_size, 3))
    ids = jnp.array([10, 11, 12])
    out = acts.make_harvest(bb, (1, 2), tokens=tokens)(params, images, ids)
    full = bb.forward(params, images, capture=(1, 2))
    selected = {"patches": np.arange(5, 14), "cls": np.array([0]), "registers": np.arange(1, 5),
                "all": np.arange(14)}[tokens]
    for layer in (1, 2):
        assert out.acts[layer].shape == (3 * len(selected), bb.d_model)
        expected = full.captured[layer][np.asarray(out.image_ids) - 10, np.asarray(out.token_ids)]
        np.testing.assert_allclose(out.acts[layer], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.image_ids, np.repeat([10, 11, 12], len(selected)))
    np.testing.assert_array_equal(out.token_ids, np.tile(selected, 3))


def test_harvest_errors(dinov2_registers):
    bb, _ = dinov2_registers
    with pytest.raises(ValueError, match=r"layer 3 out of range: this backbone has blocks 0..2"):
        acts.make_harvest(bb, (3,))
    with pytest.raises(ValueError, match="unknown token set 'patch'"):
        acts.make_harvest(bb, (1,), tokens="patch")
    clip, _ = backbones.load(FIXTURES + "/clip_vision", cache_dir=False)
    with pytest.raises(ValueError, match="no register tokens"):
        acts.make_harvest(clip, (1,), tokens="registers")
