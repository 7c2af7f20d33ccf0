"""saejax.backbones: golden parity with PyTorch `transformers`, capture / edit semantics, loading, errors.

The golden fixtures under tests/fixtures/backbones/ were made by
tests/fixtures/make_backbone_fixtures.py with the PyTorch models (tiny random weights); this
suite reads them through the torch-free conversion path of `saejax.backbones.load`.
"""

import functools
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saejax.backbones as backbones
from backbone_checks import check_edit_equals_running_the_remaining_blocks_by_hand
from saejax.backbones import weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")
CASES = {  # case -> (family, n_classes)
    "clip_vision": ("clip", 0),
    "clip_full": ("clip", 0),
    "dinov2": ("dinov2", 5),
    "dinov2_registers": ("dinov2_registers", 0),
    "dinov2_swiglu": ("dinov2", 3),  # sharded pytorch_model.bin
    "vit": ("vit", 7),
    "vit_pooler": ("vit", 0),  # ViTModel: pooled is the pooler's output; one pytorch_model.bin
}
ATOL = 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("saejax_cache"))


@pytest.fixture(scope="module")
def loaded(cache_dir):
    """`case -> (bb, params, golden)`, each case loaded once."""
    cache = {}

    def get(case):
        if case not in cache:
            bb, params = backbones.load(os.path.join(FIXTURES, case), cache_dir=cache_dir)
            cache[case] = (bb, params, dict(np.load(os.path.join(FIXTURES, f"{case}.npz"))))
        return cache[case]

    return get


# ---------------------------------------------------------------------- golden parity
@pytest.mark.parametrize("case", list(CASES))
def test_matches_pytorch_golden(loaded, case):
    bb, params, g = loaded(case)
    family, n_classes = CASES[case]
    assert bb.family == family and bb.n_classes == n_classes
    assert (bb.d_model, bb.n_layers) == (32, 3)
    x = g["pixel_values"]
    np.testing.assert_allclose(bb.embed(params, x), g["hidden_states"][0], atol=ATOL)
    out = bb.forward(params, x, capture=tuple(range(bb.n_layers)))
    assert sorted(out.captured) == [0, 1, 2]
    for i in range(bb.n_layers):  # hook i == HF hidden_states[i + 1]
        np.testing.assert_allclose(out.captured[i], g["hidden_states"][i + 1], atol=ATOL, err_msg=f"block {i}")
    np.testing.assert_allclose(out.tokens, g["last_hidden_state"], atol=ATOL)
    np.testing.assert_allclose(out.pooled, g["pooler_output"], atol=ATOL)
    if n_classes:
        assert out.logits.shape == (2, n_classes)
        np.testing.assert_allclose(out.logits, g["logits"], atol=ATOL)
    else:
        assert out.logits is None


@pytest.mark.parametrize("case", list(CASES))
def test_preprocess_matches_fixture_processor(loaded, case):
    bb, _, g = loaded(case)
    x = bb.preprocess(g["images_uint8"])
    assert x.dtype == np.float32 and x.shape == g["pixel_values"].shape
    np.testing.assert_allclose(x, g["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("case, grid, layout", [
    ("clip_vision", (4, 4), backbones.TokenLayout(0, (1, 1), (1, 17), 17)),
    ("dinov2", (3, 3), backbones.TokenLayout(0, (1, 1), (1, 10), 10)),
    ("dinov2_swiglu", (3, 3), backbones.TokenLayout(0, (1, 1), (1, 10), 10)),
    ("dinov2_registers", (3, 3), backbones.TokenLayout(0, (1, 5), (5, 14), 14)),
    ("vit", (4, 4), backbones.TokenLayout(0, (1, 1), (1, 17), 17)),
])
def test_geometry(loaded, case, grid, layout):
    bb, _, g = loaded(case)
    assert bb.grid == grid and bb.layout == layout
    assert bb.image_size == g["pixel_values"].shape[1] and bb.patch_size == bb.image_size // grid[0]
    assert bb.layout.n_patches == grid[0] * grid[1]


