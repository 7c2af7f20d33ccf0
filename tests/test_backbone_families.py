"""The newer backbone families: SigLIP / SigLIP 2 (own modules), DINOv3 (own modules) and
open_clip checkpoints (mapped onto CLIP), against goldens from the real PyTorch models.

Goldens: tests/fixtures/make_backbone_fixtures.py `own_families` (transformers 4.57.6) and
tests/fixtures/make_open_clip_fixtures.py (open_clip 3.3.0). Tiny random configs with every
weight perturbed; the suite reads them without torch.
"""

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saejax.backbones as backbones
from backbone_checks import check_edit_equals_running_the_remaining_blocks_by_hand
from saejax import activations, shards
from saejax.checkpoint import CheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")
ATOL = 1e-4
# golden -> (fixture directory, load(image_size=), family, grid, TokenLayout)
CASES = {
    "siglip": ("siglip", None, "siglip", 4, backbones.TokenLayout(None, (0, 0), (0, 16), 16)),
    "siglip_at_48px": ("siglip", 48, "siglip", 6, backbones.TokenLayout(None, (0, 0), (0, 36), 36)),
    "siglip2_naflex": ("siglip2_naflex", None, "siglip2", 5, backbones.TokenLayout(None, (0, 0), (0, 25), 25)),
    "dinov3": ("dinov3", 40, "dinov3", 5, backbones.TokenLayout(0, (1, 5), (5, 30), 30)),
    "dinov3_swiglu": ("dinov3_swiglu", None, "dinov3", 4, backbones.TokenLayout(0, (1, 3), (3, 19), 19)),
    "open_clip_quickgelu": ("open_clip_quickgelu", None, "clip", 4, backbones.TokenLayout(0, (1, 1), (1, 17), 17)),
    "open_clip_gelu_bin": ("open_clip_gelu_bin", None, "clip", 4, backbones.TokenLayout(0, (1, 1), (1, 17), 17)),
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("saejax_cache"))
    cache = {}

    def get(case):
        if case not in cache:
            directory, size = CASES[case][:2]
            bb, params = backbones.load(os.path.join(FIXTURES, directory), cache_dir=cache_dir, image_size=size)
            cache[case] = (bb, params, dict(np.load(os.path.join(FIXTURES, f"{case}.npz"))))
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pytorch_golden(loaded, case):
    """Every residual, the final tokens, the pooled output (SigLIP: the attention-pooling head;
    open_clip: ln_post(CLS) and the projected `encode_image`) and the preprocessing."""
    bb, params, g = loaded(case)
    _, _, family, grid, layout = CASES[case]
    assert (bb.family, bb.grid, bb.layout, bb.d_model, bb.n_layers) == (family, (grid, grid), layout, 32, 3)
    x = g["pixel_values"]
    if "images_uint8" in g:
        np.testing.assert_allclose(bb.preprocess(g["images_uint8"]), x, atol=1e-6)
    np.testing.assert_allclose(bb.embed(params, x), g["hidden_states"][0], atol=ATOL)
    out = jax.jit(lambda p, im: bb.forward(p, im, capture=(0, 1, 2)))(params, x)
    for i in range(bb.n_layers):  # hook i == the PyTorch block i's output
        np.testing.assert_allclose(out.captured[i], g["hidden_states"][i + 1], atol=ATOL, err_msg=f"block {i}")
    if "last_hidden_state" in g:
        np.testing.assert_allclose(out.tokens, g["last_hidden_state"], atol=ATOL)
    np.testing.assert_allclose(out.pooled, g["pooler_output"], atol=ATOL)
    if "image_embeds" in g:
        np.testing.assert_allclose(out.pooled @ backbones.clip_projection(params), g["image_embeds"], atol=ATOL)
    assert out.logits is None


