"""Pictures for people: exemplar images with activating patches highlighted, line charts, and a
self-contained HTML page (PNG and SVG inlined, no external files).

Side effects live here (PIL encoding); inputs are numpy arrays.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

import numpy as np

from saejax.provenance import written_by

# A perceptually ordered dark-to-bright ramp (inferno-like), interpolated linearly.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] uint8 RGB."""
    x = np.clip(np.asarray(values, np.float32), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (x - lo)[..., None]
    return ((1 - t) * _RAMP[lo] + t * _RAMP[hi]).astype(np.uint8)


def highlight_patches(image_HW3: np.ndarray, patch_acts: np.ndarray, vmax: float, *, scale: int = 4,
                      alpha: float = 0.6) -> np.ndarray:
    """The image (upscaled `scale` times) with each patch where the latent fires tinted by the
    colour map at `activation / vmax`; silent patches are left as they are.

    Args:
        image_HW3: uint8 image.
        patch_acts: [gh, gw] the latent's activation per patch.
        vmax: the value mapped to the top of the colour map (the latent's maximum).
    """
    image = np.asarray(image_HW3, np.uint8)
    h, w, _ = image.shape
    gh, gw = patch_acts.shape
    big = np.repeat(np.repeat(image, scale, 0), scale, 1).astype(np.float32)
    per_pixel = np.repeat(np.repeat(np.asarray(patch_acts, np.float32), h * scale // gh, 0), w * scale // gw, 1)
    tint = colormap(per_pixel / max(float(vmax), 1e-12)).astype(np.float32)
    fired = (per_pixel > 0)[..., None]
    return np.where(fired, (1 - alpha) * big + alpha * tint, big).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tile(images: Sequence[np.ndarray], columns: int, pad: int = 2, background: int = 255) -> np.ndarray:
    """Images of one size in a grid, `pad` pixels apart."""
    h, w, c = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), background, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = img
    return grid


def before_after_png(image_HW3: np.ndarray, selected_grid: np.ndarray, before_K: np.ndarray, after_K: np.ndarray,
                     class_names: Sequence[str], *, title: str = "", top: int = 5, scale: int | None = None) -> bytes:
    """A PNG: the image with the selected patches outlined, and the top classes' probability bars
    before (grey) and after (blue) an edit (top classes of either).

    Args:
        image_HW3: uint8 image.
        selected_grid: bool [gh, gw], the selected patches.
        before_K, after_K: class probabilities.
        class_names: K names.
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    scale = scale or max(1, 192 // image_HW3.shape[0])  # small images drawn at least ~192 px tall
    image = np.repeat(np.repeat(np.asarray(image_HW3, np.uint8), scale, 0), scale, 1)
    h, w, _ = image.shape
    gh, gw = selected_grid.shape
    ph, pw = h / gh, w / gw
    classes = list(dict.fromkeys([*np.argsort(-before_K)[:top].tolist(), *np.argsort(-after_K)[:top].tolist()]))
    bar_w, row_h = 240, 18
    canvas = Image.new("RGB", (w + 30 + 200 + bar_w + 110, max(h + 24, 30 + (row_h + 8) * len(classes))), "white")
    canvas.paste(Image.fromarray(image), (0, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 2), f"{title}   bars: grey before, blue after", fill="black")
    for r, c in zip(*np.nonzero(selected_grid)):
        draw.rectangle([c * pw, 20 + r * ph, (c + 1) * pw - 1, 20 + (r + 1) * ph - 1], outline=(255, 40, 40), width=2)
    x0, y = w + 30, 24
    for k in classes:
        draw.text((x0, y), str(class_names[k])[:28], fill="black")
        for probs, colour, dy in ((before_K, (150, 150, 150), 0), (after_K, (40, 90, 220), row_h // 2 + 1)):
            length = int(bar_w * float(probs[k]))
            draw.rectangle([x0 + 200, y + dy, x0 + 200 + max(length, 1), y + dy + row_h // 2 - 1], fill=colour)
        draw.text((x0 + 200 + bar_w + 10, y), f"{before_K[k]:.2f} -> {after_K[k]:.2f}", fill="black")
        y += row_h + 8
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def line_chart_svg(series: dict[str, Sequence[tuple[float, float]]], *, title: str, width: int = 420,
                   height: int = 220, log_y: bool = False) -> str:
    """A small inline SVG line chart of named (x, y) series."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    points = [(x, y) for s in series.values() for x, y in s if np.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        return f"<svg width='{width}' height='{height}'><text x='10' y='20'>{html.escape(title)}: no data</text></svg>"
    tf = (lambda v: np.log10(v)) if log_y else (lambda v: v)
    xs = [p[0] for p in points]
    ys = [tf(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1
    left, right, top, bottom = 48, 10, 24, 28

    def sx(x):
        return left + (x - x0) / max(x1 - x0, 1e-12) * (width - left - right)

    def sy(y):
        return height - bottom - (tf(y) - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             f"font-size='11'><text x='{left}' y='14' font-weight='bold'>{html.escape(title)}</text>",
             f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#888'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#888'/>"]
    for value in (y0, y1):
        label = f"{10 ** value:.3g}" if log_y else f"{value:.3g}"
        y = height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom)
        parts.append(f"<text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end'>{label}</text>")
    parts.append(f"<text x='{left}' y='{height - 8}'>{x0:g}</text>"
                 f"<text x='{width - right}' y='{height - 8}' text-anchor='end'>{x1:g}</text>")
    for i, (name, s) in enumerate(series.items()):
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if np.isfinite(y) and (y > 0 or not log_y))
        colour = colours[i % len(colours)]
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{pts}'/>")
        parts.append(f"<text x='{width - right}' y='{top + 12 * (i + 1)}' text-anchor='end' fill='{colour}'>"
                     f"{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(x: np.ndarray, counts: np.ndarray, title: str, unit: str, width: int = 420, height: int = 200) -> str:
    """A small inline SVG bar chart: `counts` over bin centres `x` (hover a bar for its count)."""
    left, right, top, bottom = 44, 10, 24, 28
    peak = max(int(np.max(counts)) if len(counts) else 0, 1)
    bar = (width - left - right) / max(len(counts), 1)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             f"font-size='11'><text x='{left}' y='14' font-weight='bold'>{html.escape(title)}</text>"]
    for i, c in enumerate(counts):
        h = (height - top - bottom) * float(c) / peak
        parts.append(f"<rect x='{left + i * bar:.1f}' y='{height - bottom - h:.1f}' width='{max(bar - 1, 1):.1f}' "
                     f"height='{h:.1f}' fill='#4c72b0'><title>{x[i]:.2f}: {int(c)} {unit}</title></rect>")
    parts.append(f"<text x='{left - 4}' y='{top + 8}' text-anchor='end'>{peak}</text>"
                 f"<text x='{left}' y='{height - 8}'>{x[0]:.2f}</text>"
                 f"<text x='{width - right}' y='{height - 8}' text-anchor='end'>{x[-1]:.2f}</text></svg>")
    return "".join(parts)


def scatter_svg(points: Sequence[tuple[float, float, str]], *, title: str, x_label: str, y_label: str,
                highlight: Sequence[bool] | None = None, width: int = 420, height: int = 260) -> str:
    """A small inline SVG scatter of labelled points `(x, y, label)`; `highlight[i]` points are
    drawn filled and joined by a line in x order (e.g. a Pareto front), the others hollow."""
    finite = [(x, y, label, bool(highlight[i]) if highlight is not None else False)
              for i, (x, y, label) in enumerate(points) if np.isfinite(x) and np.isfinite(y)]
    if not finite:
        return f"<svg width='{width}' height='{height}'><text x='10' y='20'>{html.escape(title)}: no data</text></svg>"
    xs, ys = [p[0] for p in finite], [p[1] for p in finite]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or 1.0, (y1 - y0) * 0.08 or 0.05
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    left, right, top, bottom = 52, 14, 24, 40
    sx = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             f"font-size='11' class='scatter'><text x='{left}' y='14' font-weight='bold'>{html.escape(title)}</text>",
             f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#888'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#888'/>",
             f"<text x='{left}' y='{height - bottom + 14}'>{x0 + pad_x:.3g}</text>"
             f"<text x='{width - right}' y='{height - bottom + 14}' text-anchor='end'>{x1 - pad_x:.3g}</text>"
             f"<text x='{(left + width - right) / 2}' y='{height - 6}' text-anchor='middle'>{html.escape(x_label)}</text>"
             f"<text x='{left - 4}' y='{sy(y1 - pad_y) + 4:.1f}' text-anchor='end'>{y1 - pad_y:.3g}</text>"
             f"<text x='{left - 4}' y='{sy(y0 + pad_y) + 4:.1f}' text-anchor='end'>{y0 + pad_y:.3g}</text>"
             f"<text x='12' y='{(top + height - bottom) / 2}' text-anchor='middle' "
             f"transform='rotate(-90 12 {(top + height - bottom) / 2})'>{html.escape(y_label)}</text>"]
    front = sorted((x, y) for x, y, _, h in finite if h)
    if len(front) > 1:
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in front)
        parts.append(f"<polyline class='front' fill='none' stroke='#d62728' stroke-width='1.2' points='{pts}'/>")
    for x, y, label, h in finite:
        style = "fill='#d62728'" if h else "fill='white' stroke='#1f77b4' stroke-width='1.5'"
        parts.append(f"<circle class='{'point front-point' if h else 'point'}' cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='4' "
                     f"{style}><title>{html.escape(label)}: {x:.4g}, {y:.4g}</title></circle>"
                     f"<text x='{sx(x) + 6:.1f}' y='{sy(y) - 5:.1f}' font-size='10'>{html.escape(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def html_page(title: str, body: str) -> str:
    """A complete HTML document with a small built-in style sheet."""
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td.l,th.l{text-align:left}img{image-rendering:pixelated}"
             ".row{display:flex;gap:1.5em;flex-wrap:wrap}.card{margin:0.5em 0 1.5em}.good{color:#186a3b}"
             ".bad{color:#a93226}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}{written_by_footer()}</body></html>")


def written_by_footer() -> str:
    """The versions that wrote a page, as its last line (`saejax.provenance.written_by`)."""
    versions = written_by()
    return ("<p class='written-by' style='color:#777;font-size:small'>Written by saejax "
            f"{html.escape(versions['saejax'])} (" + ", ".join(f"{html.escape(k)} {html.escape(v)}"
                                                            for k, v in versions.items() if k != "saejax") + ").</p>")
