"""A feature browser: a static site to look through every latent of a trained SAE.

`collect` streams images through a `site.Site` in bounded memory: per latent, its
patch firing frequency, mean and max activation, a histogram of its activations (p99 from it),
the labels of the images it fires on, and its top-k images by their max over patches (values
and image ids only: `[F, k]`, never `[F, k + B, P]`). The patch heatmaps are recomputed for the
winners only. `write_site` writes a folder a person opens from disk (no server, no network):

- `index.html`: histogram of log10 firing frequency, log10 frequency vs log10 mean activation,
  counts of dead and dense latents, and a sortable, paginated table of every latent (id,
  frequency, mean, max, p99, and the most common label among its top images);
- `latents/<id>.html`: the top images with a patch heatmap (one colour scale per latent; hover
  shows the plain image), labels, an activation histogram and the nearest latents by decoder
  cosine.

>>> collected = collect(readout, source, k=20)
>>> write_site("/tmp/browser", collected, ae, sae_params, source, title="CLIP block 10")
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saejax import data
from saejax.checkpoint.staging import write_atomically
from saejax.pages import viz
from saejax.analysis.features import DENSE_FREQUENCY

__all__ = ["browse", "collect", "nearest_by_decoder", "write_site"]

# Activation histogram: log10 bins from 1e-3 to 1e3 (values outside go to the end bins).
HIST_EDGES = np.logspace(-3, 3, 49)


def collect(readout, source: data.Source, *, k: int = 20, batch_size: int = 64, limit: int | None = None,
            heatmaps: bool = True) -> dict[str, Any]:
    """Stream `source` through `readout` and keep what the browser shows (bounded memory).
    On several processes each reads its share of the images (`data.process_share`) and the statistics are
    merged (`merge_over_processes`), so every process returns what one process would.

    Returns numpy arrays: `frequency [F]` (share of patches where the latent fires), `mean [F]`
    (mean activation where it fires), `max [F]`, `p99 [F]` (99th percentile of its non-zero
    activations, from the histogram), `hist [F, bins]`, `top_values [F, k]`, `top_ids [F, k]`
    (image ids, -1 for none), `label_counts [F, L]` (images it fires on, per label) when the
    source has labels, `heatmaps [F, k, P]` (float16) for the winners, and `images`/`patches`.
    """
    f, n_bins = readout.ae.d_sae, len(HIST_EDGES) + 1
    n_labels = len(source.classes) if source.has_labels and source.classes else None
    edges = jnp.asarray(HIST_EDGES, jnp.float32)

    @jax.jit
    def reduce(state, codes_NPF, ids_N, labels_N):
        image_max = codes_NPF.max(axis=1)  # [N, F]
        fires = codes_NPF > 0
        bins = jnp.searchsorted(edges, codes_NPF, side="right")  # [N, P, F]
        hist = jax.vmap(lambda b, m: jnp.bincount(b, weights=m, length=n_bins), in_axes=(1, 1))(
            bins.reshape(-1, f), fires.reshape(-1, f).astype(jnp.int32))  # [F, bins]
        values = jnp.concatenate([state["top_values"], image_max.T], axis=1)  # [F, k + N]
        ids = jnp.concatenate([state["top_ids"], jnp.broadcast_to(ids_N, (f, ids_N.shape[0]))], axis=1)
        top_values, pick = jax.lax.top_k(values, k)
        new = {"fires": state["fires"] + fires.sum((0, 1)), "sum": state["sum"] + codes_NPF.sum((0, 1)),
               "max": jnp.maximum(state["max"], image_max.max(0)), "hist": state["hist"] + hist,
               "top_values": top_values, "top_ids": jnp.take_along_axis(ids, pick, axis=1)}
        if n_labels is not None:
            onehot = jax.nn.one_hot(labels_N, n_labels, dtype=jnp.int32)  # [N, L]
            new["label_counts"] = state["label_counts"] + (image_max > 0).astype(jnp.int32).T @ onehot
        return new

    state = {"fires": jnp.zeros(f, jnp.int32), "sum": jnp.zeros(f), "max": jnp.zeros(f),
             "hist": jnp.zeros((f, n_bins), jnp.int32), "top_values": jnp.full((f, k), -jnp.inf),
             "top_ids": jnp.full((f, k), -1, jnp.int32)}
    if n_labels is not None:
        state["label_counts"] = jnp.zeros((f, n_labels), jnp.int32)
    images = 0
    for batch in data.process_share(source, batch_size, limit):
        if not len(batch.ids):
            continue
        codes = readout.encode(batch.images)["codes"]
        labels = jnp.asarray(batch.labels if n_labels is not None else np.zeros(len(batch.ids)), jnp.int32)
        state = reduce(state, codes, jnp.asarray(batch.ids, jnp.int32), labels)
        images += len(batch.ids)
    state, images = merge_over_processes(state, images, k)
    if images == 0:
        raise ValueError("collect: the source gave no images")
    out = {key: np.asarray(v) for key, v in state.items()}
    patches = images * readout.bb.layout.n_patches
    fires = out.pop("fires").astype(np.int64)
    out["frequency"] = fires / patches
    out["mean"] = np.where(fires > 0, out.pop("sum") / np.maximum(fires, 1), 0.0)
    out["top_ids"] = np.where(out["top_values"] > 0, out["top_ids"], -1)  # images where it never fired are no exemplars
    out["p99"] = _percentile_from_hist(out["hist"], 0.99)
    out.update(images=images, patches=patches, grid=tuple(readout.bb.grid))
    if heatmaps:
        out["heatmaps"] = _winner_heatmaps(readout, source, out["top_ids"], batch_size)
    return out


def merge_over_processes(state: dict, images: int, k: int) -> tuple[dict, int]:
    """Every process's statistics (counts and sums added, maxima kept, top-k merged) and image
    count, the same on every process."""
    if jax.process_count() == 1:
        return state, images
    from jax.experimental import multihost_utils  # noqa: PLC0415

    every = multihost_utils.process_allgather({**state, "images": jnp.asarray(images)})  # leading axis: processes
    merged = {"fires": every["fires"].sum(0), "sum": every["sum"].sum(0), "max": every["max"].max(0),
              "hist": every["hist"].sum(0)}
    if "label_counts" in every:
        merged["label_counts"] = every["label_counts"].sum(0)
    values = np.concatenate(list(every["top_values"]), axis=1)  # [F, processes * k]
    ids = np.concatenate(list(every["top_ids"]), axis=1)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    merged["top_values"], merged["top_ids"] = np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)
    return merged, int(every["images"].sum())


def _skipped_note(source) -> str:
    """`, N unreadable images skipped` (with their names on hover), or nothing."""
    skipped = getattr(source, "skipped", {})
    if not skipped:
        return ""
    names = html.escape("\n".join(f"{source.describe(i)}: {why}" for i, why in sorted(skipped.items())), quote=True)
    return f", <span id='skipped' title=\"{names}\">{len(skipped)} unreadable images skipped</span>"


def _percentile_from_hist(hist: np.ndarray, q: float) -> np.ndarray:
    """[F] the upper bin edge where the cumulative count of non-zero activations reaches q."""
    total = hist.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(hist, axis=1) / np.maximum(total, 1)
    index = np.argmax(cumulative >= q, axis=1)
    upper = np.append(HIST_EDGES, np.inf)[index]
    return np.where(total[:, 0] > 0, upper, 0.0)


def _winner_heatmaps(readout, source, top_ids: np.ndarray, batch_size: int) -> np.ndarray:
    """[F, k, P] float16 patch activations of each latent on its own top images: one pass over
    the winning images only."""
    f, k = top_ids.shape
    maps = np.zeros((f, k, readout.bb.layout.n_patches), np.float16)
    winners = np.unique(top_ids[top_ids >= 0])
    for start in range(0, len(winners), batch_size):
        ids = winners[start:start + batch_size]
        codes = np.asarray(readout.encode(np.stack([source[int(i)].image for i in ids]))["codes"])  # [n, P, F]
        for row, image_id in enumerate(ids):
            latents, slots = np.nonzero(top_ids == image_id)
            maps[latents, slots] = codes[row][:, latents].T
    return maps


def nearest_by_decoder(w_dec_FD, n: int = 5, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [F, n], cosines [F, n])` of each latent's nearest latents by decoder-row cosine
    (itself excluded), in chunks of rows so memory stays `chunk x F`."""
    w = jnp.asarray(w_dec_FD, jnp.float32)
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    n = min(n, w.shape[0] - 1)

    @jax.jit
    def block(rows, start):
        cos = rows @ w.T
        cos = cos.at[jnp.arange(rows.shape[0]), start + jnp.arange(rows.shape[0])].set(-jnp.inf)
        return jax.lax.top_k(cos, n)

    ids, values = [], []
    for start in range(0, w.shape[0], chunk):
        v, i = block(w[start:start + chunk], start)
        ids.append(np.asarray(i))
        values.append(np.asarray(v))
    return np.concatenate(ids), np.concatenate(values)


