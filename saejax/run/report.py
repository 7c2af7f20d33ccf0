"""One page per training sweep: which member to keep.

`write_sweep_report(workdir)` reads a `train_sae` workdir's `eval.json` and `metrics.jsonl`
and writes `report.html`, a self-contained page (inline SVG, no scripts or network) with, per
layer:

* L0 against NMSE and L0 against fidelity (`saejax.fidelity`; the classifier KL fidelity when
  the backbone has a head, else the pooled-embedding one), each member a labelled point, the
  Pareto front (`pareto_front`) filled in red and joined;
* loss and NMSE curves per member over the training steps;
* the log10 firing-frequency histogram of each member, with its dead latents counted;
* a table of every scalar metric, Pareto members starred.

The same function works on any directory holding those two files, so a notebook can call it
on a run it trained with `saejax.loop.fit` and `loop.evaluate`.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence

import numpy as np

from saejax.checkpoint.staging import write_atomically
from saejax.pages import viz
from saejax.run.logs import read_metrics

# (key in eval.json, column header, format); rows missing a key show "-".
COLUMNS = (
    ("learning_rate", "lr", "{:.2g}"), ("sparsity_coeff", "lambda", "{:.2g}"), ("k", "k", "{}"),
    ("l0", "L0", "{:.1f}"), ("nmse", "NMSE", "{:.4f}"), ("explained_variance", "expl. var.", "{:.4f}"),
    ("cosine", "cos(x, x&#770;)", "{:.4f}"), ("l2_ratio", "l2 ratio", "{:.3f}"),
    ("relative_reconstruction_bias", "rel. bias &gamma;", "{:.3f}"), ("dead_fraction", "dead", "{:.3f}"),
    ("dense_fraction", "dense", "{:.3f}"), ("mean_encoder_decoder_cosine", "enc-dec cos", "{:.3f}"),
    ("near_duplicate_fraction", "near dup.", "{:.3f}"), ("fidelity", "fidelity (KL)", "{:.4f}"),
    ("fidelity_ce", "fidelity (CE)", "{:.4f}"), ("kl_spliced", "KL spliced", "{:.4g}"),
    ("accuracy_clean", "acc. clean", "{:.3f}"), ("accuracy_spliced", "acc. spliced", "{:.3f}"),
    ("accuracy_mean_ablated", "acc. ablated", "{:.3f}"), ("fidelity_pooled", "fidelity (pooled)", "{:.4f}"),
    ("pooled_cosine", "pooled cos", "{:.4f}"),
)


def pareto_front(cost: Sequence[float], value: Sequence[float], *, maximize: bool = False) -> np.ndarray:
    """[N] bool: the points no other point beats, with lower `cost` better and lower `value`
    better (or higher, with `maximize`). Ties are not dominated; NaN points never are on it."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    value = -value if maximize else value
    ok = np.isfinite(cost) & np.isfinite(value)
    front = np.zeros(len(cost), bool)
    for i in np.flatnonzero(ok):
        others = ok & (np.arange(len(cost)) != i)
        dominated = others & (cost <= cost[i]) & (value <= value[i]) & ((cost < cost[i]) | (value < value[i]))
        front[i] = not dominated.any()
    return front


def _fidelity_key(members: Sequence[dict]) -> str | None:
    for key in ("fidelity", "fidelity_pooled"):
        if any(key in m for m in members):
            return key
    return None


def write_sweep_report(workdir: str | os.PathLike, *, title: str | None = None) -> str:
    """Writes `<workdir>/report.html` from `eval.json` (and `metrics.jsonl` if present).

    Returns:
        The page's path.

    Raises:
        FileNotFoundError: no `eval.json` in `workdir`.
    """
    workdir = os.fspath(workdir)
    eval_path = os.path.join(workdir, "eval.json")
    if not os.path.isfile(eval_path):
        raise FileNotFoundError(f"no eval.json in {workdir!r}: the report is made from a finished run's evaluation")
    with open(eval_path) as f:
        evaluation = json.load(f)
    curves = read_metrics(workdir)
    members = evaluation["members"]
    layers = sorted({m["layer"] for m in members})
    body = [f"<p>{len(members)} SAEs ({len(layers)} layer{'s' if len(layers) > 1 else ''}), "
            f"{evaluation.get('steps', '?')} training steps. Each point is a sweep member; red, joined points are "
            "the Pareto front (no other member has both a lower L0 and a better score).</p>"]
    for layer in layers:
        body.append(_layer_section(layer, [m for m in members if m["layer"] == layer],
                                   [c for c in curves if c.get("layer") == layer]))
    return write_atomically(os.path.join(workdir, "report.html"), viz.html_page(
        title or f"SAE sweep: {os.path.basename(os.path.normpath(workdir))}", "".join(body)))