@pytest.mark.parametrize("case", ["siglip", "siglip2_naflex", "dinov3", "open_clip_gelu_bin"])
def test_edit_equals_running_the_remaining_blocks_by_hand(loaded, case):
    bb, params, g = loaded(case)
    x = g["pixel_values"]
    check_edit_equals_running_the_remaining_blocks_by_hand(bb, params, x, at=0)
    identity = bb.forward(params, x, edits={1: lambda r: r})
    np.testing.assert_array_equal(identity.pooled, bb.forward(params, x).pooled)


def test_siglip_has_no_cls_token(loaded):
    bb, params, _ = loaded("siglip")
    assert bb.layout.cls is None
    with pytest.raises(ValueError, match="tokens='cls': this backbone has no CLS token"):
        activations.token_indices(bb.layout, "cls")
    np.testing.assert_array_equal(activations.token_indices(bb.layout, "patches"), np.arange(16))
    with pytest.raises(ValueError, match="the siglip backbone has no CLS token"):
        shards.write_shards("/nonexistent", bb, params, source=None, layers=(1,), cls_token=True)


def test_bfloat16_compute(loaded):
    bb, params, g = loaded("dinov3_swiglu")
    bb16, params16 = backbones.load(os.path.join(FIXTURES, "dinov3_swiglu"), dtype=jnp.bfloat16, cache_dir=False)
    pooled = np.asarray(bb16.forward(params16, g["pixel_values"]).pooled, np.float32)
    assert not np.array_equal(pooled, g["pooler_output"])
    np.testing.assert_allclose(pooled, g["pooler_output"], atol=0.15, rtol=0.05)


def test_dinov3_runs_at_any_multiple_of_the_patch_size(loaded):
    """RoPE needs no interpolation: the 32 px config runs at 40 px (the golden) and 24 px, and
    an off-grid size is an error."""
    bb, _, _ = loaded("dinov3")
    assert bb.image_size == 40 and bb.config.image_size == 32
    small, _ = backbones.load(os.path.join(FIXTURES, "dinov3"), cache_dir=False, image_size=24)
    assert small.grid == (3, 3) and small.layout.n_tokens == 1 + 4 + 9
    with pytest.raises(ValueError, match="image_size must be a positive multiple of the patch size 8, got 36"):
        backbones.load(os.path.join(FIXTURES, "dinov3"), cache_dir=False, image_size=36)


def _copy(case, tmp_path):
    return shutil.copytree(os.path.join(FIXTURES, case), tmp_path / case)


def test_siglip_refuses_another_processor_size_unless_asked(tmp_path):
    path = _copy("siglip", tmp_path)
    proc = json.loads((path / "preprocessor_config.json").read_text())
    proc["size"] = {"height": 48, "width": 48}
    (path / "preprocessor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ValueError, match="yields 48 px images but the siglip model expects 32 px"):
        backbones.load(path, cache_dir=False)
    assert backbones.load(path, cache_dir=False, image_size=48)[0].grid == (6, 6)


def test_naflex_default_size_is_the_largest_square_of_max_num_patches(tmp_path):
    path = _copy("siglip2_naflex", tmp_path)
    os.remove(path / "preprocessor_config.json")  # the config's 16 positions: a 4 x 4 grid of 8 px patches
    assert backbones.load(path, cache_dir=False)[0].image_size == 32
    proc = json.loads(open(os.path.join(FIXTURES, "siglip2_naflex", "preprocessor_config.json")).read())
    (path / "preprocessor_config.json").write_text(json.dumps({**proc, "max_num_patches": 50}))
    assert backbones.load(path, cache_dir=False)[0].grid == (7, 7)  # isqrt(50) = 7


def test_own_family_weights_are_checked(tmp_path):
    path = _copy("dinov3", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"blocks \[2\] beyond config.json's num_hidden_layers=2"):
        backbones.load(path, cache_dir=False)
    (path / "config.json").write_text(json.dumps({**config, "use_gated_mlp": True}))
    with pytest.raises(ValueError, match=r"do not match the dinov3 config.json: 6 missing .*blocks.0.mlp.gate.kernel"):
        backbones.load(path, cache_dir=False)
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "mystery"}))
    with pytest.raises(ValueError, match="hidden_act 'mystery' is not supported"):
        backbones.load(path, cache_dir=False)


