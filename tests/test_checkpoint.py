import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saejax import sae, train
from saejax.checkpoint import CheckpointError, TrainCheckpointer, load_sae, save_sae
from saejax.core.losses import Objective
from saejax.core.normalization import estimate_normalization
from saejax.core.train import Hparams

from conftest import sparse_data

ARCHITECTURES = [sae.relu(8, 32), sae.topk(8, 32, k=4), sae.batchtopk(8, 32, k=4), sae.jumprelu(8, 32), sae.gated(8, 32)]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("ae", ARCHITECTURES, ids=lambda ae: ae.architecture)
def test_portable_round_trip(tmp_path, ae):
    params = ae.init(jax.random.key(0))
    norm = estimate_normalization(jax.random.normal(jax.random.key(1), (64, 8)) + 2.0)
    save_sae(tmp_path / "sae", ae, params, normalization=norm, info={"layer": 10, "backbone": "tiny"})
    ae2, params2, info = load_sae(tmp_path / "sae")
    assert ae2 == ae
    assert_trees_equal(params2, params)
    assert info["layer"] == 10 and info["backbone"] == "tiny"
    np.testing.assert_array_equal(info["normalization"].mean, norm.mean)
    np.testing.assert_array_equal(info["normalization"].scalar, norm.scalar)
    assert sorted(os.listdir(tmp_path)) == ["sae"]  # no staging directory left behind


def test_portable_without_normalization_and_overwrite(tmp_path):
    ae = sae.relu(8, 32)
    save_sae(tmp_path / "sae", ae, ae.init(jax.random.key(0)))
    params = ae.init(jax.random.key(1))
    save_sae(tmp_path / "sae", ae, params)
    _, loaded, info = load_sae(tmp_path / "sae")
    assert info["normalization"] is None
    assert_trees_equal(loaded, params)


