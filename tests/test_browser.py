"""The feature browser: the streamed statistics equal a direct computation, and the site works
the way a person uses it, in headless Chromium (driven by Playwright; `conftest.chromium_path` finds it)."""

import json
import os
import re

import numpy as np
import pytest

from saejax.cli import browse
from saejax.configs import browse as browse_config
from saejax.cli.builders import build_backbone, build_sae
from saejax import browser, data, site
from saejax.datasets import shapes
from conftest import chromium_path



@pytest.fixture(scope="module")
def small(tmp_path_factory):
    config = browse_config.get_config("small")
    bb, bb_params = build_backbone(config.backbone)
    ae, sae_params, _ = build_sae(config.sae, bb.d_model)
    source = shapes.source("validation", 40, seed=0, image_size=40)
    readout = site.Site(bb, bb_params, layer=1, ae=ae, sae_params=sae_params)
    collected = browser.collect(readout, source, k=4, batch_size=16)
    site_dir = tmp_path_factory.mktemp("site")
    browser.write_site(site_dir, collected, ae, sae_params, source, title="test site", page_size=50)
    return readout, source, collected, ae, sae_params, site_dir


def test_streamed_statistics_equal_a_direct_computation(small):
    readout, source, collected, ae, _, _ = small
    images = next(data.batches(source, len(source), shuffle=False, drop_remainder=False, epochs=1)).images
    codes = np.asarray(readout.encode(images)["codes"])  # [N, P, F], all at once
    np.testing.assert_allclose(collected["frequency"], (codes > 0).mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(collected["max"], codes.max(axis=(0, 1)), rtol=1e-6)
    fires = (codes > 0).sum(axis=(0, 1))
    np.testing.assert_allclose(collected["mean"], np.where(fires, codes.sum(axis=(0, 1)) / np.maximum(fires, 1), 0),
                               rtol=1e-5)
    image_max = codes.max(axis=1)  # [N, F]
    for latent in (0, 17, 101):
        want = np.sort(image_max[:, latent])[::-1][:4]
        np.testing.assert_allclose(collected["top_values"][latent], want, rtol=1e-6)
        for slot, image_id in enumerate(collected["top_ids"][latent]):  # heatmaps of the winners only
            np.testing.assert_allclose(collected["heatmaps"][latent, slot], codes[image_id, :, latent], rtol=2e-3,
                                       atol=2e-3)
    positive = codes[..., 17][codes[..., 17] > 0]
    assert np.mean(positive <= collected["p99"][17]) >= 0.99
    ids, cos = browser.nearest_by_decoder(small[4].w_dec, n=3, chunk=50)  # chunks of 50 rows of 128
    w = np.asarray(small[4].w_dec)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = w @ w.T
    np.fill_diagonal(sims, -np.inf)  # a latent is not its own neighbour
    np.testing.assert_array_equal(ids[:, 0], sims.argmax(1))
    np.testing.assert_allclose(cos[:, 0], sims.max(1), rtol=1e-5)


def test_the_site_in_headless_chromium(small, tmp_path):
    from playwright.sync_api import sync_playwright

    *_, site = small
    errors = []
    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = chrome.new_page(viewport={"width": 1200, "height": 1400})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{site}/index.html")
        assert page.locator("#latents tbody tr").count() == 50  # page 1 of 3 (128 latents)
        assert page.inner_text("#page-info") == "page 1 of 3"

        def column(index):
            return [float(t) for t in page.locator(f"#latents tbody tr td:nth-child({index})").all_inner_texts()]

        frequency = column(2)
        assert frequency == sorted(frequency, reverse=True)  # by frequency, most frequent first
        page.click("th[data-key=mean]")
        means = column(3)
        assert means == sorted(means, reverse=True) and means != column(2)
        page.click("th[data-key=mean]")
        assert column(3) == sorted(column(3))  # a second click reverses
        page.click("#next")
        assert page.inner_text("#page-info") == "page 2 of 3"
        page.click("th[data-key=id]")
        first = page.locator("#latents tbody tr td a").first
        latent = first.inner_text()
        first.click()
        page.wait_for_load_state()
        assert page.url.endswith(f"/latents/{latent}.html")
        assert page.inner_text("h1") == f"Latent {latent}"
        images = page.locator(".tile img.heat")
        assert images.count() == 4
        widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert widths and all(w > 0 for w in widths)  # every image decoded and rendered
        page.hover(".tile >> nth=0")
        assert page.locator(".tile >> nth=0 >> img.plain").is_visible()  # hover shows the plain image
        neighbour = page.locator("#neighbours a").first
        target = neighbour.inner_text()
        neighbour.click()
        page.wait_for_load_state()
        assert page.inner_text("h1") == f"Latent {target}"
        page.screenshot(path=str(tmp_path / "latent.png"))
        chrome.close()
    assert errors == []
    assert (tmp_path / "latent.png").stat().st_size > 10_000


def test_the_binary_writes_a_site(tmp_path):
    config = browse_config.get_config("small")
    config.images = 32
    index = browse.run(config, str(tmp_path / "site"))
    text = open(index).read()
    assert "128 latents, 32 images" in text and re.search(r"<b id='dead'>\d+</b> dead", text)
    rows = json.loads(re.search(r"<script id='latent-data' type='application/json'>(.*?)</script>", text).group(1))
    assert [r["id"] for r in rows] == list(range(128))
    pages = sorted(int(name[:-5]) for name in os.listdir(tmp_path / "site" / "latents"))
    assert pages == [r["id"] for r in rows if r["page"]] == [r["id"] for r in rows if r["frequency"] > 0]