def test_full_clip_keeps_text_tower_and_projection(loaded):
    bb, params, g = loaded("clip_full")
    assert set(params) == {"embed", "blocks", "readout", "text"}
    assert params["text"]["logit_scale"].shape == () and set(params["text"]["blocks"]) == {"0", "1"}
    assert bb.heads == backbones.Heads(projection=16, text=True) and bb.text_config.num_hidden_layers == 2
    assert len(bb.load_info.weight_files) == 5  # sharded safetensors, merged
    out = bb.forward(params, g["pixel_values"])
    np.testing.assert_allclose(out.pooled @ backbones.clip_projection(params), g["image_embeds"], atol=ATOL)


def test_the_pooler_and_the_swiglu_mlp_are_read_from_the_weights(loaded):
    """A ViTModel's pooler (24 wide, not D) and DINOv2's packed SwiGLU `weights_in`, split into
    the gate and the up projection (PyTorch's `chunk(2)`: the gate first)."""
    bb, params, _ = loaded("vit_pooler")
    assert bb.heads == backbones.Heads(pooler=24) and params["readout"]["pooler"]["kernel"].shape == (32, 24)
    bb, params, _ = loaded("dinov2_swiglu")
    mlp = params["blocks"]["0"]["mlp"]
    assert mlp["gate"]["kernel"].shape == mlp["up"]["kernel"].shape == (32, 88)  # (int(128 * 2 / 3) + 7) // 8 * 8
    assert bb.load_info.weight_files[0].endswith("pytorch_model-00001-of-00003.bin")
    assert len(bb.load_info.weight_files) == 3


# ---------------------------------------------------------------------- names both ways, saving
@pytest.mark.parametrize("case", ["clip_full", "dinov2_swiglu", "dinov2_registers", "vit", "vit_pooler", "siglip"])
def test_pytorch_names_convert_both_ways(case):
    """`to_own` then `to_torch` gives back every weight the family reads, under its own name
    (the tower's prefix aside) and bit for bit: split SwiGLU and packed in_proj tensors included."""
    from saejax.backbones import convert

    path = os.path.join(FIXTURES, case)
    bb, _ = backbones.load(path, cache_dir=False)
    names = backbones.get_family(bb.family).names(bb.config)
    state = weights.read_state(*weights.find_weights(path))
    own, unused = convert.to_own(state, names)
    assert all(k[0] in ("embed", "blocks", "readout", "text") for k in own)
    back = convert.to_torch(own, names)

    def bare(name):
        return name[len(names.prefix):] if name.startswith(names.prefix) else name

    assert sorted(map(bare, back)) == sorted(bare(k) for k in state if k not in unused)
    by_bare = {bare(k): v for k, v in state.items()}
    for name, value in back.items():
        np.testing.assert_array_equal(value, by_bare[bare(name)], err_msg=name)
    assert set(unused) <= {"embeddings.mask_token", "dinov2.embeddings.mask_token",
                           "dinov2_with_registers.embeddings.mask_token"} | {
        k for k in state if k.startswith("text_model.") and case == "siglip"} | {"logit_scale", "logit_bias",
                                                                                   "text_model.head.weight",
                                                                                   "text_model.head.bias"}


@pytest.mark.parametrize("case", ["clip_full", "vit", "dinov2_swiglu"])
def test_a_saved_backbone_loads_back_to_the_same_params(loaded, tmp_path, case):
    """`saving.save` writes an HF checkpoint (PyTorch names, the full CLIPConfig with its text
    tower, the classifier's labels) that `load` reads back to the same params and outputs."""
    from saejax.backbones.saving import save

    bb, params, g = loaded(case)
    save(tmp_path / "saved", bb, params)
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    again, again_params = backbones.load(tmp_path / "saved", cache_dir=False)
    assert (again.family, again.heads, again.grid, again.processing) == (bb.family, bb.heads, bb.grid, bb.processing)
    assert jax.tree.structure(again_params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(again_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(again.forward(again_params, g["pixel_values"]).pooled, g["pooler_output"], atol=ATOL)


# ---------------------------------------------------------------------- edits and capture
@pytest.mark.parametrize("case", ["vit", "dinov2_registers"])
def test_identity_edit_is_exactly_the_plain_forward(loaded, case):
    bb, params, g = loaded(case)
    x = g["pixel_values"]
    plain = bb.forward(params, x, capture=(0, 2))
    edited = bb.forward(params, x, capture=(0, 2), edits={0: lambda r: r, 1: lambda r: r})
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(edited)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["vit", "clip_vision", "dinov2"])
def test_edit_equals_running_the_remaining_blocks_by_hand(loaded, case):
    bb, params, g = loaded(case)
    check_edit_equals_running_the_remaining_blocks_by_hand(bb, params, g["pixel_values"])


def test_forward_jits_with_edits_and_matches_eager(loaded):
    bb, params, g = loaded("dinov2_registers")
    x = g["pixel_values"]

    def edit(r):
        return r * 0.5

    fwd = jax.jit(functools.partial(bb.forward, capture=(0, 2), edits={1: edit}))
    a, b = fwd(params, x), bb.forward(params, x, capture=(0, 2), edits={1: edit})
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, atol=1e-5)


