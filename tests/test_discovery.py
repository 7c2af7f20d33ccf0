"""saejax.discovery: attribution against the derivative it claims to be, streaming, ranking,
the statistics of verification, and, on a small shapes world, the colour latents found and
verified without being told which they are."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.cli import discover
from saejax.configs import discover as discover_config
import saejax
from saejax import backbones, data, fidelity, interventions, metrics, sae
from saejax.analysis import discovery
from saejax.analysis.site import Site
from saejax.core.normalization import Normalization
from saejax.datasets import shapes

import shapes_world
from conftest import chromium_path



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ViT classifier (4 classes) and a ReLU SAE at block 1 whose latents fire on
    some patches, with a non-trivial normalisation."""
    path = backbones.create_random("vit", str(tmp_path_factory.mktemp("vit")), seed=0, n_classes=4, hidden_size=32,
                                   num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=40,
                                   patch_size=8)
    bb, params = backbones.load(path)
    ae = sae.relu(32, 96)
    sae_params = ae.init(jax.random.key(1))
    sae_params = sae_params.replace(b_enc=jnp.full((96,), -0.2))
    norm = Normalization(mean=jnp.linspace(-0.1, 0.1, 32), scalar=jnp.asarray(0.7))
    site = Site(bb, params, layer=1, ae=ae, sae_params=sae_params, norm=norm)
    images = shapes.source("train", 24, seed=0, image_size=40).world.images
    return site, images



def test_the_sites_edit_is_the_sae_edit_in_its_normalised_space_and_finish_equals_edited(tiny):
    """`site.edit(latent_edit)` is `sae_edit(ae, params, latent_edit, norm)`; finishing the
    captured residual equals the whole edited forward."""
    site, images = tiny
    out = site.encode(images[:4])
    edit = site.edit(interventions.set_to(5, 3.0))
    by_hand = interventions.sae_edit(site.ae, site.sae_params, interventions.set_to(5, 3.0), site.norm)
    np.testing.assert_array_equal(edit(out["at_layer"]), by_hand(out["at_layer"]))
    finished, edited = site.finish(edit, out["at_layer"]), site.edited(edit, images[:4])
    np.testing.assert_allclose(finished["pooled"], edited["pooled"], atol=1e-5)
    assert np.abs(np.asarray(finished["pooled"]) - np.asarray(out["pooled"])).max() > 1e-4  # the edit did something

def _attribute(site, images, targets=None, objective="centred_logit"):
    return discovery.site_attribution(site, fidelity.classifier_head, images, targets, objective=objective)


@pytest.mark.parametrize("objective", discovery.OBJECTIVES)
def test_attribution_is_the_derivative_of_scaling_the_latent_on_the_patches(tiny, objective):
    """a_i = z_i dS/dz_i = d/de S(z_i -> (1 + e) z_i) at e = 0; the edit runs through
    `interventions.sae_edit` (error kept, normalisation undone), a path of its own."""
    site, images = tiny
    images = images[:6]
    out = _attribute(site, images, objective=objective)
    targets = out["targets"]
    mask = np.zeros(site.bb.layout.n_tokens, bool)
    mask[slice(*site.bb.layout.patches)] = True
    fired = np.flatnonzero(np.asarray(out["codes"]).max((0, 1)) > 0)
    assert fired.size > 10
    pixels = site.pixels(images)

    @jax.jit
    def derivative(latent):
        def score(e):
            chosen = (jnp.arange(site.ae.d_sae) == latent) * jnp.asarray(mask)[:, None]  # [T, F]
            edit = interventions.sae_edit(site.ae, site.sae_params, lambda z: z + e * z * chosen, norm=site.norm)
            logits = site.bb.forward(site.bb_params, pixels, edits={site.layer: edit}).logits
            return discovery._target_score(logits, targets, objective)  # pylint: disable=protected-access

        return jax.jvp(score, (jnp.zeros(()),), (jnp.ones(()),))[1]

    for latent in fired[:6]:
        np.testing.assert_allclose(out["attribution"][:, latent], derivative(latent), rtol=2e-3, atol=1e-5)
    # The forward pass with the error kept is the clean one.
    clean = site.bb.forward(site.bb_params, site.pixels(images)).logits
    np.testing.assert_allclose(out["logits"], clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(targets, np.argmax(clean, -1))


def test_a_site_is_a_pytree_that_jit_and_vmap_take_as_an_argument(tiny):
    """The parameters are leaves and the rest static: a Site with other parameters reuses the
    compiled attribution, a vmap over stacked SAEs gives each member's own codes, and the old
    loose-argument spelling gives the same attribution (with a DeprecationWarning)."""
    site, images = tiny
    pixels = site.pixels(images[:3])
    attribution = jax.jit(discovery.latent_attribution, static_argnames=("head", "objective"))
    want = attribution(site, pixels, head=fidelity.classifier_head)
    compiled = attribution._cache_size()  # pylint: disable=protected-access
    other = site.replace(sae_params=jax.tree.map(lambda a: 2 * a, site.sae_params))
    got = attribution(other, pixels, head=fidelity.classifier_head)
    assert attribution._cache_size() == compiled  # pylint: disable=protected-access
    assert not np.allclose(got["attribution"], want["attribution"])
    assert len(jax.tree.leaves(site)) == len(jax.tree.leaves((site.bb_params, site.sae_params, site.norm)))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), site.sae_params, other.sae_params)
    codes = jax.vmap(lambda p: site.replace(sae_params=p).encode_pixels(pixels)["codes"])(stacked)
    np.testing.assert_allclose(codes[1], other.encode(images[:3])["codes"], rtol=1e-5, atol=1e-6)
    with pytest.warns(DeprecationWarning, match="pass a Site"):
        old = discovery.latent_attribution(site.bb, site.bb_params, site.ae, site.sae_params, pixels, layer=site.layer,
                                           norm=site.norm, head=fidelity.classifier_head)
    np.testing.assert_allclose(old["attribution"], want["attribution"], rtol=1e-5, atol=1e-6)