def test_open_clip_second_load_uses_the_cache(tmp_path):
    src = os.path.join(FIXTURES, "open_clip_gelu_bin")
    first, p1 = backbones.load(src, cache_dir=tmp_path)
    second, p2 = backbones.load(src, cache_dir=tmp_path)
    assert not first.load_info.from_cache and second.load_info.from_cache
    assert first.load_info.weight_files == (os.path.join(src, "open_clip_pytorch_model.bin"),)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"layers": [3, 4, 6, 3]}, "only ViT towers"),
    ({"ls_init_value": 0.1}, r"vision_cfg \{'ls_init_value': 0.1\} is not the CLIP ViT architecture"),
    ({"attentional_pool": True}, r"vision_cfg \{'attentional_pool': True\}"),
    ({"timm_model_name": "vit_base_patch16_224"}, r"\{'timm_model_name': 'vit_base_patch16_224'\}"),
])
def test_open_clip_towers_that_are_not_clip_vits_are_refused(tmp_path, change, message):
    path = _copy("open_clip_quickgelu", tmp_path)
    config = json.loads((path / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"].update(change)
    (path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        backbones.load(path, cache_dir=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_open_clip_pickle_is_read_without_running_code(tmp_path):
    path = _copy("open_clip_gelu_bin", tmp_path)
    weights = path / "open_clip_pytorch_model.bin"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"visual.conv1.weight": _Evil()}))
    weights.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=re.escape(str(weights)) + ": unsafe checkpoint: refused pickle global"):
        backbones.load(path, cache_dir=False)
    weights.write_bytes(open(os.path.join(FIXTURES, "open_clip_gelu_bin", weights.name), "rb").read()[:5000])
    with pytest.raises(CheckpointError, match=re.escape(str(weights)) + ": it is not a readable torch.save zip archive"):
        backbones.load(path, cache_dir=False)


def test_open_clip_hub_id_fetches_the_open_clip_files(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: [
        "open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors", "config.json"])

    def fake_snapshot(repo, **kw):
        calls.append((repo, kw))
        return os.path.join(FIXTURES, "open_clip_quickgelu")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    bb, _ = backbones.load("timm/vit_base_patch16_clip_224.openai", cache_dir=tmp_path)
    assert bb.family == "clip" and bb.config.hidden_act == "quick_gelu"
    patterns = calls[0][1]["allow_patterns"]
    assert "open_clip_config.json" in patterns and "open_clip_model.safetensors" in patterns
    assert "open_clip_pytorch_model.bin" not in patterns  # safetensors preferred


