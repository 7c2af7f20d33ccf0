"""The demo end to end in its reduced mode: the world, the ViT, the SAE, features, interventions
and the report. (The full demo's numbers are in README; they take minutes.)"""

import json
import os
import subprocess
import sys

import saejax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "--config=shapes_demo:small"


def test_small_demo_writes_the_report_and_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.demo", f"--workdir={tmp_path}", SMALL], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert isinstance(summary["seconds"], float)
    assert summary["written_by"]["saejax"] == saejax.__version__
    vit_info = json.load(open(tmp_path / "vit" / "training.json"))
    assert vit_info["written_by"] == summary["written_by"]
    assert 0.0 <= summary["vit"]["val_accuracy"] <= 1.0 and summary["vit"]["targets"] == "factorised"
    assert summary["backbone"]["family"] == "vit" and summary["backbone"]["grid"] == [8, 8]
    assert set(summary["probes"]) == {"colour_accuracy", "shape_accuracy", "size_accuracy", "texture_accuracy"}
    assert set(summary["sae"]) >= {"l0", "nmse", "dead_fraction", "dense_fraction"}
    names = [c["name"] for c in summary["concepts"]]
    assert names == ["circle", "square", "triangle", "cross", "red", "green", "blue", "yellow", "background",
                     "small", "large", "noise", "stripes", "checker", "gradient"]
    assert [c["factor"] for c in summary["concepts"]] == ["shape"] * 4 + ["colour"] * 5 + ["size"] * 2 + ["texture"] * 4
    for concept in summary["concepts"]:
        assert isinstance(concept["latent"], int) and 0 <= concept["f1"] <= 1 and 0 <= concept["probe_f1"] <= 1
        union = concept["union"]
        assert union["latents"][0] == concept["latent"] and 1 <= len(union["latents"]) <= 4
        assert concept["f1"] - 1e-6 <= union["f1"] <= 1  # the best union starts from the best latent
        others = concept["random_latent"]["latents"]
        assert len(set(others)) == 3 and concept["latent"] not in others
        # Every patch where the latent fired is counted once: covered, partly covered, or neither.
        n_patches = 120 * 64  # :small: 120 validation images of 64 px, 8 px patches
        assert sum(concept["firing_patches"].values()) == round(concept["frequency"] * n_patches)
        for result in (concept, concept["where_active"], concept["where_active"]["random_direction"],
                       concept["random_latent"], concept["random_direction"]):
            assert 0 <= result["target_change_rate"] <= 1 and 0 <= result["other_change_rate"] <= 1
            if result["other_change_rate"] == 0:
                assert result["other_to_background"] == 0
        assert os.path.getsize(tmp_path / "report" / f"exemplars_{concept['name']}.png") > 100
        dictionaries = concept["dictionaries"]
        assert set(dictionaries) == {"sae", "kmeans", "pca"}
        assert all(0 <= d["f1"] <= 1 and 0 <= d["ap"] <= 1 and 0 <= d["purity"] <= 1 for d in dictionaries.values())
        # The threshold search can only match or beat the SAE's threshold-0 latent F1.
        assert dictionaries["sae"]["f1"] >= concept["f1"] - 1e-6
    for name, row in summary["dictionaries"].items():  # the follow-up's row, from the per-concept scores
        scores = [c["dictionaries"][name] for c in summary["concepts"]]
        ce = sum(s["probe_ce"] for s in scores) / sum(s["baseline_ce"] for s in scores)
        assert abs(row["probe_r"] - (1 - ce)) < 1e-9
        assert row["coverage"] == sum(s["ap"] >= 0.3 for s in scores) / 15
    assert [c["name"] for c in summary["conjunctions"]] == [f"{colour} {shape}" for shape in names[:4]
                                                             for colour in names[4:8]]
    assert all(0 <= c["latent"] < summary["sae"]["d_sae"] and 0 <= c["f1"] <= 1 for c in summary["conjunctions"])
    page = open(tmp_path / "report" / "index.html").read()
    assert page.count("data:image/png;base64,") == 15 and page.count("<svg") == 3
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    table = page[page.index("id='dictionaries'"):]
    assert table[:table.index("</table>")].count("<tr>") == 16  # the header and 15 concepts
    assert page.count("<tr>", page.index("id='dictionary-summary'"), page.index("id='dictionaries'")) == 4


def test_small_demo_on_a_pretrained_dinov2_runs_it_at_the_worlds_grid(tmp_path):
    """`demo.backbone` swaps the world's ViT for a (here tiny random) DINOv2 directory: the world is
    drawn at 8 patches of 14 px a side (112 px), the position embeddings are interpolated to that
    grid, the SAE sits two thirds of the way up, and the edits run on `demo.edit_images` images.
    `demo.architecture`, `demo.k` and `demo.expansion` choose the SAE."""
    from saejax import backbones

    model = backbones.create_random("dinov2", str(tmp_path / "dinov2"), seed=0, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, mlp_ratio=2, image_size=70, patch_size=14)
    out = subprocess.run([sys.executable, "-m", "experiments.demo", f"--workdir={tmp_path / 'run'}", SMALL,
                          f"--config.demo.backbone={model}", "--config.demo.edit_images=40",
                          "--config.demo.validation_images=80", "--config.demo.probe_images=160",
                          "--config.demo.architecture=matryoshka", "--config.demo.k=2", "--config.demo.expansion=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.load(open(tmp_path / "run" / "report" / "summary.json"))
    assert summary["vit"] is None and not os.path.exists(tmp_path / "run" / "vit")
    assert summary["backbone"] == {"name": model, "path": model, "family": "dinov2", "image_size": 112,
                                   "grid": [8, 8], "n_layers": 3, "targets": None}
    assert summary["sae"]["layer"] == 1 and summary["edit_images"] == 40
    sae = summary["sae"]  # demo.architecture=matryoshka: BatchTopK with nested prefixes of the 2 x 32 latents
    assert (sae["architecture"], sae["k"], sae["d_sae"], sae["matryoshka_prefixes"]) == ("batchtopk", 2, 64,
                                                                                       [8, 16, 32, 64])
    assert len(summary["concepts"]) == 15
    # The report's exemplars are 112 px world images (the backbone's own size, 8 x 8 patches).
    page = open(tmp_path / "run" / "report" / "index.html").read()
    assert "at 112 px (8 x 8 patches)" in page and page.count("data:image/png;base64,") == 15
    assert "batchtopk SAE with Matryoshka prefixes 8, 16, 32, 64, 64 latents, k=2, block 1" in page
