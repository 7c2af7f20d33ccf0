import io

import numpy as np
from PIL import Image

from saejax import viz


def test_highlight_tints_only_firing_patches():
    image = np.full((8, 8, 3), 100, np.uint8)
    acts = np.array([[0.0, 2.0], [0.0, 0.0]])
    out = viz.highlight_patches(image, acts, vmax=2.0, scale=2)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[:8, :8], 100)  # silent patch untouched
    np.testing.assert_array_equal(out[8:, :], 100)
    top = viz.colormap(np.array(1.0)).astype(np.float32)
    np.testing.assert_array_equal(out[0, 8], (0.4 * 100 + 0.6 * top).astype(np.uint8))


def test_png_and_tile_round_trip():
    images = [np.full((4, 5, 3), v, np.uint8) for v in (0, 80, 160)]
    grid = viz.tile(images, columns=2, pad=1)
    assert grid.shape == (9, 11, 3)
    decoded = np.asarray(Image.open(io.BytesIO(viz.png_bytes(grid))))
    np.testing.assert_array_equal(decoded, grid)
    assert viz.data_uri(b"x").startswith("data:image/png;base64,")


def test_colormap_is_ordered_and_chart_renders():
    ramp = viz.colormap(np.linspace(0, 1, 11)).astype(int).sum(axis=1)
    assert np.all(np.diff(ramp) > 0)
    svg = viz.line_chart_svg({"loss": [(0, 1.0), (10, 0.5)], "nan": [(0, float("nan"))]}, title="a < b")
    assert svg.startswith("<svg") and "a &lt; b" in svg and "polyline" in svg
    assert "<!doctype html>" in viz.html_page("t", "<p>x</p>")