def test_grad_flows_through_an_edit(loaded):
    bb, params, g = loaded("vit")
    x = g["pixel_values"]
    direction = jax.random.normal(jax.random.key(0), (bb.d_model,))

    @jax.jit
    def loss(alpha):
        out = bb.forward(params, x, edits={1: lambda r: r + alpha * direction})
        return jnp.sum(out.logits[:, 3]) + jnp.sum(out.tokens ** 2) * 1e-2

    grad = jax.grad(loss)(0.3)
    eps = 1e-2
    fd = (loss(0.3 + eps) - loss(0.3 - eps)) / (2 * eps)
    assert abs(float(grad)) > 1e-3
    np.testing.assert_allclose(float(grad), float(fd), rtol=2e-2, atol=1e-3)
    # A per-token additive edit after the last block: the head reads CLS only.
    delta = jnp.zeros((2, bb.layout.n_tokens, bb.d_model))
    gd = jax.jit(jax.grad(lambda d: jnp.sum(bb.forward(params, x, edits={2: lambda r: r + d}).logits)))(delta)
    assert float(jnp.abs(gd[:, 0]).sum()) > 0
    np.testing.assert_array_equal(gd[:, 1:], 0.0)


def _count_dots(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)

    def count(jp):
        n = 0
        for eqn in jp.eqns:
            n += eqn.primitive.name == "dot_general"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jaxpr.jaxpr)


def test_full_false_skips_later_blocks(loaded):
    bb, params, g = loaded("vit")
    x = g["pixel_values"]
    short = bb.forward(params, x, capture=(0,), full=False)
    assert short.tokens is None and short.pooled is None and short.logits is None
    np.testing.assert_allclose(short.captured[0], bb.forward(params, x, capture=(0,)).captured[0], atol=1e-6)
    n_short = _count_dots(lambda p, im: bb.forward(p, im, capture=(0,), full=False), params, x)
    n_mid = _count_dots(lambda p, im: bb.forward(p, im, capture=(1,), full=False), params, x)
    n_full = _count_dots(lambda p, im: bb.forward(p, im, capture=(0,)), params, x)
    per_block = n_mid - n_short
    assert per_block > 0 and n_full == n_short + 2 * per_block + 1  # + 1: the classifier


def test_single_int_capture_and_bfloat16(loaded, cache_dir):
    bb, params, g = loaded("vit")
    out = bb.forward(params, g["pixel_values"], capture=1, full=False)
    assert list(out.captured) == [1]
    bb16, params16 = backbones.load(os.path.join(FIXTURES, "vit"), dtype=jnp.bfloat16, cache_dir=cache_dir)
    out16 = bb16.forward(params16, g["pixel_values"], capture=(2,))
    # bf16 matmul inputs, float32 everything else (test_mixed_precision.py checks the HLO): the
    # result is bf16-close but not equal to float32, and stays float32.
    assert out16.captured[2].dtype == jnp.float32
    np.testing.assert_allclose(out16.logits.astype(np.float32), g["logits"], atol=0.1, rtol=0.05)
    assert not np.array_equal(np.asarray(out16.logits, np.float32), g["logits"])


