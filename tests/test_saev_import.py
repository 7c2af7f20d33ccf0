"""`saejax.checkpoint.import_saev`: reads saev 0.1.0 `sae.pt` files without torch, safely.

The golden fixture (`fixtures/saev_sae.pt`, `fixtures/saev_golden.npz`) was written by the real
saev package; `fixtures/make_saev_fixture.py` regenerates it. Malformed files are built here
with `_write_torch_sae`, a torch-free writer of torch.save-style zip archives.
"""

import collections
import io
import json
import os
import pathlib
import shutil
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from saejax.checkpoint import CheckpointError, import_saev
from saejax.checkpoint.export import _Global, _StorageRef, _TorchPickler  # the writer torch-free exports use
from saejax.core.sae import SAEParams

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SAE_PT = FIXTURES / "saev_sae.pt"
CONFIG = {"d_vit": 4, "exp_factor": 2, "sparsity_coeff": 4e-4, "seed": 0}  # d_sae = 8


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "saev_golden.npz") as g:
        return dict(g)


# ------------------------------------------------------------------ torch-free torch.save

class _Storage(_StorageRef):
    def __init__(self, key, storage_type, numel):
        self.pid = ("storage", _Global("torch", storage_type), key, "cpu", numel)


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _Call:
    """Pickles as `func(*args)` for any global `func`: how a malicious pickle runs code."""

    def __init__(self, module, name, *args):
        self.func, self.args = _Global(module, name), args

    def __reduce__(self):
        return self.func, self.args


_STORAGE_TYPES = {"float32": "FloatStorage", "float64": "DoubleStorage", "int64": "LongStorage"}


def _write_torch_sae(path, arrays=None, *, config=CONFIG, pickled=None, byteorder="little", layout=None,
                     compression=zipfile.ZIP_STORED):
    """Writes a saev-style `sae.pt`: a JSON line, then a torch.save-shaped zip of `arrays`.

    `pickled` replaces the pickled state dict with any object (the storages of `arrays` are
    still written); `layout[key] = (pad, transposed)` stores
    a 2-D array with `pad` leading junk elements (storage offset) and/or transposed (strides).
    """
    layout = layout or {}
    members, state = {}, collections.OrderedDict()
    for i, (key, array) in enumerate((arrays or {}).items()):
        pad, transposed = layout.get(key, (0, False))
        stored = array.T if transposed else array
        flat = np.concatenate([np.full(pad, 7, array.dtype), np.ascontiguousarray(stored).ravel()])
        members[f"archive/data/{i}"] = flat.astype(flat.dtype.newbyteorder("<" if byteorder == "little" else ">")).tobytes()
        stride = [1, array.shape[0]] if transposed else [int(np.prod(array.shape[j + 1:])) for j in range(array.ndim)]
        state[key] = _Tensor(_Storage(str(i), _STORAGE_TYPES[array.dtype.name], flat.size), pad, array.shape, stride)
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(state if pickled is None else pickled)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", byteorder)
        for name, data in members.items():
            z.writestr(name, data, compress_type=compression)
        z.writestr("archive/version", "3\n")
    pathlib.Path(path).write_bytes((json.dumps(config) + "\n").encode() + zbuf.getvalue())
    return path


def _random_sae(d=4, f=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(size=(d, f)).astype(np.float32), "b_enc": rng.normal(size=f).astype(np.float32),
            "W_dec": rng.normal(size=(f, d)).astype(np.float32), "b_dec": rng.normal(size=d).astype(np.float32)}


def _assert_params(params, arrays):
    for ours, theirs in [("w_enc", "W_enc"), ("b_enc", "b_enc"), ("w_dec", "W_dec"), ("b_dec", "b_dec")]:
        value = getattr(params, ours)
        assert value.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(value), arrays[theirs].astype(np.float32))


# ----------------------------------------------------------------------- the real fixture