# -------------------------------------------------------------------------------------------
# The site


_STYLE = """
body { font-family: sans-serif; margin: 20px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.label { text-align: left; }
.charts { display: flex; gap: 24px; flex-wrap: wrap; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; }
.tile { position: relative; text-align: center; font-size: 12px; }
.tile img { display: block; image-rendering: pixelated; }
.tile img.plain { display: none; }
.tile:hover img.heat { display: none; }
.tile:hover img.plain { display: block; }
.pager button { margin: 6px 4px; }
"""

_INDEX_JS = """
const rows = JSON.parse(document.getElementById('latent-data').textContent);
const columns = ['id', 'frequency', 'mean', 'max', 'p99', 'label'];
let sortKey = 'frequency', ascending = false, page = 0;
const pageSize = PAGE_SIZE;
function fmt(key, value) {
  if (key === 'id' || key === 'label') return value === null ? '' : String(value);
  return value === 0 ? '0' : Number(value).toPrecision(3);
}
function render() {
  const sorted = rows.slice().sort((a, b) => {
    const x = a[sortKey], y = b[sortKey];
    const c = (x === y) ? a.id - b.id : ((x < y) ? -1 : 1);
    return ascending ? c : -c;
  });
  const body = document.querySelector('#latents tbody');
  body.innerHTML = '';
  for (const row of sorted.slice(page * pageSize, (page + 1) * pageSize)) {
    const tr = document.createElement('tr');
    for (const key of columns) {
      const td = document.createElement('td');
      if (key === 'label') td.className = 'label';
      if (key === 'id' && row.page) {
        const a = document.createElement('a');
        a.href = 'latents/' + row.id + '.html';
        a.textContent = row.id;
        td.appendChild(a);
      } else {
        td.textContent = fmt(key, row[key]);
      }
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  const pages = Math.max(1, Math.ceil(rows.length / pageSize));
  document.getElementById('page-info').textContent = 'page ' + (page + 1) + ' of ' + pages;
  document.querySelectorAll('#latents th').forEach(th => {
    th.className = th.dataset.key === sortKey ? (ascending ? 'sorted-asc' : 'sorted-desc') : '';
  });
}
document.querySelectorAll('#latents th').forEach(th => th.addEventListener('click', () => {
  if (sortKey === th.dataset.key) { ascending = !ascending; } else { sortKey = th.dataset.key; ascending = false; }
  page = 0; render();
}));
document.getElementById('prev').addEventListener('click', () => { if (page > 0) { page--; render(); } });
document.getElementById('next').addEventListener('click', () => {
  if ((page + 1) * pageSize < rows.length) { page++; render(); }
});
render();
"""