# ---------------------------------------------------------------------- loading and caching
def test_second_load_uses_the_cache(tmp_path, monkeypatch):
    src = os.path.join(FIXTURES, "dinov2")
    bb1, p1 = backbones.load(src, cache_dir=tmp_path)
    info = bb1.load_info
    assert not info.from_cache and os.path.isfile(info.cache_file) and info.cache_file.startswith(str(tmp_path))

    def no_reads(*a, **k):
        raise AssertionError("the source weights were converted again")

    monkeypatch.setattr(weights, "read_safetensors", no_reads)
    bb2, p2 = backbones.load(src, cache_dir=tmp_path)
    assert bb2.load_info.from_cache and bb2.load_info.cache_file == info.cache_file
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)


def test_corrupt_cache_is_rebuilt(tmp_path):
    src = os.path.join(FIXTURES, "clip_vision")
    bb, p = backbones.load(src, cache_dir=tmp_path)
    with open(bb.load_info.cache_file, "wb") as f:
        f.write(b"not a safetensors file")
    bb2, p2 = backbones.load(src, cache_dir=tmp_path)
    assert not bb2.load_info.from_cache
    np.testing.assert_array_equal(p["readout"]["norm"]["scale"], p2["readout"]["norm"]["scale"])
    assert backbones.load(src, cache_dir=tmp_path)[0].load_info.from_cache


def test_dinov2_layerscale_value_is_not_applied_twice(tmp_path):
    """Flax DINOv2 multiplies by config.layerscale_value twice; PyTorch only uses the learned lambda.

    PyTorch reads `layerscale_value` only at init, so changing it in config.json must not change
    the outputs of a trained checkpoint.
    """
    import json

    src = os.path.join(FIXTURES, "dinov2_registers")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layerscale_value"] = 0.25
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bb, params = backbones.load(tmp_path, cache_dir=False)
    g = np.load(os.path.join(FIXTURES, "dinov2_registers.npz"))
    np.testing.assert_allclose(bb.forward(params, g["pixel_values"]).tokens, g["last_hidden_state"], atol=ATOL)


def _as_transformers_flax_tree(state, prefix=""):
    """A PyTorch state dict as `transformers` 4's Flax classes saved it (`flax_model.msgpack`):
    Linear weights transposed to `kernel`, Conv2d weights OIHW -> HWIO, LayerNorm weights as
    `scale`, nn.Embedding weights as `embedding`; a base model without its prefix."""
    from flax.traverse_util import unflatten_dict

    tree = {}
    for name, value in state.items():
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        *path, leaf = name.split(".")
        if leaf == "weight" and value.ndim == 2 and path[-1].endswith("embedding"):
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 2:
            value, leaf = value.T, "kernel"
        elif leaf == "weight" and value.ndim == 4:
            value, leaf = value.transpose(2, 3, 1, 0), "kernel"
        elif leaf == "weight" and value.ndim == 1:
            leaf = "scale"
        tree[(*path, leaf)] = np.ascontiguousarray(value)
    return unflatten_dict(tree)


@pytest.mark.parametrize("case, prefix", [("dinov2_registers", "dinov2_with_registers."), ("clip_vision", "")])
def test_transformers_4_flax_msgpack_checkpoints_load(loaded, tmp_path, case, prefix):
    """`flax_model.msgpack` files that `transformers` 4 wrote (and saejax's shapes ViT before
    0.2) load through the same names: a base model saved without its prefix, and CLIP's
    position table as an `nn.Embed`."""
    from flax import serialization
    from safetensors.numpy import load_file

    bb, params, g = loaded(case)
    d = tmp_path / "flax_ckpt"
    d.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(FIXTURES, case, name), d / name)
    state = load_file(os.path.join(FIXTURES, case, "model.safetensors"))
    (d / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(_as_transformers_flax_tree(state, prefix)))
    bb2, params2 = backbones.load(d, cache_dir=False)
    assert bb2.load_info.weight_files == (str(d / "flax_model.msgpack"),)
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    out = bb2.forward(params2, g["pixel_values"], capture=(2,))
    np.testing.assert_allclose(out.captured[2], g["hidden_states"][3], atol=ATOL)