def test_fixture_weights_and_config(golden):
    ae, params, info = import_saev(SAE_PT)
    assert isinstance(params, SAEParams) and params.threshold is None
    assert (ae.architecture, ae.d_model, ae.d_sae) == ("relu", 16, 64)
    assert info["format"] == "saev-0.1.0" and info["source"] == str(SAE_PT)
    assert info["config"]["d_vit"] == 16 and info["config"]["exp_factor"] == 4
    _assert_params(params, golden)


def test_fixture_forward_and_loss_match_saev(golden):
    ae, params, info = import_saev(SAE_PT)
    x = jnp.asarray(golden["x"])
    pre = ae.pre_activations(params, x)
    f_x = ae.encode(params, x)
    x_hat = ae.decode(params, f_x)
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pre, golden["h_pre"], **close)
    np.testing.assert_allclose(f_x, golden["f_x"], **close)
    np.testing.assert_allclose(x_hat, golden["x_hat"], **close)

    coeff = info["config"]["sparsity_coeff"]
    mse = jnp.mean((x_hat - x) ** 2)
    l1 = jnp.mean(jnp.sum(f_x, axis=1))
    l0 = jnp.mean(jnp.sum(f_x > 0, axis=1))
    for name, ours in {"mse": mse, "l1": l1, "l0": l0, "sparsity": coeff * l1, "loss": mse + coeff * l1}.items():
        np.testing.assert_allclose(ours, golden[name], **close, err_msg=name)


def test_directory_with_sae_pt(tmp_path, golden):
    shutil.copy(SAE_PT, tmp_path / "sae.pt")
    _, params, info = import_saev(tmp_path)
    assert info["source"] == str(tmp_path / "sae.pt")
    _assert_params(params, golden)


def test_training_trajectory_is_in_fixture(golden):
    for key, shape in {"train_x": (6, 32, 16), "train_W_enc": (6, 16, 64), "train_W_dec": (6, 64, 16),
                       "train_b_enc": (6, 64), "train_b_dec": (6, 16), "train_init_W_enc": (16, 64),
                       "train_loss": (6,), "train_lr": (6,)}.items():
        assert golden[key].shape == shape, key
    np.testing.assert_allclose(golden["train_lr"], [0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])


# --------------------------------------------------------------- the torch-free writer

@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_offsets_strides_and_byteorder(tmp_path, byteorder):
    arrays = _random_sae()
    path = _write_torch_sae(tmp_path / "sae.pt", arrays, byteorder=byteorder,
                            layout={"W_enc": (3, True), "W_dec": (0, True), "b_dec": (5, False)})
    ae, params, _ = import_saev(path)
    assert (ae.d_model, ae.d_sae) == (4, 8)
    _assert_params(params, arrays)


def test_float64_is_converted(tmp_path):
    arrays = {k: v.astype(np.float64) for k, v in _random_sae().items()}
    _, params, _ = import_saev(_write_torch_sae(tmp_path / "sae.pt", arrays))
    _assert_params(params, arrays)


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("posix", "system")])
def test_code_in_pickle_is_refused_and_not_run(tmp_path, module, name):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = _Call(module, name, command if name == "system" else f"open({str(marker)!r}, 'w')")
    path = _write_torch_sae(tmp_path / "sae.pt", pickled={"W_enc": payload})
    with pytest.raises(CheckpointError, match=rf"{module}\.{name}") as e:
        import_saev(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_truncated_file(tmp_path):
    data = SAE_PT.read_bytes()
    path = tmp_path / "sae.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        import_saev(path)
    assert str(path) in str(e.value)


def test_corrupt_storage_bytes(tmp_path, golden):
    data = bytearray(SAE_PT.read_bytes())
    at = bytes(data).index(golden["W_enc"].tobytes()[:64]) + 100
    data[at] ^= 0xFF
    path = tmp_path / "sae.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        import_saev(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"this is not json\n" + b"PK\x03\x04", "not a JSON config"),
    (b'{"d_vit": 4}\n', "'exp_factor'"),
    (b'[1, 2]\n', "not an object"),
    (b'{"d_vit": 4, "exp_factor": 2}', "no newline"),
])
def test_bad_header(tmp_path, content, match):
    path = tmp_path / "sae.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        import_saev(path)
    assert str(path) in str(e.value)