def test_portable_errors_name_the_file_and_problem(tmp_path):
    ae = sae.relu(8, 32)
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        load_sae(tmp_path / "nothing")
    path = save_sae(tmp_path / "sae", ae, ae.init(jax.random.key(0)))
    tensors = os.path.join(path, "sae.safetensors")
    config = os.path.join(path, "config.json")

    data = open(tensors, "rb").read()
    open(tensors, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"sae.safetensors: tensor 'w_dec' has data offsets \[160, 1184\] "
                                              r"outside the file's 972 data bytes \(truncated\?\)"):
        load_sae(path)

    save_sae(path, ae, ae.init(jax.random.key(0)))
    open(config, "w").write("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_sae(path)

    save_sae(path, ae, ae.init(jax.random.key(0)))
    cfg = json.load(open(config))
    cfg["sae"]["d_sae"] = 16
    json.dump(cfg, open(config, "w"))
    with pytest.raises(CheckpointError, match=r"config.json: its checksum does not match"):
        load_sae(path)
    cfg["version"] = 1  # a version-1 file (no checksum) edited by hand: its shapes are still checked
    json.dump(cfg, open(config, "w"))
    with pytest.raises(CheckpointError, match=r"tensor 'w_enc' has shape \[8, 32\], expected \[8, 16\]"):
        load_sae(path)

    cfg["sae"] = sae.jumprelu(8, 32).to_config()
    json.dump(cfg, open(config, "w"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['threshold'\]"):
        load_sae(path)

    with pytest.raises(ValueError, match=r"'b_dec' has shape \(3,\)"):
        save_sae(tmp_path / "bad", ae, ae.init(jax.random.key(0)).replace(b_dec=jnp.zeros(3)))
    assert not (tmp_path / "bad").exists()


def test_load_sae_refuses_non_finite_weights_integer_tensors_and_a_bad_normalisation(tmp_path):
    import safetensors.numpy

    ae = sae.relu(8, 32)
    params = ae.init(jax.random.key(0))
    norm = estimate_normalization(jax.random.normal(jax.random.key(1), (64, 8)))
    path = save_sae(tmp_path / "sae", ae, params, normalization=norm)
    tensors_path = os.path.join(path, "sae.safetensors")
    good = safetensors.numpy.load_file(tensors_path)
    safetensors.numpy.save_file(dict(good, b_dec=good["b_dec"] + 1), tensors_path)
    with pytest.raises(CheckpointError, match=re.escape(tensors_path) + ": its SHA-256 does not match the one in "
                       + re.escape(os.path.join(path, "config.json"))):
        load_sae(path)
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    json.dump(dict(config, normalized_inputs=False), open(config_path, "w"))  # would load without the normalisation
    with pytest.raises(CheckpointError, match=re.escape(config_path) + ": its checksum does not match its format, "
                       "version, sae, normalized_inputs, normalization_clip, tensors_sha256 fields"):
        load_sae(path)
    json.dump(dict(config, info={"edited": "by hand"}), open(config_path, "w"))  # provenance is free to edit
    with pytest.raises(CheckpointError, match="SHA-256"):  # (the tensors above are still the replaced ones)
        load_sae(path)
    # Version-1 files (before the sums) still get every value check.
    del config["tensors_sha256"], config["checksum"]
    json.dump(dict(config, version=1), open(config_path, "w"))
    for name, value, message in (
            ("w_dec", np.where(np.arange(32 * 8).reshape(32, 8) == 5, np.nan, good["w_dec"]).astype(np.float32),
             r"tensor 'w_dec' holds 1 NaN or Inf value\(s\)"),
            ("b_enc", np.full(32, np.inf, np.float32), r"tensor 'b_enc' holds 32 NaN or Inf"),
            ("w_enc", good["w_enc"].astype(np.int32), r"tensor 'w_enc' has dtype I32, expected a float type"),
            ("b_dec", np.zeros(8, bool), r"tensor 'b_dec' has dtype BOOL"),
            ("norm_scalar", np.float32(0.0), r"tensor 'norm_scalar' is 0.0, a normalisation scalar must be positive"),
            ("norm_scalar", np.float32(np.nan), r"tensor 'norm_scalar' holds 1 NaN")):
        safetensors.numpy.save_file(dict(good, **{name: np.asarray(value)}), tensors_path)
        with pytest.raises(CheckpointError, match=re.escape(tensors_path) + ": " + message):
            load_sae(path)
    safetensors.numpy.save_file(dict(good, extra=np.zeros(3, np.float32)), tensors_path)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['extra'\]"):
        load_sae(path)


def _trainer(tx=None):
    ae = sae.topk(16, 48, k=4)
    return train.make_trainer(ae, objective=Objective(sparsity="none", auxk_coeff=1 / 32), warmup_steps=3,
                              dead_after_tokens=32, resample_every=4, tx=tx)


@pytest.mark.parametrize("sweep", [False, True])
@pytest.mark.parametrize("own_tx", [False, True], ids=["recipe", "own_tx"])
def test_crash_and_resume_is_bitwise_identical(tmp_path, sweep, own_tx):
    """With the recipe's optimizer or one of the user's own (clipping and AdamW; a function of
    the rate for a sweep), resampling included."""
    x, _ = sparse_data(jax.random.key(0), 8 * 32)
    batches = x.reshape(8, 32, 16)
    tx = None
    if own_tx:
        own = lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))  # noqa: E731
        tx = own if sweep else own(1e-3)
    trainer = _trainer(tx)
    key, hparams = jax.random.key(1), Hparams.of(3e-3, 0.0, 4)

    def fresh():
        if sweep:
            return trainer.init_sweep(key, Hparams.grid([1e-3, 3e-3], k=[2, 4]))
        return trainer.init(key, hparams)

    def train_range(state, start, stop):
        step = jax.jit(trainer.sweep_step if sweep else trainer.step)
        resample = jax.jit(trainer.sweep_resample if sweep else trainer.resample)
        for i in range(start, stop):
            state, _ = step(state, batches[i])
            if trainer.resample_due(i + 1):  # resampling is part of the run being resumed
                state, _ = resample(state, batches[i])
        return state

    straight = train_range(fresh(), 0, 8)

    ckpt = TrainCheckpointer(tmp_path / "ckpt")
    partial = train_range(fresh(), 0, 5)
    ckpt.save(5, partial, config={"lr": 3e-3}, extra={"data_position": 5})
    ckpt.close()
    del partial, ckpt  # "crash"

    restored = TrainCheckpointer(tmp_path / "ckpt").restore(jax.eval_shape(fresh))
    assert restored.step == 5 and restored.config == {"lr": 3e-3} and restored.extra == {"data_position": 5}
    resumed = train_range(restored.state, restored.extra["data_position"], 8)
    assert_trees_equal(resumed, straight)


def test_restore_errors(tmp_path):
    trainer = _trainer()
    with pytest.raises(CheckpointError, match="no checkpoint to restore"):
        TrainCheckpointer(tmp_path / "empty").restore(trainer.init(jax.random.key(0), Hparams.of(1e-3)))
    ckpt = TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2)
    state = trainer.init(jax.random.key(0), Hparams.of(1e-3))
    for step in (1, 2, 3):
        ckpt.save(step, state)
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    other = train.make_trainer(sae.topk(16, 64, k=4), objective=Objective(sparsity="none"))
    with pytest.raises(CheckpointError, match=r"ckpt/3 does not restore into the given target: .*params/w_dec: saved \(48, 16\), target \(64, 16\)"):
        ckpt.restore(other.init(jax.random.key(0), Hparams.of(1e-3)))