def write_site(directory: str | os.PathLike, collected: dict[str, Any], ae, sae_params, source: data.Source, *,
               title: str = "SAE features", max_pages: int | None = None, page_size: int = 100,
               neighbours: int = 5, pages_for: Sequence[int] = ()) -> str:
    """Write the browser for `collected` (from `collect`) into `directory`; returns the index
    path. Pages are written for live latents, most frequent first, up to `max_pages`, and for
    every live latent in `pages_for` (those another page links to)."""
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, "latents"), exist_ok=True)
    frequency, mean = collected["frequency"], collected["mean"]
    f = len(frequency)
    classes = source.classes if source.has_labels else None
    top_label = [None] * f
    if classes and getattr(source, "labels", None) is not None:  # the most common label of its top images
        image_labels = np.asarray(source.labels)
        for i, ids in enumerate(collected["top_ids"]):
            ids = ids[ids >= 0]
            if ids.size:
                top_label[i] = classes[int(np.bincount(image_labels[ids].astype(np.int64)).argmax())]
    live = np.flatnonzero(frequency > 0)
    with_pages = live[np.argsort(-frequency[live], kind="stable")][:max_pages]
    wanted = np.asarray([i for i in pages_for if 0 <= i < f and frequency[i] > 0], np.int64)
    with_pages = np.concatenate([with_pages, np.setdiff1d(wanted, with_pages)])
    has_page = np.zeros(f, bool)
    has_page[with_pages] = True
    near_ids, near_cos = nearest_by_decoder(sae_params.w_dec, neighbours)

    dead, dense = int(np.sum(frequency == 0)), int(np.sum(frequency >= DENSE_FREQUENCY))
    rows = [{"id": i, "frequency": float(frequency[i]), "mean": float(mean[i]), "max": float(collected["max"][i]),
             "p99": float(collected["p99"][i]), "label": top_label[i], "page": bool(has_page[i])} for i in range(f)]
    charts = (_histogram_svg(np.log10(frequency[live]) if live.size else np.zeros(0), "log10 firing frequency",
                             "latents") +
              _scatter_svg(np.log10(frequency[live]), np.log10(np.maximum(mean[live], 1e-12)),
                           "log10 frequency vs log10 mean activation"))
    header = "".join(f"<th data-key='{key}'>{name}</th>" for key, name in (
        ("id", "latent"), ("frequency", "frequency"), ("mean", "mean"), ("max", "max"), ("p99", "p99"),
        ("label", "top label")))
    body = (f"<h1>{html.escape(title)}</h1>"
            f"<p>{f} latents, {collected['images']} images, {collected['patches']} patches"
            f"{_skipped_note(source)}. "
            f"<b id='dead'>{dead}</b> dead (never fired), <b id='dense'>{dense}</b> dense (fire on &ge; "
            f"{DENSE_FREQUENCY:g} of patches).</p><div class='charts'>{charts}</div>"
            f"<div class='pager'><button id='prev'>previous</button><span id='page-info'></span>"
            f"<button id='next'>next</button></div>"
            f"<table id='latents'><thead><tr>{header}</tr></thead><tbody></tbody></table>"
            f"<script id='latent-data' type='application/json'>{_json_for_script(rows)}</script>"
            f"<script>{_INDEX_JS.replace('PAGE_SIZE', str(int(page_size)))}</script>")
    for latent in with_pages:  # the index last: one that opens links to pages that exist
        _write_latent_page(directory, int(latent), collected, source, classes, near_ids[latent], near_cos[latent],
                           has_page, title)
    return write_atomically(os.path.join(directory, "index.html"), _page(title, body))


