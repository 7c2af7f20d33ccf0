"""The pages of `experiments.discover` and `experiments.compare`: what `saejax.discovery` and
`saejax.compare` found, written beside a feature browser of each SAE (`saejax.browser`), so
every latent named links to its browser page (its top images with patch heatmaps).

>>> write_discovery_page(directory, result, browser="browser", title="colour head")
>>> write_compare_page(directory, result, source, browsers=("a", "b"))
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from saejax import data
from saejax.checkpoint.staging import write_atomically
from saejax.pages import viz

__all__ = ["write_compare_page", "write_discovery_page"]


def _link(latent: int, browser: str | None, pages: set[int] | None = None) -> str:
    """The latent's id, linked to `browser/latents/<id>.html` when that page exists."""
    if browser is None or (pages is not None and latent not in pages):
        return str(latent)
    return f"<a href='{html.escape(browser)}/latents/{latent}.html'>{latent}</a>"


def _pages(directory: str, browser: str | None) -> set[int] | None:
    folder = None if browser is None else os.path.join(directory, browser, "latents")
    if folder is None or not os.path.isdir(folder):
        return None
    return {int(name[:-5]) for name in os.listdir(folder) if name.endswith(".html") and name[:-5].isdigit()}


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_discovery_page(directory: str | os.PathLike, result: Mapping[str, Any], *, browser: str | None = "browser",
                         title: str = "Latents that control the prediction") -> str:
    """`directory/index.html` for a `discovery.discover` result; `browser`: the folder (inside
    `directory`) of the SAE's feature browser, or None. Returns the page's path."""
    directory = os.fspath(directory)
    pages = _pages(directory, browser)
    s = result["settings"]
    body = [f"<p>Attribution on <b>{result['images']}</b> images (objective <code>{result['objective']}</code>, "
            f"targets: the {html.escape(result['targets'])}); candidates tested by intervention on "
            f"<b>{result['verify_images']}</b> other images. {result['dense_excluded']} latents firing on at least "
            f"{s['max_frequency']:g} of patches are dense and excluded.</p>",
            f"<p>Suppress: the latent set to {s['suppress_scale']:g} x its max where it fires, on the images of its "
            f"class; amplify: set to {s['amplify_scale']:g} x its max on every patch, on the other images. Effect: "
            f"the class's margin (its logit minus the best other) lost, or gained, per image; baselines: "
            f"{s['draws']} random latents of similar firing frequency and {s['draws']} random directions moving "
            f"the same tokens as far. p: a paired sign-flip permutation test against the stronger baseline "
            f"({s['permutations']} permutations), Holm-adjusted over every edit; <b>verified</b>: both edits "
            f"significant at {s['alpha']:g}.</p>"]
    for cls in result["classes"]:
        body.append(f"<h2 id='class-{cls['index']}'>{html.escape(cls['name'])}</h2><p>{cls['images']} images ranked; "
                    f"verified: <b class='verified'>{', '.join(_link(i, browser, pages) for i in cls['verified']) or 'none'}"
                    f"</b></p>")
        if not cls["candidates"]:
            body.append("<p>No latent has a positive attribution to this class.</p>")
            continue
        body.append("<table class='candidates'><tr><th>latent</th><th>attribution</th><th>frequency</th>"
                    "<th>suppress effect</th><th>random latent / direction</th><th>p (Holm)</th>"
                    "<th>target / other change</th><th>amplify effect</th><th>random latent / direction</th>"
                    "<th>p (Holm)</th><th>flip rate</th><th class='l'>verified</th></tr>")
        for c in cls["candidates"]:
            sup, amp = c["suppress"], c["amplify"]
            body.append(
                f"<tr><td>{_link(c['latent'], browser, pages)}</td><td>{c['score']:.4f}</td>"
                f"<td>{c['frequency']:.4f}</td><td>{_number(sup['effect'], 2)}</td>"
                f"<td>{_number(sup['random_latent']['effect'], 2)} / {_number(sup['random_direction']['effect'], 2)}</td>"
                f"<td>{sup['p_adjusted']:.2g}</td><td>{_number(sup['target_change_rate'])} / "
                f"{_number(sup['other_change_rate'])}</td><td>{_number(amp['effect'], 2)}</td>"
                f"<td>{_number(amp['random_latent']['effect'], 2)} / {_number(amp['random_direction']['effect'], 2)}</td>"
                f"<td>{amp['p_adjusted']:.2g}</td><td>{_number(amp['flip_rate'])}</td>"
                f"<td class='l {'good' if c['verified'] else 'bad'}'>{'yes' if c['verified'] else 'no'}</td></tr>")
        body.append("</table><div class='row'>")
        for c in cls["candidates"]:
            if c["curve"] is not None:
                curve = c["curve"]
                chart = viz.line_chart_svg(
                    {f"images of {cls['name']}": list(zip(curve["scales"], curve["class_margin"])),
                     "other images": list(zip(curve["scales"], curve["other_margin"]))},
                    title=f"latent {c['latent']}: mean margin of {cls['name']}", width=360, height=200)
                shares = ", ".join(f"{x:g}: {a:.2f} / {b:.2f}" for x, a, b in zip(
                    curve["scales"], curve["class_share"], curve["other_share"]))
                body.append(f"<div class='card curve' style='max-width:380px'>{chart}<br>x: latent {_link(c['latent'], browser, pages)} set "
                            f"to x times its max on every patch.<br>Share predicted {html.escape(cls['name'])} "
                            f"(its images / others): {shares}</div>")
        body.append("</div>")
    return write_atomically(os.path.join(directory, "index.html"), viz.html_page(title, "".join(body)))


