"""Every file saejax writes records which saejax (and jax, flax, transformers) wrote it, and a
file from a newer major version warns when read."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saejax
from saejax import provenance, sae
from saejax.checkpoint import TrainCheckpointer, load_sae, portable, save_sae, train_state
from saejax.pages import viz

NEWER = {**provenance.written_by(), "saejax": f"{int(saejax.__version__.split('.')[0]) + 1}.0.0"}


def test_the_versions_are_the_installed_ones():
    versions = saejax.written_by()
    assert versions["saejax"] == saejax.__version__ == provenance.__version__
    assert versions["jax"] == jax.__version__
    assert set(versions) == {"saejax", "jax", "flax", "transformers"}
    assert all(isinstance(v, str) and v for v in versions.values())


def test_a_portable_sae_records_them_and_warns_when_newer(tmp_path, monkeypatch):
    ae = sae.relu(4, 8)
    path = save_sae(tmp_path / "sae", ae, ae.init(jax.random.key(0)))
    assert json.load(open(os.path.join(path, "config.json")))["written_by"] == saejax.written_by()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae(path)  # this version: silent
    monkeypatch.setattr(portable, "written_by", lambda: NEWER)
    newer = save_sae(tmp_path / "newer", ae, ae.init(jax.random.key(0)))
    with pytest.warns(provenance.NewerVersionWarning, match=rf"{newer}/config.json was written by saejax "
                                                            rf"{NEWER['saejax']}, newer than this saejax"):
        _, params, _ = load_sae(newer)
    assert params.w_enc.shape == (4, 8)  # it still loads


def test_a_checkpoint_records_them_in_its_extra_and_warns_when_newer(tmp_path, monkeypatch):
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, config={"a": 1}, extra={"data_position": 7})
        run = ckpt.restore(state)
    assert run.extra == {"data_position": 7} and run.written_by == saejax.written_by()
    monkeypatch.setattr(train_state, "written_by", lambda: NEWER)
    with TrainCheckpointer(tmp_path / "newer") as ckpt:
        ckpt.save(1, state)
        with pytest.warns(provenance.NewerVersionWarning, match="newer/1 was written by saejax"):
            run = ckpt.restore(state)
    np.testing.assert_array_equal(run.state["w"], state["w"])


def test_normalization_statistics_record_them_and_warn_when_newer(tmp_path, monkeypatch):
    from saejax.core.normalization import Normalization
    from saejax.run import training

    norms = {3: Normalization(jnp.arange(4.0), jnp.asarray(2.0))}
    path = str(tmp_path / "normalization.npz")
    training.cached_normalization(path, {"model": "m"}, (3,), lambda: norms)
    with np.load(path) as stored:
        assert json.loads(str(stored["written_by"])) == saejax.written_by()
    monkeypatch.setattr(training, "written_by", lambda: NEWER)
    newer = str(tmp_path / "newer.npz")
    training.cached_normalization(newer, {"model": "m"}, (3,), lambda: norms)
    with pytest.warns(provenance.NewerVersionWarning, match="newer.npz was written by saejax"):
        read = training.cached_normalization(newer, {"model": "m"}, (3,), lambda: pytest.fail("estimated again"))
    np.testing.assert_array_equal(read[3].mean, norms[3].mean)


def test_older_and_unversioned_files_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        provenance.check_written_by(None, "old.json")
        provenance.check_written_by({"saejax": "0.0.1"}, "old.json")
        provenance.check_written_by({"saejax": "dev"}, "odd.json")
        provenance.check_written_by("not a record", "odd.json")


def test_pages_end_with_the_versions():
    page = viz.html_page("t", "<p>body</p>")
    assert f"Written by saejax {saejax.__version__} (jax {jax.__version__}, flax " in page
    assert page.index("Written by") > page.index("<p>body</p>")