def _layer_section(layer: int, members: list[dict], curves: list[dict]) -> str:
    labels = [f"#{m['member']}" for m in members]
    l0 = [m["l0"] for m in members]
    nmse_front = pareto_front(l0, [m["nmse"] for m in members])
    charts = [viz.scatter_svg(list(zip(l0, [m["nmse"] for m in members], labels)), title="L0 vs NMSE (lower is better)",
                              x_label="L0 (latents per token)", y_label="NMSE", highlight=nmse_front)]
    key = _fidelity_key(members)
    fidelity_front = np.zeros(len(members), bool)
    if key:
        scores = [m.get(key, float("nan")) for m in members]
        fidelity_front = pareto_front(l0, scores, maximize=True)
        charts.append(viz.scatter_svg(list(zip(l0, scores, labels)), title=f"L0 vs {key} (higher is better)",
                                      x_label="L0 (latents per token)", y_label=key, highlight=fidelity_front))
    loss, nmse = {}, {}
    for c in curves:
        name = f"#{c['member']}"
        loss.setdefault(name, []).append((c["step"], c["loss"]))
        nmse.setdefault(name, []).append((c["step"], c["nmse"]))
    if loss:
        charts.append(viz.line_chart_svg(loss, title="training loss", log_y=True))
        charts.append(viz.line_chart_svg(nmse, title="training NMSE (per batch)", log_y=True))
    histograms = []
    for m in members:
        hist = m.get("log10_frequency_histogram")
        if hist:
            edges = np.asarray(hist["edges"])
            histograms.append("<div class='card density'>" + viz.bars_svg(
                (edges[:-1] + edges[1:]) / 2, np.asarray(hist["counts"]),
                f"#{m['member']}: log10 firing frequency ({hist['dead']} dead)", "latents", width=300, height=160)
                + "</div>")
    shown = [c for c in COLUMNS if any(c[0] in m for m in members)]
    head = "<tr><th class='l'>member</th>" + "".join(f"<th>{name}</th>" for _, name, _ in shown) + "</tr>"
    rows = []
    for m, on_nmse, on_fidelity in zip(members, nmse_front, fidelity_front, strict=True):
        star = ("&#9733;" if on_nmse or on_fidelity else "")
        cells = "".join(f"<td>{fmt.format(m[k]) if m.get(k) is not None else '-'}</td>" for k, _, fmt in shown)
        rows.append(f"<tr class='member'><td class='l'>#{m['member']} {star}"
                    f"{' (frozen)' if m.get('frozen') else ''}</td>{cells}</tr>")
    note = ("<p>&#9733;: on a Pareto front. Fidelity: how much of the model's output survives when the SAE's "
            "reconstruction replaces the layer's tokens, between mean ablation (0) and the clean model (1). "
            "Rel. bias &gamma; &lt; 1 and l2 ratio &lt; 1 mean shrinkage; near dup.: latents whose decoder row has "
            "cosine &gt; 0.9 with another's.</p>")
    paths = "".join(f"<code>{html.escape(m.get('path', ''))}</code> " for m in members)
    return (f"<h2>Layer {layer}</h2><div class='row charts'>{''.join(charts)}</div>"
            f"<h3>Firing frequency</h3><div class='row'>{''.join(histograms)}</div>"
            f"<h3>Every metric</h3><table class='metrics'>{head}{''.join(rows)}</table>{note}"
            f"<p class='paths'>{paths}</p>")