def _exemplar_strip(source: data.Source, ids, size: int = 48) -> str:
    tiles = []
    for i in ids:
        image = source[int(i)].image
        scale = max(1, size // max(image.shape[:2]))
        tiles.append(np.repeat(np.repeat(image, scale, 0), scale, 1))
    if not tiles:
        return ""
    side = max(max(t.shape[0], t.shape[1]) for t in tiles)
    padded = [np.pad(t, ((0, side - t.shape[0]), (0, side - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    return f"<img alt='top images' src='{viz.data_uri(viz.png_bytes(viz.tile(padded, columns=len(padded))))}'>"


def write_compare_page(directory: str | os.PathLike, result: Mapping[str, Any], source: data.Source, *,
                       browsers: tuple[str | None, str | None] = ("a", "b"), listed: int = 40,
                       title: str | None = None) -> str:
    """`directory/index.html` for a `compare.compare` result over `source` (whose images the
    exemplars are); `browsers`: each side's browser folder inside `directory` (or None);
    `listed`: the unmatched latents shown per side (most active first). Returns the path."""
    directory = os.fspath(directory)
    names = result["names"]
    title = title or f"Latents shared by {names[0]} and {names[1]}"
    body = [f"<p>{result['images']} images, correlations of every latent pair over {result['samples']} "
            f"{'patches' if result['level'] == 'patch' else 'images (each latent’s max per image)'}. A latent is "
            f"<b>shared</b> when its best match in the other SAE correlates at least {result['threshold']:g}.</p>",
            "<table id='summary'><tr><th class='l'>model</th><th>latents</th><th>live</th><th>shared share</th>"
            "<th>unmatched</th></tr>"]
    for side, name in zip(("a", "b"), names):
        r = result[side]
        body.append(f"<tr><td class='l'>{html.escape(name)}</td><td>{r['d_sae']}</td><td>{r['live']}</td>"
                    f"<td>{r['shared_share']:.3f}</td><td>{len(r['unmatched'])}</td></tr>")
    body.append("</table><div class='row'>")
    for side, name in zip(("a", "b"), names):
        scores = np.asarray([m["score"] for m in result[side]["matches"]])
        counts, edges = np.histogram(scores, bins=20, range=(-0.2, 1.0))
        body.append(viz.bars_svg((edges[:-1] + edges[1:]) / 2, counts,
                                 f"{name}: best-match correlation", "latents"))
    body.append("</div>")
    for side, other, name, other_name, browser, other_browser in (
            ("a", "b", names[0], names[1], browsers[0], browsers[1]),
            ("b", "a", names[1], names[0], browsers[1], browsers[0])):
        pages, other_pages = _pages(directory, browser), _pages(directory, other_browser)
        r = result[side]
        top = sorted(r["matches"], key=lambda m: -m["score"])[:10]
        body.append(f"<h2>{html.escape(name)}: best-matched latents</h2><table class='matched'><tr><th>latent</th>"
                    f"<th>best in {html.escape(other_name)}</th><th>correlation</th></tr>" + "".join(
                        f"<tr><td>{_link(m['latent'], browser, pages)}</td><td>"
                        f"{_link(m['best'], other_browser, other_pages)}</td><td>{m['score']:.3f}</td></tr>"
                        for m in top) + "</table>")
        body.append(f"<h2>{html.escape(name)}: unmatched latents</h2><p>{len(r['unmatched'])} live latents with no "
                    f"match in {html.escape(other_name)}; the {min(listed, len(r['unmatched']))} most active, with "
                    f"their top images.</p><table class='unmatched' id='unmatched-{side}'><tr><th>latent</th>"
                    f"<th>best in {html.escape(other_name)}</th><th>correlation</th><th class='l'>top images</th></tr>")
        for u in r["unmatched"][:listed]:
            body.append(f"<tr><td>{_link(u['latent'], browser, pages)}</td><td>"
                        f"{_link(u['best'], other_browser, other_pages)}</td><td>{u['score']:.3f}</td>"
                        f"<td class='l'>{_exemplar_strip(source, u['exemplars'])}</td></tr>")
        body.append("</table>")
    return write_atomically(os.path.join(directory, "index.html"), viz.html_page(title, "".join(body)))
