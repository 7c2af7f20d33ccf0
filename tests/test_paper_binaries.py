"""The paper's experiment binaries on their `:small` configs: tiny random backbones, tiny trees
in the official layouts, numbers that could be wrong."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.cli import ade20k_edit, cub_edit, semprobe
from saejax.configs import ade20k as ade20k_config
from saejax.configs import cub as cub_config
from saejax.configs import semprobe as semprobe_config
from saejax.cli.builders import build_backbone, build_sae
from saejax import data, probes
from saejax.checkpoint import save_sae
from saejax.datasets import ade20k
from saejax.analysis.site import Site, cropped_processing


def planted_sae(config, root, latent, target_class, path):
    """A random SAE whose `latent` reads the direction that separates `target_class`'s patches
    from the others at the config's layer, firing on one side of the midpoint."""
    bb, bb_params = build_backbone(config.backbone)
    ae, params, _ = build_sae(config.sae, bb.d_model)
    readout = Site(bb, bb_params, layer=config.layer, ae=ae, sae_params=params,
                      processing=cropped_processing(bb, config.data.image_size))
    # Fitted on both splits' patches, so that on the validation patches the planted latent is
    # the class's detector (a random latent of the untrained backbone can come close: colours
    # tell the tiny tree's classes apart).
    resid, labels = [], []
    for split in ("training", "validation"):
        source = ade20k.source(root, split, image_size=config.data.image_size, short_side=config.data.short_side,
                               skip_unreadable=True)
        batch = next(data.one_pass(source, len(source)))
        resid.append(np.asarray(readout.encode(batch.images)["resid"]).reshape(-1, bb.d_model))
        labels.append(data.patch_mode_labels(batch.masks, config.data.image_size // bb.grid[0]).reshape(-1))
    resid, labels = np.concatenate(resid), np.concatenate(labels)
    # A logistic probe for the class on these residuals gives the latent's direction and cut.
    probe = probes.train_linear_probe(jax.random.key(0), jnp.asarray(resid), jnp.asarray(labels == target_class,
                                      jnp.int32), 2, epochs=300, batch_size=len(resid), learning_rate=5e-2)
    direction, cut = probe.w[:, 1] - probe.w[:, 0], probe.b[1] - probe.b[0]
    params = params.replace(w_enc=params.w_enc.at[:, latent].set(direction), b_enc=params.b_enc.at[latent].set(cut),
                            b_dec=jnp.zeros(bb.d_model))
    return save_sae(path, ae, params)


def test_ade20k_small_probe_and_quantitative_test_find_a_planted_latent(tmp_path):
    config = ade20k_config.get_config("small")
    config.data.root = str(tmp_path / "ADEChallengeData2016")
    ade20k.write_tiny_tree(config.data.root, **config.data.tiny_tree)
    config.sae = dict(kind="saejax", path=planted_sae(config, config.data.root, 7, 2, tmp_path / "sae"))
    result = ade20k_edit.run(config, str(tmp_path / "out"))

    # Colours tell the tiny tree's classes apart (in its CMYK and mixed-size images too); the
    # untrained backbone's probe also calls a few pixels classes the tree never has (IoU 0).
    assert all(result["probe"]["iou"][f"thing{c}"] > 0.6 for c in (1, 2, 3)), result["probe"]["iou"]
    assert result["probe"]["pixel_accuracy"] > 0.8
    assert result["probe"]["skipped_images"]["training"]["count"] == 1  # the truncated JPEG
    assert json.load(open(tmp_path / "out" / "quantitative.json"))["skipped_images"]["validation"]["count"] == 0
    by_class = {r["class"]: r for r in result["classes"]}
    assert set(by_class) == {1, 2, 3}
    assert by_class[2]["best_f1"]["latent"] == 7 and by_class[2]["best_f1"]["f1"] > 0.8
    assert by_class[1]["config"]["latent"] == 0  # the config's latent for class 1 is measured too
    rows = list(csv.DictReader(open(tmp_path / "out" / "quantitative.csv")))
    assert len(rows) == 3 * 3 * 2 + 2  # 3 classes x 3 methods x 2 modes, plus the config latent's class
    summary = json.load(open(tmp_path / "out" / "quantitative.json"))["summary"]
    for method in ("best_f1", "random_latent", "random_direction"):
        for mode in ("all_tokens", "where_active"):
            rate = summary[method][mode]["target_change_rate"]
            assert 0 <= rate["mean"] <= 1 and rate["std"] >= 0


def test_cub_small_probe_proposal_and_slider_curve(tmp_path):
    config = cub_config.get_config("small")
    config.data.root = str(tmp_path / "CUB_200_2011")
    result = cub_edit.run(config, str(tmp_path / "out"))
    assert result["probe"]["test_accuracy"] > 0.5  # four colour-coded species; chance is 0.25
    # The tree's images are of mixed sizes and formats; its one truncated JPEG is skipped and counted.
    skipped = json.load(open(tmp_path / "out" / "probe.json"))["skipped_images"]
    assert (skipped["train"]["count"], skipped["test"]["count"]) == (1, 0)
    assert "Groove_Billed_Ani_0005_796133.jpg: cannot read image" in skipped["train"]["files"][0]
    assert result["probe"]["train_images"] == 11
    edit = json.load(open(tmp_path / "out" / "edit.json"))
    sums = [entry["sum_over_patches"] for entry in edit["latents"]]
    assert len(sums) == 3 and sums == sorted(sums, reverse=True) and sums[-1] > 0
    # The config's slider (-10) is on the curve: the "after" bars are that point of the curve.
    np.testing.assert_allclose(result["curve"][config.sliders.index(config.slider)], result["after"], atol=1e-6)
    assert not np.allclose(result["before"], result["after"], atol=1e-3)
    assert (tmp_path / "out" / "edit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config.latents = (5, 128)
    with pytest.raises(ValueError, match="latent id 128 is out of range for an SAE with d_sae=128"):
        cub_edit.run(config, str(tmp_path / "bad"))


def test_semprobe_small_table_with_baselines_and_exemplars(tmp_path):
    config = semprobe_config.get_config("small")
    config.data.root = str(tmp_path / "concepts")
    table = semprobe.run(config, str(tmp_path / "out"))
    assert set(table) == {"blue_disc", "red_square"} and all(set(v) == {"clip", "dinov2"} for v in table.values())
    written = json.load(open(tmp_path / "out" / "semprobe.json"))
    assert written["concepts"] == table
    assert written["skipped_images"]["count"] == 1 and "neg_008.jpg" in written["skipped_images"]["files"][0]
    for concept, models in table.items():
        for model, entry in models.items():
            assert (entry["positives"], entry["negatives"]) == (8, 8)  # 9 negatives, one truncated
            assert entry["f1"] == sorted(entry["f1"], reverse=True) and len(entry["latents"]) == 5
            # The tree's concepts are plain to see: the best latent beats random ones, significantly.
            assert entry["f1"][0] >= entry["random_f1_p95"] and entry["p_value"] <= 0.05, (concept, model, entry)
            png = tmp_path / "out" / f"exemplars_{model}_{concept}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(tmp_path / "out" / "semprobe.csv")))
    assert len(rows) == 4 and {r["model"] for r in rows} == {"clip", "dinov2"}


def test_build_sae_reads_saev_files_with_their_normalisation(tmp_path):
    import ml_collections

    saev = os.path.join(os.path.dirname(__file__), "fixtures", "saev_sae.pt")
    ae, _, norm = build_sae(ml_collections.ConfigDict(dict(kind="saev", path=saev, norm_scalar=0.0)), 16)
    assert (ae.d_sae, norm) == (64, None)  # CLIP's published SAE reads raw residuals
    with pytest.raises(ValueError, match="sae.norm_scalar=2.0 needs sae.norm_mean"):
        build_sae(ml_collections.ConfigDict(dict(kind="saev", path=saev, norm_mean="", norm_scalar=2.0)), 16)
    np.save(tmp_path / "mu.npy", np.full(16, 0.5, np.float32))
    _, _, norm = build_sae(ml_collections.ConfigDict(dict(kind="saev", path=saev, norm_mean=str(tmp_path / "mu.npy"),
                                                          norm_scalar=2.0)), 16)
    assert float(norm.scalar) == 2.0 and float(norm.mean[0]) == 0.5
    with pytest.raises(ValueError, match="the SAE reads d_model=16, the backbone has 32"):
        build_sae(ml_collections.ConfigDict(dict(kind="saev", path=saev, norm_scalar=0.0)), 32)