def test_targets_default_to_the_prediction_and_labels_override_them(tiny):
    site, images = tiny
    predicted = np.asarray(_attribute(site, images[:4])["targets"])
    given = np.array([3, -1, 0, 2])
    out = _attribute(site, images[:4], targets=given)
    np.testing.assert_array_equal(out["targets"], np.where(given < 0, predicted, given))
    with pytest.raises(ValueError, match="objective 'margin'"):
        _attribute(site, images[:2], objective="margin")


def test_streamed_scores_equal_one_batch_and_do_not_depend_on_the_batch_size(tiny):
    site, images = tiny
    source = data.ArraySource(images, labels=np.arange(len(images)) % 4)
    whole = _attribute(site, images, targets=np.arange(len(images)) % 4)
    onehot = np.eye(4)[np.arange(len(images)) % 4]
    codes = np.asarray(whole["codes"])
    for batch_size in (8, 24):
        scores = discovery.attribution_scores(site, fidelity.classifier_head, source, n_classes=4,
                                              batch_size=batch_size, targets="label")
        np.testing.assert_allclose(scores.sums, onehot.T @ np.asarray(whole["attribution"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(scores.images, onehot.sum(0))
        np.testing.assert_allclose(scores.frequency(), (codes > 0).mean((0, 1)), rtol=1e-6)
        np.testing.assert_allclose(scores.maxes, codes.max((0, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="the head gives 4 logits, but n_classes=3"):
        discovery.attribution_scores(site, fidelity.classifier_head, source, n_classes=3)
    with pytest.raises(ValueError, match="no labels"):
        discovery.attribution_scores(site, fidelity.classifier_head, data.ArraySource(images), n_classes=4,
                                     targets="label")


def test_candidates_skip_dead_dense_and_negative_latents():
    d = 6
    scores = discovery.AttributionScores(
        sums=jnp.asarray([[5.0, 9.0, 4.0, 3.0, -1.0, 0.0], [-2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        images=jnp.asarray([2.0, 1.0]),
        firing=metrics.FiringStats(n_inputs=jnp.asarray(100.0), counts=jnp.asarray([10.0, 60.0, 0.0, 1.0, 5.0, 5.0]),
                                   sums=jnp.ones(d), maxes=jnp.ones(d)))
    ids, values = scores.candidates(3, max_frequency=0.5)
    # Latent 1 is dense (60%), 2 never fired, 4 works against class 0, 5 does nothing.
    np.testing.assert_array_equal(ids, [[0, 3, -1], [-1, -1, -1]])
    np.testing.assert_allclose(values[0, :2], [2.5, 1.5])
    assert np.isnan(values[0, 2]) and np.isnan(values[1]).all()


def test_permutation_p_values_and_holm():
    rng = np.random.default_rng(0)
    assert discovery.paired_permutation_p(np.ones(30), np.ones(30), permutations=500, rng=rng) == 1.0
    assert discovery.paired_permutation_p(np.full(30, 2.0), np.ones(30), permutations=500, rng=rng) == 1 / 501
    assert discovery.paired_permutation_p(np.zeros(0), np.zeros(0), permutations=10, rng=rng) == 1.0
    # Under the null, p is uniform: about 5% of tests fall below 0.05.
    null = [discovery.paired_permutation_p(rng.normal(size=40), rng.normal(size=40), permutations=400, rng=rng)
            for _ in range(300)]
    assert 0.02 <= np.mean(np.asarray(null) < 0.05) <= 0.09
    np.testing.assert_allclose(discovery.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(discovery.margins([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]], [1, 0]), [1.0, -4.0])


def test_matched_directions_move_the_same_tokens_as_far_as_the_latent_edit(tiny):
    """The random-direction baselines: where-active for suppression (the tokens where the latent
    fires), every patch for amplification; the same mean distance as the latent's own edit."""
    site, images = tiny
    scores = discovery.attribution_scores(site, fidelity.classifier_head, data.ArraySource(images), n_classes=4)
    edits = discovery._Edits(site, scores, discovery.Verification())  # pylint: disable=protected-access
    at_layer = site.encode(images)["at_layer"]
    codes = np.asarray(site.encode(images)["codes"])
    latent = int(np.argmax((codes > 0).mean((0, 1))))
    direction = np.random.default_rng(0).standard_normal(site.bb.d_model)
    direction /= np.linalg.norm(direction)
    patches = slice(*site.bb.layout.patches)
    for kind in ("suppress", "amplify"):
        moved_by_latent = np.linalg.norm(np.asarray(edits.latent(latent, kind)(at_layer) - at_layer), axis=-1)
        moved_by_direction = np.linalg.norm(np.asarray(edits.direction(latent, kind, direction)(at_layer) - at_layer),
                                            axis=-1)
        assert moved_by_latent[:, 0].max() == moved_by_direction[:, 0].max() == 0  # CLS untouched
        tokens = codes[..., latent] > 0 if kind == "suppress" else np.ones(codes.shape[:2], bool)
        np.testing.assert_array_equal(moved_by_direction[:, patches] > 0, tokens)
        np.testing.assert_array_equal(moved_by_latent[:, patches] > 1e-6, tokens)
        np.testing.assert_allclose(moved_by_direction[:, patches][tokens].mean(),
                                   moved_by_latent[:, patches][tokens].mean(), rtol=1e-3)


def test_verify_rejects_a_latent_the_sae_does_not_have_and_too_few_permutations(tiny):
    site, images = tiny
    source = data.ArraySource(images)
    scores = discovery.attribution_scores(site, fidelity.classifier_head, source, n_classes=4)
    with pytest.raises(ValueError, match="latent id 96 is out of range"):
        discovery.verify(site, fidelity.classifier_head, source, {0: [96]}, scores)
    live = np.flatnonzero(np.asarray(scores.frequency()) > 0)
    with pytest.raises(ValueError, match="999 permutations cannot make any of 20 edits significant at alpha=0.01"):
        discovery.verify(site, fidelity.classifier_head, source, {0: live[:10].tolist()}, scores,
                         settings=discovery.Verification(permutations=999, max_frequency=1.0))


def test_on_the_shapes_world_the_colour_head_is_explained_by_the_colour_latents(tmp_path_factory, tmp_path):
    """The factorised ViT's colour head, with no concept labels, through the binary: for every
    colour, the first candidate is a latent of that colour by patch-level F1 (at least 0.5, and
    above its F1 for any other colour; on this ViT among its colour's best three), and every colour
    has a verified latent. Where the first candidate is verified (on this ViT: blue and
    yellow; red's and green's F1 latents move the head less than a random direction does, so a
    later candidate passes instead), it has the largest suppression and amplification effects of
    its class's candidates, above both matched baselines, and its curve falls as it is turned down.
    Its page links each verified latent to its browser page."""
    world = shapes_world.trained_world(str(tmp_path_factory.getbasetemp().parent / "shapes_world"), "factorised")
    config = discover_config.get_config()
    config.backbone.name, config.sae.path, config.layer = world.vit, world.sae, shapes_world.LAYER
    config.head.logits, config.head.classes = (0, len(shapes.COLOURS)), shapes.COLOURS
    config.data = dict(kind="shapes", train_images=600, validation_images=300, seed=3,
                       image_size=shapes_world.IMAGE_SIZE)
    config.images, config.verify_images, config.batch_size = 600, 300, 100
    config.browser = dict(k=8, images=300, max_pages=0)
    result = discover.run(config, str(tmp_path))
    assert json.load(open(tmp_path / "discovery.json")) == json.loads(json.dumps(result))
    assert result["images"] == 600 and result["verify_images"] == 300
    first_verified = 0
    for cls in result["classes"]:
        colour, first = cls["name"], cls["candidates"][0]
        f1 = {c: float(world.f1[c][first["latent"]]) for c in shapes.COLOURS}
        assert f1[colour] >= 0.5 and f1[colour] == max(f1.values()), (colour, first["latent"], f1)
        assert cls["verified"], (colour, cls["candidates"])
        for c in cls["candidates"]:  # the rule, and every candidate has a browser page
            assert c["verified"] == all(c[k]["p_adjusted"] < 0.01 for k in ("suppress", "amplify"))
            assert (c["curve"] is not None) == c["verified"]
            assert (tmp_path / "browser" / "latents" / f"{c['latent']}.html").is_file()
        if not first["verified"]:
            continue
        first_verified += 1
        for kind in ("suppress", "amplify"):
            edit = first[kind]
            assert edit["effect"] == max(c[kind]["effect"] for c in cls["candidates"])
            assert edit["effect"] > max(edit["random_latent"]["effect"], edit["random_direction"]["effect"])
        curve = first["curve"]  # the class's margin on its own images falls as the latent is turned down
        assert curve["class_margin"][0] < curve["class_margin"][curve["scales"].index(1.0)]
        assert curve["other_margin"][-1] > curve["other_margin"][curve["scales"].index(0.0)]
    assert first_verified >= 2, [(c["name"], c["verified"]) for c in result["classes"]]
    _check_page_in_chromium(tmp_path, result)


def _check_page_in_chromium(directory, result):
    from playwright.sync_api import sync_playwright

    errors, verified = [], sum(len(c["verified"]) for c in result["classes"])
    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = chrome.new_page(viewport={"width": 1200, "height": 1600})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{directory}/index.html")
        assert page.locator("h2").count() == len(result["classes"])
        assert page.locator("table.candidates tr").count() == sum(len(c["candidates"]) + 1 for c in result["classes"])
        assert page.locator(".curve svg polyline").count() == 2 * verified
        page.screenshot(path=str(directory / "discovery.png"), full_page=True)
        link = page.locator("b.verified a").first
        latent = link.inner_text()
        link.click()
        page.wait_for_load_state()
        assert page.url.endswith(f"/browser/latents/{latent}.html") and page.inner_text("h1") == f"Latent {latent}"
        widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert widths and all(w > 0 for w in widths)
        chrome.close()
    assert errors == [] and (directory / "discovery.png").stat().st_size > 20_000


def test_the_small_binary_runs_end_to_end(tmp_path):
    """`:small` (a random model, a plumbing run): the JSON's numbers keep their invariants."""
    config = discover_config.get_config("small")
    result = discover.run(config, str(tmp_path))
    settings = result["settings"]
    assert result["written_by"] == saejax.written_by()
    assert f"Written by saejax {saejax.__version__}" in open(tmp_path / "browser" / "index.html").read()
    assert [c["name"] for c in result["classes"]] == [f"class_{i}" for i in range(4)]
    assert sum(c["images"] for c in result["classes"]) == result["images"] == 64 and result["verify_images"] == 48
    for cls in result["classes"]:
        assert len(cls["candidates"]) <= 2
        scores = [c["score"] for c in cls["candidates"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
        for c in cls["candidates"]:
            for kind in ("suppress", "amplify"):
                edit = c[kind]
                assert 1 / (settings["permutations"] + 1) <= edit["p"] <= edit["p_adjusted"] <= 1
                assert edit["p"] == max(edit["p_random_latent"], edit["p_random_direction"])
                assert len(edit["random_latent"]["latents"]) == 3 and c["latent"] not in edit["random_latent"]["latents"]
            assert c["verified"] == all(c[k]["p_adjusted"] < settings["alpha"] for k in ("suppress", "amplify"))
            assert (tmp_path / "browser" / "latents" / f"{c['latent']}.html").is_file()
    assert "<h2" in open(tmp_path / "index.html").read()