def test_hub_id_goes_through_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["config.json", "model.safetensors"])

    def fake_snapshot(repo, **kw):
        calls.append((repo, kw))
        return os.path.join(FIXTURES, "vit")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    bb, _ = backbones.load("google/vit-base-patch16-224", cache_dir=tmp_path)
    assert bb.family == "vit"
    assert calls[0][0] == "google/vit-base-patch16-224"
    assert "model.safetensors" in calls[0][1]["allow_patterns"]


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"could not fetch 'facebook/dinov2-base'.*local directory"):
        backbones.load("facebook/dinov2-base", cache_dir=False)


def test_known_models_table():
    assert backbones.KNOWN_MODELS["openai/clip-vit-base-patch16"] == "clip"
    assert backbones.KNOWN_MODELS["facebook/dinov2-base"] == "dinov2"
    assert backbones.KNOWN_MODELS["facebook/dinov2-with-registers-base"] == "dinov2_registers"
    assert backbones.KNOWN_MODELS["google/vit-base-patch16-224"] == "vit"
    assert set(backbones.KNOWN_MODELS.values()) == set(backbones.FAMILIES)


# ---------------------------------------------------------------------- preprocessing vs HF processors
def _random_images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


ODD_SIZES = [(231, 301), (300, 187), (97, 113), (225, 224), (61, 400)]


@pytest.mark.parametrize("family", ["clip", "dinov2", "vit"])
def test_preprocess_matches_hf_image_processors(family):
    import transformers

    if family == "clip":
        hf = transformers.CLIPImageProcessor()  # == openai/clip-vit-base-patch16's
    elif family == "dinov2":  # == facebook/dinov2-base's preprocessor_config.json
        hf = transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                            resample=3, image_mean=[0.485, 0.456, 0.406],
                                            image_std=[0.229, 0.224, 0.225])
    else:
        hf = transformers.ViTImageProcessor()  # == google/vit-base-patch16-224's
    images = _random_images(1, ODD_SIZES)
    expected = np.stack([
        np.transpose(hf(im, return_tensors="np", input_data_format="channels_last")["pixel_values"][0], (1, 2, 0))
        for im in images])
    ours = backbones.default_processing(family, 224)(images)  # list of different sizes
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    parsed = backbones.ImageProcessing.from_hf(hf.to_dict(), square_size=family == "vit")
    np.testing.assert_allclose(parsed(images), expected, atol=1e-6)
    same_size = _random_images(2, [(199, 257)] * 3)
    np.testing.assert_allclose(parsed(np.stack(same_size)), parsed(same_size), atol=0)


@pytest.mark.parametrize("family,size", [("clip", (224, 224)), ("dinov2", (256, 300)), ("dinov2", (310, 256)),
                                         ("vit", (224, 224))])
def test_a_batch_the_resize_leaves_alone_is_preprocessed_in_one_pass_to_the_same_bits(family, size):
    """A uint8 [N, H, W, 3] batch whose resize is the identity skips the per-image PIL round trip
    (and is only cropped, rescaled and normalised): the same bits as image by image."""
    processing = backbones.default_processing(family, 224)
    images = np.stack(_random_images(3, [size] * 4))
    assert processing._batch_is_resized(images)  # pylint: disable=protected-access
    np.testing.assert_array_equal(processing(images), processing(list(images)))
    assert not processing._batch_is_resized(np.stack(_random_images(4, [(199, 257)] * 2)))  # pylint: disable=protected-access


def test_old_style_preprocessor_config_with_int_sizes():
    import transformers

    old_clip = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    spec = backbones.ImageProcessing.from_hf(old_clip, square_size=False)
    assert spec == backbones.default_processing("clip", 224)
    old_vit = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
               "resample": 2, "size": 224}
    assert backbones.ImageProcessing.from_hf(old_vit, square_size=True) == backbones.default_processing("vit", 224)
    images = _random_images(3, [(260, 230)])
    hf = transformers.CLIPImageProcessor(**{k: v for k, v in old_clip.items() if k != "feature_extractor_type"})
    expected = np.transpose(hf(images[0], return_tensors="np", input_data_format="channels_last")["pixel_values"],
                            (0, 2, 3, 1))
    np.testing.assert_allclose(spec(images), expected, atol=1e-6)