def _corrupt(step_dir, how):
    state = os.path.join(step_dir, "state")
    data_files = sorted((os.path.join(root, f) for root, _, files in os.walk(state) for f in files
                         if os.sep + "d" + os.sep in os.path.join(root, f)), key=os.path.getsize)
    if how == "empty":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    elif how == "truncated":
        for f in data_files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "random":
        for f in data_files:
            with open(f, "wb") as fh:
                fh.write(np.random.default_rng(0).bytes(os.path.getsize(f)))


@pytest.mark.parametrize("how", ["empty", "truncated", "random"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, how):
    trainer = _trainer()
    states = [trainer.init(jax.random.key(i), Hparams.of(1e-3)) for i in range(2)]
    ckpt = TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2)
    for step, state in zip((10, 20), states):
        ckpt.save(step, state, extra={"at": step})
    ckpt.close()
    _corrupt(str(tmp_path / "ckpt" / "20"), how)

    run = TrainCheckpointer(tmp_path / "ckpt").restore(jax.eval_shape(lambda: states[0]))
    assert run.step == 10 and run.extra == {"at": 10}
    assert_trees_equal(run.state, states[0])
    assert [s for s, _ in run.skipped] == [20] and str(tmp_path / "ckpt" / "20") in run.skipped[0][1]
    with pytest.raises(CheckpointError, match=str(tmp_path / "ckpt" / "20")):  # asked for by name: no fallback
        TrainCheckpointer(tmp_path / "ckpt").restore(jax.eval_shape(lambda: states[0]), step=20)
    _corrupt(str(tmp_path / "ckpt" / "10"), "empty")
    with pytest.raises(CheckpointError, match=r"ckpt: no checkpoint restores: step 20: .*; step 10: .*ckpt/10"):
        TrainCheckpointer(tmp_path / "ckpt").restore(jax.eval_shape(lambda: states[0]))


def test_a_step_metadata_file_that_is_not_an_object_is_named_on_opening(tmp_path):
    """Orbax reads every step's `_CHECKPOINT_METADATA` when it opens the folder; JSON that is not
    an object (found by tests/fuzz_readers.py) is one CheckpointError naming the file and the way
    out, and the files are left as they are."""
    state = _trainer().init(jax.random.key(0), Hparams.of(1e-3))
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        for step in (10, 20):
            ckpt.save(step, state)
    metadata = tmp_path / "ckpt" / "20" / "_CHECKPOINT_METADATA"
    metadata.write_text("5")
    with pytest.raises(CheckpointError, match=re.escape(f"{metadata}: not a JSON object") + ".*move .*20 aside"):
        TrainCheckpointer(tmp_path / "ckpt")
    assert metadata.read_text() == "5" and sorted(os.listdir(tmp_path / "ckpt")) == ["10", "20"]


def test_a_flipped_bit_is_caught_by_the_checksums(tmp_path):
    """One bit flipped in opt_state's saved values (which orbax restores without a murmur)
    fails the checksum stored beside them."""
    trainer = _trainer()
    state = trainer.init(jax.random.key(0), Hparams.of(1e-3))
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, state.opt_state))
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, state)
    mu = np.asarray(state.opt_state[1].mu.w_enc).copy()
    mu.view(np.uint32)[3, 7] ^= 1 << 20
    flipped = state.replace(opt_state=(state.opt_state[0], state.opt_state[1]._replace(
        mu=state.opt_state[1].mu.replace(w_enc=jnp.asarray(mu))), *state.opt_state[2:]))
    with TrainCheckpointer(tmp_path / "other") as other:  # the same files, one bit apart
        other.save(5, flipped)
    shutil.rmtree(tmp_path / "ckpt" / "5" / "state")
    shutil.copytree(tmp_path / "other" / "5" / "state", tmp_path / "ckpt" / "5" / "state")
    with pytest.raises(CheckpointError, match=r"ckpt/5: checksum mismatch in opt_state/1/mu/w_enc"):
        TrainCheckpointer(tmp_path / "ckpt").restore(jax.eval_shape(lambda: state))


def test_written_directories_get_the_usual_permissions(tmp_path):
    from saejax import backbones

    old = os.umask(0o022)
    try:
        ae = sae.relu(8, 32)
        path = save_sae(tmp_path / "sae", ae, ae.init(jax.random.key(0)))
        bb = backbones.create_random("vit", str(tmp_path / "bb"), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8)
    finally:
        os.umask(old)
    for directory in (path, bb):
        assert os.stat(directory).st_mode & 0o777 == 0o755, directory
        for name in os.listdir(directory):
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o644, name