def _write_latent_page(directory, latent, collected, source, classes, near, cos, has_page, title):
    vmax = float(collected["max"][latent]) or 1.0
    grid = collected["grid"]
    tiles = []
    for slot, image_id in enumerate(collected["top_ids"][latent]):
        if image_id < 0:
            continue
        example = source[int(image_id)]
        scale = max(1, 128 // example.image.shape[0])
        heat = viz.highlight_patches(example.image, collected["heatmaps"][latent, slot].astype(np.float32).reshape(grid),
                                     vmax, scale=scale) if "heatmaps" in collected else example.image
        plain = np.repeat(np.repeat(example.image, scale, 0), scale, 1)
        caption = f"{collected['top_values'][latent, slot]:.3g}"
        if classes and example.label is not None:
            caption += f" &middot; {html.escape(str(classes[int(example.label)]))}"
        tiles.append(f"<div class='tile'><img class='heat' alt='image {image_id}, latent {latent}' "
                     f"src='{viz.data_uri(viz.png_bytes(heat))}'><img class='plain' alt='image {image_id}' "
                     f"src='{viz.data_uri(viz.png_bytes(plain))}'><div>{caption}</div></div>")
    labels = ""
    if "label_counts" in collected and classes:
        counts = collected["label_counts"][latent]
        best = [i for i in np.argsort(-counts)[:5] if counts[i] > 0]
        labels = "<p>Fires on images labelled: " + ", ".join(
            f"{html.escape(str(classes[i]))} ({int(counts[i])})" for i in best) + "</p>"
    neighbours = ", ".join((f"<a href='{int(i)}.html'>{int(i)}</a>" if has_page[i] else f"{int(i)}") + f" ({c:.2f})"
                           for i, c in zip(near, cos))
    hist = collected["hist"][latent]
    centres = np.log10(np.concatenate([[HIST_EDGES[0] / 2], np.sqrt(HIST_EDGES[:-1] * HIST_EDGES[1:]),
                                       [HIST_EDGES[-1] * 2]]))
    body = (f"<p><a href='../index.html'>&larr; all latents</a></p><h1>Latent {latent}</h1>"
            f"<p>frequency {collected['frequency'][latent]:.3g} &middot; mean {collected['mean'][latent]:.3g} &middot; "
            f"max {collected['max'][latent]:.3g} &middot; p99 {collected['p99'][latent]:.3g}</p>{labels}"
            f"<h2>Top images</h2><p>Patches tinted by activation / {vmax:.3g} (this latent's max); hover for the "
            f"plain image.</p><div class='tiles'>{''.join(tiles)}</div>"
            f"<h2>Activations</h2>{viz.bars_svg(centres, hist, 'log10 activation where it fires', 'patches')}"
            f"<h2>Nearest latents by decoder cosine</h2><p id='neighbours'>{neighbours}</p>")
    write_atomically(os.path.join(directory, "latents", f"{latent}.html"), _page(f"Latent {latent} - {title}", body))


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}{viz.written_by_footer()}</body></html>")


