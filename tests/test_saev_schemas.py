"""saev checkpoints of every era, made by torch.save in saev's documented format
(tests/fixtures/make_saev_schema_fixtures.py), read without torch: the codes equal saev's head
forward; DINOv3-style repositories are picked through their manifest."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from saejax.checkpoint import CheckpointError, import_saev
from saejax.checkpoint.saev import find_saev_checkpoint

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "saev_schemas")
GOLDEN = np.load(os.path.join(HERE, "golden.npz"))


@pytest.mark.parametrize("name,architecture,schema", [
    ("relu_schema1a", "relu", 1), ("topk_schema1b", "topk", 1), ("relu_matryoshka_schema3", "relu", 3),
    ("batchtopk_schema5", "batchtopk", 5), ("batchtopk_unset_threshold_schema4", "batchtopk", 4)])
def test_every_schema_gives_saevs_codes(name, architecture, schema):
    ae, params, info = import_saev(os.path.join(HERE, f"{name}.pt"))
    assert (ae.architecture, ae.d_model, ae.d_sae, info["schema"], info["forward"]) == (architecture, 8, 16, schema,
                                                                                          "no_b_dec")
    assert info["format"] == f"saev-schema-{schema}"
    if architecture == "topk":
        assert ae.k == 4
    codes = np.asarray(ae.encode(params, jnp.asarray(GOLDEN["x"])))
    np.testing.assert_allclose(codes, GOLDEN[name], rtol=1e-5, atol=1e-5)
    assert (codes > 0).any() and (codes == 0).any()


def test_the_forward_of_another_era_gives_other_codes():
    """Reading a schema file with 0.1.0's forward is wrong, which is why `forward` follows the era."""
    ae, params, _ = import_saev(os.path.join(HERE, "relu_schema1a.pt"), forward="subtract_b_dec")
    assert not np.allclose(np.asarray(ae.encode(params, jnp.asarray(GOLDEN["x"]))), GOLDEN["relu_schema1a"], atol=1e-3)


def test_dinov3_repository_by_run_by_l0_or_best_mse(tmp_path):
    repo = os.path.join(HERE, "dinov3_repo")
    path, entry = find_saev_checkpoint(repo, layer=6)  # the lowest MSE at layer 6
    assert entry["run_id"] == "run_a" and path.endswith("layer_06/run_a/sae.pt")
    assert find_saev_checkpoint(repo, layer=6, l0=10)[1]["run_id"] == "run_b"
    path, entry = find_saev_checkpoint(repo, layer=9, run_id="run_c")
    ae, params, _ = import_saev(path, sha256=entry["sha256"])
    np.testing.assert_allclose(np.asarray(ae.encode(params, jnp.asarray(GOLDEN["x"]))), GOLDEN["repo_run_c"],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"no checkpoint of layer 3; layers: \[6, 9\]"):
        find_saev_checkpoint(repo, layer=3)
    with pytest.raises(CheckpointError, match=r"no run 'run_x' at layer 6; runs: \['run_a', 'run_b'\]"):
        find_saev_checkpoint(repo, layer=6, run_id="run_x")
    copy = tmp_path / "sae.pt"
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"SHA-256 .* does not match the expected"):
        import_saev(copy, sha256=entry["sha256"])


def test_unknown_schemas_and_activations_are_named(tmp_path):
    source = open(os.path.join(HERE, "relu_matryoshka_schema3.pt"), "rb").read()
    body = source[source.index(b"\n") + 1:]
    for header, message in ((b'{"schema": 9, "cfg": {}}', "unknown saev checkpoint schema 9"),
                            (b'{"schema": 2, "cfg": {"d_model": 8, "d_sae": 16, "activation": {"cls": "JumpReLU"}}}',
                             "unknown activation 'JumpReLU'"),
                            (b'{"schema": 2, "cfg": {"d_model": 8, "d_sae": 16}}', "cfg has no activation")):
        path = tmp_path / "sae.pt"
        path.write_bytes(header + b"\n" + body)
        with pytest.raises(CheckpointError, match=message):
            import_saev(path)
    shutil.rmtree(tmp_path)