def test_timm_style_config_json_does_not_hide_open_clip(tmp_path):
    """timm's hub repos carry a config.json without `model_type` next to open_clip_config.json."""
    path = _copy("open_clip_quickgelu", tmp_path)
    (path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224"}))
    assert backbones.load(path, cache_dir=False)[0].family == "clip"


def test_registry_and_known_models():
    assert set(backbones.FAMILIES) == {"clip", "dinov2", "dinov2_registers", "vit", "siglip", "siglip2", "dinov3"}
    assert backbones.KNOWN_MODELS["google/siglip2-base-patch16-224"] == "siglip"
    assert backbones.KNOWN_MODELS["google/siglip2-base-patch16-naflex"] == "siglip2"
    assert backbones.KNOWN_MODELS["facebook/dinov3-vitb16-pretrain-lvd1689m"] == "dinov3"
    assert backbones.KNOWN_MODELS["imageomics/bioclip"] == "clip"
    assert backbones.MODEL_TYPES["dinov3_vit"] == "dinov3" and backbones.MODEL_TYPES["siglip"] == "siglip"


@pytest.mark.parametrize("config_name, family, hub_id", [
    ("siglip2_b16", "siglip", "google/siglip2-base-patch16-224"),
    ("dinov3_b16", "dinov3", "facebook/dinov3-vitb16-pretrain-lvd1689m"),
    ("bioclip_b16", "clip", "imageomics/bioclip"),
])
def test_family_configs_name_known_models_and_their_small_variant_builds(config_name, family, hub_id, tmp_path):
    import importlib

    from saejax.cli.builders import build_backbone

    module = importlib.import_module(f"saejax.configs.{config_name}")
    full = module.get_config()
    assert full.backbone.name == hub_id and backbones.KNOWN_MODELS[hub_id] == family and full.tokens == "patches"
    small = module.get_config("small")
    small.backbone.random.directory = str(tmp_path / "backbone")
    bb, params = build_backbone(small.backbone)
    assert bb.family == family
    rows = activations.token_indices(bb.layout, small.tokens)
    out = bb.forward(params, bb.preprocess(np.full((1, 40, 36, 3), 90, np.uint8)), capture=small.layers, full=False)
    assert out.captured[small.layers[0]][:, rows].shape == (1, bb.layout.n_patches, bb.d_model)


def test_resize_weights_match_torch():
    """The 1-D weights behind every position-grid resize, against torch's `F.interpolate`
    (align_corners=False) up and down: NaFlex's antialiased bilinear, DINOv2's bicubic with
    (registers) and without antialias."""
    from saejax.backbones import _interp

    golden = np.load(os.path.join(FIXTURES, "interpolation.npz"))
    made = {"bilinear_aa": _interp.bilinear_antialiased_matrix,
            "bicubic_aa": lambda a, b: _interp.bicubic_matrix(a, b, antialias=True),
            "bicubic": lambda a, b: _interp.bicubic_matrix(a, b, antialias=False)}
    assert len(golden.files) == 72
    for key in golden.files:
        kind, n_in, n_out = key.rsplit("_", 2)
        np.testing.assert_allclose(made[kind](int(n_in), int(n_out)), golden[key], atol=1e-12, err_msg=key)


def test_clip_text_tower_and_zero_shot_logits_match_pytorch():
    """A full CLIPModel's text embeddings (`get_text_features`) and zero-shot logits
    (`logits_per_image`) against PyTorch, pooled as PyTorch pools: at the highest id when
    `eos_token_id` is 2 (OpenAI's hub configs), else at the first `eos_token_id` (the
    `clip_full_text_eos` golden, made with `transformers` 5.25.0)."""
    import copy

    from saejax import fidelity

    bb, params = backbones.load(os.path.join(FIXTURES, "clip_full"), cache_dir=False)
    def with_eos(eos):
        text_config = copy.deepcopy(bb.text_config)
        text_config.eos_token_id = eos
        return dataclasses.replace(bb, text_config=text_config)

    g = np.load(os.path.join(FIXTURES, "clip_full_text_eos.npz"))
    text = backbones.clip_text_embeddings(with_eos(60), params, g["input_ids"], g["attention_mask"])
    np.testing.assert_allclose(text, g["text_embeds"], atol=ATOL)
    g = np.load(os.path.join(FIXTURES, "clip_full_text.npz"))
    bb = with_eos(2)
    text = backbones.clip_text_embeddings(bb, params, g["input_ids"], g["attention_mask"])
    np.testing.assert_allclose(text, g["text_embeds"], atol=ATOL)
    head = fidelity.zero_shot_head(backbones.clip_projection(params), text, backbones.clip_logit_scale(params))
    out = bb.forward(params, np.load(os.path.join(FIXTURES, "clip_full.npz"))["pixel_values"])
    np.testing.assert_allclose(head(out.tokens, out.pooled, out.logits), g["logits_per_image"], atol=ATOL)
    vision_only, vision_params = backbones.load(os.path.join(FIXTURES, "clip_vision"), cache_dir=False)
    with pytest.raises(ValueError, match="needs a full CLIPModel checkpoint with its text tower"):
        backbones.clip_text_embeddings(vision_only, vision_params, g["input_ids"])
    with pytest.raises(ValueError, match="this backbone has no logit_scale"):
        backbones.clip_logit_scale(vision_params)