def _json_for_script(value) -> str:
    return json.dumps(value).replace("</", "<\\/")


def _histogram_svg(values: np.ndarray, title: str, unit: str, bins: int = 30) -> str:
    if values.size == 0:
        return f"<svg width='420' height='200'><text x='10' y='20'>{html.escape(title)}: no live latents</text></svg>"
    counts, edges = np.histogram(values, bins=bins)
    return viz.bars_svg((edges[:-1] + edges[1:]) / 2, counts, title, unit)


def _scatter_svg(x: np.ndarray, y: np.ndarray, title: str, width: int = 420, height: int = 200,
                 max_points: int = 5000) -> str:
    if x.size == 0:
        return f"<svg width='{width}' height='{height}'><text x='10' y='20'>{html.escape(title)}: no data</text></svg>"
    if x.size > max_points:
        keep = np.random.default_rng(0).choice(x.size, max_points, replace=False)
        x, y = x[keep], y[keep]
    left, right, top, bottom = 44, 10, 24, 28
    x0, x1, y0, y1 = x.min(), max(x.max(), x.min() + 1e-6), y.min(), max(y.max(), y.min() + 1e-6)
    sx = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    dots = "".join(f"<circle cx='{sx(a):.1f}' cy='{sy(b):.1f}' r='1.8' fill='#dd8452' fill-opacity='0.6'/>"
                   for a, b in zip(x, y))
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
            f"font-size='11'><text x='{left}' y='14' font-weight='bold'>{html.escape(title)}</text>{dots}"
            f"<text x='{left}' y='{height - 8}'>{x0:.2f}</text><text x='{width - right}' y='{height - 8}' "
            f"text-anchor='end'>{x1:.2f}</text><text x='{left - 4}' y='{top + 8}' text-anchor='end'>{y1:.2f}</text>"
            f"<text x='{left - 4}' y='{height - bottom}' text-anchor='end'>{y0:.2f}</text></svg>")


def browse(site, source: data.Source, directory: str | os.PathLike, *, k: int = 20, batch_size: int = 64,
           limit: int | None = None, title: str = "SAE features", max_pages: int | None = None,
           pages_for: Sequence[int] = ()) -> str:
    """`collect` then `write_site`: the browser of `site`'s SAE over `source`, in `directory`.
    Returns the index page's path."""
    collected = collect(site, source, k=k, batch_size=batch_size, limit=limit)
    index = os.path.join(os.fspath(directory), "index.html")
    if jax.process_index() == 0:  # every process holds the merged statistics; one writes the site
        index = write_site(directory, collected, site.ae, site.sae_params, source, title=title, max_pages=max_pages,
                           pages_for=pages_for)
    skipped = f", {len(source.skipped)} unreadable skipped" if source.skipped else ""
    print(f"wrote {index} ({collected['images']} images{skipped}; open it in a browser)", flush=True)
    return index