def test_json_line_then_garbage(tmp_path):
    path = tmp_path / "sae.pt"
    path.write_bytes((json.dumps(CONFIG) + "\n").encode() + os.urandom(200))
    with pytest.raises(CheckpointError, match="not a readable torch.save zip"):
        import_saev(path)


def test_missing_key(tmp_path):
    arrays = _random_sae()
    del arrays["b_dec"]
    with pytest.raises(CheckpointError, match="missing key 'b_dec'"):
        import_saev(_write_torch_sae(tmp_path / "sae.pt", arrays))


def test_shape_mismatch(tmp_path):
    arrays = _random_sae()
    arrays["b_enc"] = arrays["b_enc"][:7]
    with pytest.raises(CheckpointError, match=r"'b_enc' has shape \(7,\), expected \(8,\)"):
        import_saev(_write_torch_sae(tmp_path / "sae.pt", arrays))


def test_non_float_dtype(tmp_path):
    arrays = _random_sae()
    arrays["W_enc"] = arrays["W_enc"].astype(np.int64)
    with pytest.raises(CheckpointError, match="'W_enc' has non-float dtype int64"):
        import_saev(_write_torch_sae(tmp_path / "sae.pt", arrays))


def test_storage_too_small_for_tensor(tmp_path):
    arrays = {"b_dec": np.zeros(4, np.float32)}  # storage "0" holds 4 elements
    overrun = {"b_dec": _Tensor(_Storage("0", "FloatStorage", 4), 2, (4,), (1,))}
    with pytest.raises(CheckpointError, match="reaches element 5"):
        import_saev(_write_torch_sae(tmp_path / "sae.pt", arrays, pickled=overrun))


# ------------------------------------------------------------------------------ bounded reading

def test_a_zero_stride_tensor_cannot_expand_a_tiny_storage(tmp_path):
    """10 KB that would become 6.4 GB: a (20000, 80000) tensor over one element, strides 0."""
    state = collections.OrderedDict(W_enc=_Tensor(_Storage("0", "FloatStorage", 1), 0, (20000, 80000), (0, 0)))
    path = _write_torch_sae(tmp_path / "sae.pt", {"W_enc": np.zeros(1, np.float32)}, pickled=state,
                            config={"d_vit": 20000, "exp_factor": 4})
    with pytest.raises(CheckpointError, match=r"sae.pt: .*storage '0': zero stride \(0, 0\)"):
        import_saev(path)


def test_compressed_and_oversized_storages_are_refused_before_reading(tmp_path):
    arrays = _random_sae()
    bomb = _write_torch_sae(tmp_path / "bomb.pt", arrays, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"bomb.pt: .*storage member 'archive/data/0' is compressed"):
        import_saev(bomb)
    huge = collections.OrderedDict(W_enc=_Tensor(_Storage("0", "FloatStorage", 10**9), 0, (4, 8), (8, 1)))
    path = _write_torch_sae(tmp_path / "huge.pt", {"W_enc": arrays["W_enc"]}, pickled=huge)
    with pytest.raises(CheckpointError, match=r"huge.pt: .*storage '0' declares 1000000000 elements, more than an "
                                              r"SAE of the config line's d_vit and exp_factor can hold"):
        import_saev(path)


def test_non_finite_weights_are_refused(tmp_path):
    arrays = _random_sae()
    arrays["W_dec"][2, 1] = np.nan
    with pytest.raises(CheckpointError, match=r"sae.pt: tensor 'W_dec' holds 1 NaN or Inf value"):
        import_saev(_write_torch_sae(tmp_path / "sae.pt", arrays))