def test_preprocess_grayscale_is_repeated(loaded):
    bb, _, _ = loaded("clip_vision")
    gray = np.random.default_rng(0).integers(0, 256, size=(2, 40, 50, 1), dtype=np.uint8)
    np.testing.assert_array_equal(bb.preprocess(gray), bb.preprocess(np.repeat(gray, 3, axis=-1)))


# ---------------------------------------------------------------------- errors
def test_bad_images_to_forward(loaded):
    bb, params, g = loaded("vit")
    x = g["pixel_values"]
    with pytest.raises(ValueError, match=r"channels-first.*\[B, 32, 32, 3\]"):
        bb.forward(params, np.transpose(x, (0, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"shape \(2, 40, 40, 3\).*expects \[B, 32, 32, 3\]"):
        bb.forward(params, np.zeros((2, 40, 40, 3), np.float32))
    with pytest.raises(ValueError, match=r"dtype uint8.*preprocess"):
        bb.forward(params, np.zeros((2, 32, 32, 3), np.uint8))


def test_bad_images_to_preprocess(loaded):
    bb, _, _ = loaded("dinov2")
    with pytest.raises(ValueError, match=r"channels-first.*NHWC"):
        bb.preprocess(np.zeros((2, 3, 50, 60), np.uint8))
    with pytest.raises(ValueError, match=r"uint8"):
        bb.preprocess(np.zeros((2, 50, 60, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*batch axis"):
        bb.preprocess(np.zeros((50, 60, 3), np.uint8))
    with pytest.raises(ValueError, match=r"4 channels"):
        bb.preprocess(np.zeros((2, 50, 60, 4), np.uint8))


def test_bad_layer_indices_and_edits(loaded):
    bb, params, g = loaded("clip_vision")
    x = g["pixel_values"]
    for bad in (3, -1, 1.0):
        with pytest.raises(ValueError, match=r"valid hook indices are 0 \.\. 2"):
            bb.forward(params, x, capture=(bad,))
    with pytest.raises(ValueError, match=r"edits: block index 7.*0 \.\. 2"):
        bb.forward(params, x, edits={7: lambda r: r})
    with pytest.raises(ValueError, match=r"edits\[1\] returned shape \(2, 17\)"):
        bb.forward(params, x, edits={1: lambda r: r[..., 0]})
    with pytest.raises(ValueError, match=r"callable"):
        bb.forward(params, x, edits={1: 3.0})
    with pytest.raises(ValueError, match=r"after the last captured block 0"):
        bb.forward(params, x, capture=(0,), edits={2: lambda r: r}, full=False)
    with pytest.raises(ValueError, match=r"at least one capture"):
        bb.forward(params, x, full=False)
    with pytest.raises(ValueError, match=r"0 <= start <= stop <= n_layers=3"):
        bb.run_blocks(params, bb.embed(params, x), 2, 4)
    with pytest.raises(ValueError, match=r"expected \[B, 17, 32\]"):
        bb.run_blocks(params, jnp.zeros((2, 16, 32)), 0, 1)
    with pytest.raises(ValueError, match=r"finish: block index 3 out of range; valid hook indices are 0 .. 2"):
        bb.finish(params, bb.embed(params, x), 3)


def test_unknown_name_lists_families():
    with pytest.raises(ValueError, match=r"unknown backbone 'not/a-model'.*clip, dinov2, dinov2_registers, vit, siglip"):
        backbones.load("not/a-model")


def test_directory_without_weights(tmp_path):
    from saejax.checkpoint import CheckpointError

    shutil.copy(os.path.join(FIXTURES, "vit", "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no weights.*model\.safetensors.*model\.safetensors\.index\.json"
                                                r".*pytorch_model\.bin.*flax_model\.msgpack"):
        backbones.load(tmp_path, cache_dir=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "pytorch_model.bin")) + ": it is not a readable"):
        backbones.load(tmp_path, cache_dir=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        backbones.load(tmp_path, cache_dir=False)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"model_type 'bert'.*clip_vision_model.*dinov2_with_registers"):
        backbones.load(tmp_path, cache_dir=False)


def test_weights_that_do_not_fit_the_config(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "clip_vision", "config.json"), tmp_path / "config.json")
    shutil.copy(os.path.join(FIXTURES, "vit", "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not match the clip config\.json: \d+ missing"):
        backbones.load(tmp_path, cache_dir=False)


def test_missing_shard(tmp_path):
    src = os.path.join(FIXTURES, "clip_full")
    for name in os.listdir(src):
        if name != "model-00003-of-00005.safetensors":
            shutil.copy(os.path.join(src, name), tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00005\.safetensors"):
        backbones.load(tmp_path, cache_dir=False)


def _copy_fixture(case, tmp_path):
    shutil.copytree(os.path.join(FIXTURES, case), tmp_path / case)
    return tmp_path / case


def test_broken_files_are_errors_that_name_the_file(tmp_path):
    from saejax.checkpoint import CheckpointError

    bad_json = _copy_fixture("clip_vision", tmp_path / "json")
    (bad_json / "config.json").write_text('{"model_type": "clip_vision_model", ')
    with pytest.raises(CheckpointError, match=str(bad_json / "config.json") + ": not a readable config.json"):
        backbones.load(bad_json, cache_dir=False)

    truncated = _copy_fixture("vit", tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=str(weights) + r": tensor '.*' has data offsets .* \(truncated\?\)"):
        backbones.load(truncated, cache_dir=False)

    from flax import serialization
    from safetensors.numpy import load_file

    msgpack = _copy_fixture("vit", tmp_path / "msgpack")
    state = load_file(msgpack / "model.safetensors")
    os.remove(msgpack / "model.safetensors")
    weights = msgpack / "flax_model.msgpack"
    weights.write_bytes(serialization.msgpack_serialize(_as_transformers_flax_tree(state))[:5000])
    with pytest.raises(CheckpointError, match=str(weights) + ": unreadable Flax msgpack file"):
        backbones.load(msgpack, cache_dir=False)

    pickled = _copy_fixture("vit_pooler", tmp_path / "pickled")
    weights = pickled / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-3000])
    with pytest.raises(CheckpointError, match=str(weights) + ": it is not a readable torch.save zip archive"):
        backbones.load(pickled, cache_dir=False)


@pytest.mark.parametrize("change,message", [
    ("nan", r"tensor 'vit.embeddings.cls_token' holds 1 NaN or Inf"),
    ("int", r"tensor 'vit.embeddings.cls_token' has dtype int32, expected a float type"),
    ("fewer_layers", r"the weights hold blocks \[2\] beyond config.json's num_hidden_layers=2"),
])
def test_weights_that_are_not_finite_not_floats_or_beyond_the_config_are_refused(tmp_path, change, message):
    import json

    import safetensors.numpy

    path = _copy_fixture("vit", tmp_path)
    weights = path / "model.safetensors"
    state = safetensors.numpy.load_file(weights)
    if change == "nan":
        state["vit.embeddings.cls_token"].reshape(-1)[3] = np.nan
    elif change == "int":
        state["vit.embeddings.cls_token"] = state["vit.embeddings.cls_token"].astype(np.int32)
    else:
        config = json.loads((path / "config.json").read_text())
        config["num_hidden_layers"] = 2  # the weights have 3 blocks
        (path / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file(state, weights)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*: " + message):
        backbones.load(path, cache_dir=False)


@pytest.mark.parametrize("case, size, grid", [("dinov2", 84, 6), ("clip_vision", 48, 6), ("vit", 40, 5)])
def test_another_resolution_matches_pytorch(cache_dir, case, size, grid):
    """`image_size=S` runs a checkpoint on another grid than its position embeddings': as
    PyTorch does (DINOv2 always; CLIP and ViT with `interpolate_pos_encoding=True`)."""
    bb, params = backbones.load(os.path.join(FIXTURES, case), cache_dir=cache_dir, image_size=size)
    g = np.load(os.path.join(FIXTURES, f"{case}_at_{size}px.npz"))
    assert (bb.image_size, bb.grid, bb.layout.n_tokens) == (size, (grid, grid), 1 + grid * grid)
    np.testing.assert_allclose(bb.preprocess(g["images_uint8"]), g["pixel_values"], atol=2e-3)
    out = bb.forward(params, g["pixel_values"], capture=tuple(range(bb.n_layers)))
    np.testing.assert_allclose(bb.embed(params, g["pixel_values"]), g["hidden_states"][0], atol=ATOL)
    for i in range(bb.n_layers):
        np.testing.assert_allclose(out.captured[i], g["hidden_states"][i + 1], atol=ATOL)
    np.testing.assert_allclose(out.tokens, g["last_hidden_state"], atol=ATOL)


@pytest.mark.parametrize("case, size", [("dinov2", 80), ("dinov2", 0), ("vit", 36), ("clip_vision", True)])
def test_image_size_off_the_patch_grid_is_an_error(case, size):
    with pytest.raises(ValueError, match="image_size must be a positive multiple of the patch size"):
        backbones.load(os.path.join(FIXTURES, case), cache_dir=False, image_size=size)


def test_clip_and_vit_refuse_another_processor_size_unless_asked(tmp_path):
    """A preprocessor_config.json that disagrees with config.image_size is an error for CLIP and
    ViT (PyTorch refuses such images without interpolate_pos_encoding); image_size= asks for it."""
    import json

    src = os.path.join(FIXTURES, "vit")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    proc = json.loads((tmp_path / "preprocessor_config.json").read_text())
    proc["size"] = {"height": 40, "width": 40}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ValueError, match="yields 40 px images but the vit model expects 32 px"):
        backbones.load(tmp_path, cache_dir=False)
    assert backbones.load(tmp_path, cache_dir=False, image_size=40)[0].grid == (5, 5)


def test_dinov2_without_a_processor_config_runs_at_the_size_asked(tmp_path):
    """Without preprocessor_config.json a DINOv2 directory gets the hub processor (256 -> 224);
    image_size= still moves it to another grid, and the result is PyTorch's."""
    src = os.path.join(FIXTURES, "dinov2")
    for name in os.listdir(src):
        if name != "preprocessor_config.json":
            shutil.copy(os.path.join(src, name), tmp_path / name)
    assert backbones.load(tmp_path, cache_dir=False)[0].image_size == 224
    bb, params = backbones.load(tmp_path, cache_dir=False, image_size=84)
    g = np.load(os.path.join(FIXTURES, "dinov2_at_84px.npz"))
    x = bb.preprocess(g["images_uint8"])
    np.testing.assert_allclose(x, g["pixel_values"], atol=2e-3)
    np.testing.assert_allclose(bb.forward(params, g["pixel_values"]).tokens, g["last_hidden_state"], atol=ATOL)


@pytest.mark.parametrize("family", ["clip", "dinov2_registers", "siglip"])
def test_abstract_backbone_has_the_loaded_models_shapes_and_compiles(tmp_path, family):
    """`backbones.abstract` gives what `load` would, as shapes only: the same Backbone
    geometry and params tree, and a forward that lowers without any weights."""
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    if family == "dinov2_registers":
        sizes = dict(sizes, num_register_tokens=2)
        del sizes["intermediate_size"]
    bb, params = backbones.load(backbones.create_random(family, str(tmp_path / family), **sizes), cache_dir=False)
    abstract_bb, abstract_params = backbones.abstract(family, input_size=None if family == "siglip" else 32, **sizes)
    assert (abstract_bb.layout, abstract_bb.grid, abstract_bb.d_model) == (bb.layout, bb.grid, bb.d_model)
    assert jax.tree.structure(abstract_params) == jax.tree.structure(params)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, abstract_params, params)) == \
        [True] * len(jax.tree.leaves(params))
    images = jax.ShapeDtypeStruct((2, bb.image_size, bb.image_size, 3), jnp.float32)
    compiled = jax.jit(lambda p, x: abstract_bb.forward(p, x, capture=(1,)).captured[1]).lower(
        abstract_params, images).compile()
    assert compiled.cost_analysis()["flops"] > 0
