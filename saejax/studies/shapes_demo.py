"""The demo's science on the shapes world: for an SAE at a block (`Site`), the concept table,
the bounds that explain a low F1, the baseline dictionaries, and the edits against matched
baselines; and the page that shows them. `experiments.demo` trains the ViT and the SAE, then
calls `analyse` and `write_page`; a notebook can call them on its own site.

What `analyse` measures, on validation images of the world drawn at `world_size`:

1. On validation images, for the 15 concepts of `shapes.FACTOR_CONCEPTS` (4 shapes, 4 colours,
   background, small / large object, 4 background textures): per latent, the top exemplars
   and patch-level F1 against each concept's patches; the best latent per concept. Two bounds
   explain a low F1: the best union of up to 4 latents (`features.greedy_latent_union`; a
   concept split over several latents scores higher here) and a supervised linear probe per
   concept on the same normalised residual (if the model does not encode a concept per patch,
   no latent can). The SAE's latents are also scored against k-means and PCA dictionaries on
   the same residuals (`saejax.concept_metrics`: the saev follow-up's Probe R, mAP, Purity@16,
   Coverage@0.3).
2. Linear probes on the final patch tokens, one per factor (`shapes.FACTORS`). For each
   concept, its latent is set to -2 x its max on all tokens at the SAE's block, the model
   finishes its forward pass, and we count the patches whose probe prediction changes: target
   change rate (patches of that concept) and other change rate (all other patches).
   Baselines, each the mean of 3 draws: a random live latent (same protocol) and a random unit
   direction added with the same mean norm as the concept edit. Also measured: the same edit
   only where the latent fires (`interventions.set_to(..., where_active=True)`), with its own
   matched random direction.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis import concept_metrics, features, interventions, probes, segmentation
from saejax.analysis.site import Site
from saejax.core import metrics as sae_metrics
from saejax.datasets import shapes
from saejax.pages import viz
from saejax.run.logs import read_metrics

BASELINE_DRAWS = 3
UNION_SIZE = 4  # enough for a shape stored as one latent per colour
CONCEPTS = shapes.FACTOR_CONCEPTS


def _batches(images, batch_size):
    for start in range(0, len(images), batch_size):
        yield start, images[start:start + batch_size]


def mean_rates(results: list[dict]) -> dict[str, float]:
    """The mean of each rate over several baseline draws."""
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def firing_breakdown(fired, present, coverage, on_object) -> dict[str, int]:
    """Where a latent fires: patches where the concept is present (covers >= half), partly
    covered ones, and ones without it (split by what covers most of the patch: an object, or
    background)."""
    fired, present, coverage, on_object = (np.asarray(a) for a in (fired, present, coverage, on_object))
    absent = fired & (coverage == 0)
    return {"covered": int(np.sum(fired & present)), "partly_covered": int(np.sum(fired & ~present & (coverage > 0))),
            "other_objects": int(np.sum(absent & on_object)), "background": int(np.sum(absent & ~on_object))}


def analyse(site: Site, *, world_size: int, n_val: int = 1_000, edit_images: int = 1_000, probe_images: int = 2_000,
            probe_epochs: int = 30, batch_size: int = 128) -> tuple[dict, dict]:
    """The concept table and the edits for `site` (see the module docstring).

    Args:
        site: the SAE at its block of a backbone that reads the world's images (raw uint8;
            the site's processing resizes them).
        world_size: the side of the world's images in px.
        n_val: validation images for the features; edit_images: of those, the ones edited.
        probe_images, probe_epochs: the images and epochs of the linear probes on final patch
            tokens (and of the supervised ceiling on the residual).

    Returns:
        `(results, pictures)`: results go into `summary.json` ("probes", "edit_images",
        "concepts", "dictionaries", "conjunctions"); pictures (`images`, `exemplars`) are
        what `write_page` draws.
    """
    # Features on validation images.
    bb, ae, sae_params, norm = site.bb, site.ae, site.sae_params, site.norm
    val = shapes.source("validation", n_val, seed=1, image_size=world_size).world
    images, p, n_concepts = val.images, bb.patch_size, len(CONCEPTS)
    concepts_N = shapes.factor_patch_concepts(val, p).reshape(n_val, -1, n_concepts)
    coverage = shapes.factor_patch_fractions(val, p).reshape(-1, n_concepts)
    labels = {f: v.reshape(-1) for f, v in shapes.factor_patch_labels(val, p).items()}
    # Colour-shape conjunctions ("red circle"), present like concepts: covering at least half the patch.
    class_fractions = shapes.patch_fractions(val.pixel_labels, p).reshape(-1, len(shapes.PIXEL_CLASSES))
    conjunctions_N = (class_fractions[:, 1:] >= 0.5).reshape(n_val, -1, len(shapes.CLASSES))
    exemplars = features.TopExemplars.empty(ae.d_sae, k=8, n_patches=bb.layout.n_patches)
    f1_counts = features.ConceptF1.zeros(ae.d_sae, n_concepts)
    count = jax.jit(features.ConceptF1.update)
    conjunction_counts = features.ConceptF1.zeros(ae.d_sae, len(shapes.CLASSES))
    firing = sae_metrics.FiringStats.zeros(ae.d_sae)
    n_edit = min(n_val, edit_images)
    tokens_before, codes, resids, layer_resids = [], [], [], []
    for s, x in _batches(images, batch_size):
        out = site.encode(x)
        z, tokens, resid, at_layer = out["codes"], out["tokens"], out["normalized"], out["at_layer"]
        b = z.shape[0]
        exemplars = exemplars.update(z, jnp.arange(s, s + b))
        flat = z.reshape(-1, ae.d_sae)
        f1_counts = count(f1_counts, flat, jnp.asarray(concepts_N[s:s + b].reshape(-1, n_concepts)))
        conjunction_counts = count(conjunction_counts, flat, jnp.asarray(conjunctions_N[s:s + b].reshape(
            -1, len(shapes.CLASSES))))
        firing = firing.update(flat)
        tokens_before.append(tokens)
        codes.append(z)
        resids.append(resid)
        if s < n_edit:
            layer_resids.append(at_layer[:n_edit - s])
    tokens_before, codes, resids, layer_resids = map(jnp.concatenate, (tokens_before, codes, resids, layer_resids))
    best_latent, best_f1, _ = jax.device_get(f1_counts.best())
    conjunction_latent, conjunction_f1, _ = jax.device_get(conjunction_counts.best())
    max_act = np.asarray(exemplars.max_activation())
    frequency = np.asarray(firing.frequency())

    # Probes on final patch tokens (trained on other images), then interventions.
    probe_world = shapes.source("test", probe_images, seed=1, image_size=world_size).world
    probe_labels = {f: v.reshape(-1) for f, v in shapes.factor_patch_labels(probe_world, p).items()}
    probe_feats, probe_resids, probe_codes = [], [], []
    for _, x in _batches(probe_world.images, batch_size):
        out = site.encode(x)
        z, tokens, resid = out["codes"], out["tokens"], out["normalized"]
        probe_feats.append(tokens)
        probe_resids.append(resid)
        probe_codes.append(z.reshape(-1, ae.d_sae))
    probe_feats, probe_resids = (jnp.concatenate(a).reshape(-1, bb.d_model) for a in (probe_feats, probe_resids))
    probe_codes = jnp.concatenate(probe_codes)
    epochs = probe_epochs
    probe = {family: probes.train_linear_probe(jax.random.key(i), probe_feats, jnp.asarray(probe_labels[family]),
                                               len(classes), epochs=epochs, batch_size=2048, learning_rate=1e-2)
             for i, (family, classes) in enumerate(shapes.FACTORS.items())}
    # What the residual the SAE reads knows per patch: a supervised probe's F1 bounds any latent's.
    probe_concepts = shapes.factor_patch_concepts(probe_world, p).reshape(-1, n_concepts)
    val_concepts = concepts_N.reshape(-1, n_concepts)
    ceiling_f1 = concept_metrics.probe_ceiling_f1(probe_resids, probe_concepts, resids.reshape(-1, bb.d_model),
                                                  val_concepts, epochs=epochs)
    dictionaries = concept_metrics.baseline_dictionaries(
        ae.d_sae, probe_resids, resids.reshape(-1, bb.d_model), probe_codes, codes.reshape(-1, ae.d_sae),
        key=jax.random.key(5))
    dictionary_scores = {name: concept_metrics.concept_scores(train_codes, val_codes, probe_concepts, val_concepts)
                         for name, (train_codes, val_codes) in dictionaries.items()}
    flat_before = tokens_before.reshape(-1, bb.d_model)
    pred_before = {family: np.asarray(probes.predict(probe[family], flat_before)) for family in probe}
    probe_accuracy = {family: float(np.mean(pred_before[family] == labels[family])) for family in probe}
    n_edit_patches = n_edit * bb.layout.n_patches

    def change_rates(edit, family, target_class):
        tokens = jnp.concatenate([site.finish(edit, layer_resids[i:i + batch_size])["tokens"]
                                  for i in range(0, n_edit, batch_size)])
        after = np.asarray(probes.predict(probe[family], tokens.reshape(-1, bb.d_model)))
        return segmentation.change_rates(pred_before[family][:n_edit_patches], after,
                                         labels[family][:n_edit_patches], target_class, background=0)

    rng = np.random.default_rng(0)
    alive = np.flatnonzero(frequency > 0)
    union = jax.jit(features.greedy_latent_union, static_argnums=2)
    flat_codes = codes.reshape(-1, ae.d_sae)
    edit_codes = np.asarray(codes[:n_edit]).reshape(-1, ae.d_sae)
    concept_results = []
    for c, name in enumerate(CONCEPTS):
        family, cls = shapes.concept_factor(name)
        latent = int(best_latent[c])
        value = -2.0 * float(max_act[latent])
        union_latents, union_f1 = jax.device_get(union(flat_codes, jnp.asarray(val_concepts[:, c]), UNION_SIZE))
        size = int(np.argmax(union_f1)) + 1
        fired_where = firing_breakdown(flat_codes[:, latent] > 0, val_concepts[:, c], coverage[:, c],
                                       labels["colour"] > 0)
        edit = interventions.sae_edit(ae, sae_params, interventions.set_to(latent, value), norm=norm)
        active_edit = interventions.sae_edit(ae, sae_params, interventions.set_to(latent, value, where_active=True),
                                             norm=norm)
        result = {"name": name, "factor": family, "latent": latent, "f1": float(best_f1[c]),
                  "max_activation": float(max_act[latent]), "frequency": float(frequency[latent]),
                  "probe_f1": float(ceiling_f1[c]),
                  "union": {"latents": union_latents[:size].tolist(), "f1": float(union_f1[size - 1])},
                  "dictionaries": {d: scores[c] for d, scores in dictionary_scores.items()},
                  "firing_patches": fired_where,
                  **change_rates(edit, family, cls), "where_active": change_rates(active_edit, family, cls)}
        # Baselines, averaged over BASELINE_DRAWS draws (one random latent may be a near-duplicate of the concept's).
        others = rng.choice(alive[alive != latent], BASELINE_DRAWS, replace=False)
        result["random_latent"] = {"latents": others.tolist(), **mean_rates([change_rates(interventions.sae_edit(
            ae, sae_params, interventions.set_to(o, -2.0 * float(max_act[o])), norm=norm), family, cls) for o in others])}
        # The concept edit moves a token by |v - f| * ||w_dec|| * scalar; match its mean norm.
        f_latent = edit_codes[:, latent]
        decoder_norm = np.linalg.norm(np.asarray(sae_params.w_dec[latent])) * float(norm.scalar)
        mean_norm = float(np.mean(np.abs(value - f_latent)) * decoder_norm)
        directions = rng.standard_normal((BASELINE_DRAWS, bb.d_model))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        result["random_direction"] = mean_rates([change_rates(interventions.direction_edit(d, mean_norm), family, cls)
                                                 for d in directions])
        # Matched to the where-active edit: the same tokens, the mean norm of its change there.
        fires = f_latent > 0
        active_norm = float(np.mean(np.abs(value - f_latent[fires])) * decoder_norm) if fires.any() else 0.0
        result["where_active"]["random_direction"] = mean_rates([change_rates(interventions.DirectionWhereFiring(
            active_edit, jnp.asarray(latent), jnp.asarray(d, jnp.float32), jnp.asarray(active_norm, jnp.float32)),
            family, cls) for d in directions])
        concept_results.append(result)
        rates = "  ".join(f"{key} {r['target_change_rate']:.2f}/{r['other_change_rate']:.3f}" for key, r in (
            ("edit", result), ("random latent", result["random_latent"]), ("random direction", result["random_direction"]),
            ("where active", result["where_active"]), ("its random direction", result["where_active"]["random_direction"])))
        print(f"{name:>10}: latent {latent:4d} F1 {result['f1']:.2f} (union {result['union']['f1']:.2f}, probe "
              f"{result['probe_f1']:.2f})  {rates}", flush=True)

    print("best latent per conjunction (F1): " + ", ".join(
        f"{name} {f:.2f}" for name, f in zip(shapes.CLASSES, conjunction_f1)), flush=True)
    dictionaries = {d: concept_metrics.summarize_scores(scores) for d, scores in dictionary_scores.items()}
    for d, row in dictionaries.items():
        print(f"{d:>7}: " + "  ".join(f"{key} {value:.3f}" for key, value in row.items()), flush=True)
    study = {
        "probes": {f"{family}_accuracy": accuracy for family, accuracy in probe_accuracy.items()},
        "edit_images": n_edit,
        "concepts": concept_results,
        "dictionaries": dictionaries,
        "conjunctions": [{"name": name, "latent": int(j), "f1": float(f)}
                         for name, j, f in zip(shapes.CLASSES, conjunction_latent, conjunction_f1)],
    }
    return study, {"images": images, "exemplars": exemplars}


def write_page(report_dir: str, summary: Mapping[str, Any], run_dir: str, images: np.ndarray,
               exemplars: features.TopExemplars, grid: tuple[int, int]) -> str:
    """`report_dir/index.html` (self-contained) and the exemplar pictures, for a demo `summary`
    (`analyse`'s results with the backbone, ViT and SAE described), the SAE run's metrics in
    `run_dir`, the validation `images` and the `exemplars`. Returns the page's path."""
    rows = [r for r in read_metrics(run_dir) if r["member"] == 0]
    curves = "".join(viz.line_chart_svg({key: [(r["step"], r[key]) for r in rows]}, title=key, log_y=key == "loss")
                     for key in ("loss", "l0", "nmse"))
    sae, bb = summary["sae"], summary["backbone"]
    model = (f"the world's ViT ({bb['targets']} targets), validation accuracy <b>{summary['vit']['val_accuracy']:.4f}</b>"
             if summary["vit"] else f"<b>{html.escape(bb['name'])}</b> ({bb['family']})")
    prefixes = sae.get("matryoshka_prefixes")
    matryoshka = f" with Matryoshka prefixes {', '.join(map(str, prefixes))}" if prefixes else ""
    probe_text = ", ".join(f"{key.removesuffix('_accuracy')} {value:.3f}" for key, value in summary["probes"].items())
    body = [f"<p>Finished in {summary['seconds']:.0f} s. Backbone: {model}, at {bb['image_size']} px "
            f"({bb['grid'][0]} x {bb['grid'][1]} patches). Probes on final patch tokens (accuracy): {probe_text}. "
            f"Edits run on {summary['edit_images']} validation images.</p>",
            "<h2>SAE training</h2><div class='row'>", curves, "</div>",
            f"<p>{sae['architecture']} SAE{matryoshka}, {sae['d_sae']} latents, k={sae['k']}, block {sae['layer']}: "
            f"L0 {sae['l0']:.2f}, "
            f"NMSE {sae['nmse']:.4f}, explained variance {sae['explained_variance']:.4f}, dead fraction "
            f"{sae['dead_fraction']:.3f}, dense fraction {sae['dense_fraction']:.3f}.</p>",
            "<h2>Concepts</h2><p>Best latent per concept by patch-level F1; factor: the probe that reads the "
            "edit out; union: the best detector made of up "
            "to 4 latents (greedy); probe: a supervised linear probe on the same residual (what the model encodes "
            "per patch, a bound on any latent). Intervention: the latent set to -2 x its max on all tokens (or only "
            "where it fires); rates are fractions of patches whose probe prediction changes, target / other.</p>",
            "<table><tr><th class='l'>concept</th><th>factor</th><th>latent</th><th>F1</th><th>union F1 (latents)</th>"
            "<th>probe F1</th><th>fires on: concept / partly / other objects / background</th>"
            "<th>target change</th><th>other change</th><th>where active (its random direction)</th>"
            "<th>random latent</th><th>random direction</th></tr>"]
    for c in summary["concepts"]:
        # The aim: F1 >= 0.8 and an edit (on all tokens, or where the latent fires) with target >= 0.8, other <= 0.05.
        matched = c["where_active"]["random_direction"]
        good = c["f1"] >= 0.8 and any(r["target_change_rate"] >= 0.8 and r["other_change_rate"] <= 0.05
                                      for r in (c, c["where_active"]))
        body.append(f"<tr><td class='l {'good' if good else 'bad'}'>{html.escape(c['name'])}</td><td>{c['factor']}</td>"
                    f"<td>{c['latent']}</td>"
                    f"<td>{c['f1']:.3f}</td><td>{c['union']['f1']:.3f} ({', '.join(map(str, c['union']['latents']))})</td>"
                    f"<td>{c['probe_f1']:.3f}</td><td>{' / '.join(str(n) for n in c['firing_patches'].values())}</td>"
                    f"<td>{c['target_change_rate']:.3f}</td><td>{c['other_change_rate']:.3f}</td>"
                    + "".join(f"<td>{r['target_change_rate']:.3f} / {r['other_change_rate']:.3f}{extra}</td>"
                              for r, extra in ((c["where_active"], f" ({matched['target_change_rate']:.2f} / "
                                                f"{matched['other_change_rate']:.3f})"),
                                               (c["random_latent"], ""), (c["random_direction"], ""))) + "</tr>")
    body.append("</table><p>Best latent per colour-shape conjunction (F1): " + ", ".join(
        f"{html.escape(c['name'])} {c['latent']} ({c['f1']:.2f})" for c in summary["conjunctions"]) + ".</p>")
    body.append("<h2>Against trivial dictionaries</h2><p>Each dictionary's best single feature per concept, on the "
                "same normalised residuals: patch-level F1 (best feature and threshold) and the saev follow-up's 1-D "
                "probe (the feature with the lowest logistic loss on other images), scored on these images: Probe R "
                "(1 - its cross-entropy / the prevalence-only baseline's, over all concepts), average precision, "
                "Purity@16 (the share of its 16 top-scoring patches that hold the concept) and Coverage@0.3 (the "
                "share of concepts with AP >= 0.3). k-means has as many centroids as the SAE has latents (a "
                "centroid fires on its nearest patches); PCA gives its top components' positive and negative "
                "halves. The supervised probe is the ceiling.</p><table id='dictionary-summary'><tr>"
                "<th class='l'>dictionary</th><th>Probe R</th><th>mAP</th><th>Purity@16</th><th>Coverage@0.3</th>"
                "<th>mean best F1</th></tr>")
    for name, label in (("sae", "SAE"), ("kmeans", "k-means"), ("pca", "PCA")):
        row = summary["dictionaries"][name]
        body.append(f"<tr><td class='l'>{label}</td>" + "".join(
            f"<td>{row[k]:.3f}</td>" for k in ("probe_r", "map", "purity", "coverage", "mean_f1")) + "</tr>")
    body.append("</table><table id='dictionaries'><tr><th class='l'>concept</th>"
                + "".join(f"<th>{name} F1 / AP</th>" for name in ("SAE", "k-means", "PCA")) + "<th>probe F1</th></tr>")
    for c in summary["concepts"]:
        d = c["dictionaries"]
        body.append(f"<tr><td class='l'>{html.escape(c['name'])}</td>" + "".join(
            f"<td>{d[k]['f1']:.3f} / {d[k]['ap']:.3f}</td>" for k in ("sae", "kmeans", "pca"))
            + f"<td>{c['probe_f1']:.3f}</td></tr>")
    body.append("</table>")
    body.append("<h2>Top exemplars</h2><p>Each concept's latent on its 8 most activating validation images; "
                "patches where it fires are tinted by activation / max.</p>")
    values, ids, maps = jax.device_get((exemplars.values, exemplars.image_ids, exemplars.maps))
    for c in summary["concepts"]:
        latent, vmax = c["latent"], max(c["max_activation"], 1e-12)
        tiles = [viz.highlight_patches(images[i], maps[latent, j].reshape(grid), vmax)
                 for j, i in enumerate(ids[latent]) if i >= 0]
        png = viz.png_bytes(viz.tile(tiles, columns=8))
        with open(os.path.join(report_dir, f"exemplars_{c['name']}.png"), "wb") as f:
            f.write(png)
        body.append(f"<div class='card'><b>{html.escape(c['name'])}</b> latent {latent} (F1 {c['f1']:.2f}, "
                    f"max {c['max_activation']:.2f}, frequency {c['frequency']:.4f})<br>"
                    f"<img src='{viz.data_uri(png)}' alt='exemplars of latent {latent}'></div>")
    with open(os.path.join(report_dir, "index.html"), "w") as f:
        f.write(viz.html_page(f"saejax demo: the shapes world on {summary['backbone']['name']}", "".join(body)))
    return os.path.join(report_dir, "index.html")
