"""Spliced-in fidelity on tiny models: an exact SAE scores 1 with KL 0, a zero SAE scores the
zero ablation, an SAE that writes the mean scores the mean ablation, and the numbers match a
hand computation with `bb.forward(edits=...)`."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import backbones, data, fidelity, interventions, sae
from saejax.analysis.site import Site
from saejax.core.normalization import Normalization
from saejax.core.sae import SAEParams

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "backbones")
LAYER = 1


@pytest.fixture(scope="module")
def setting():
    bb, params = backbones.load(os.path.join(FIXTURES, "vit"), cache_dir=False)  # a 7-class ViT classifier
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    source = data.ArraySource(images, labels=rng.integers(0, 7, 10))
    d = bb.d_model
    ae = sae.relu(d, 2 * d)
    eye = jnp.eye(d)
    exact = SAEParams(w_enc=jnp.concatenate([eye, -eye], 1), b_enc=jnp.zeros(2 * d),
                      w_dec=jnp.concatenate([eye, -eye], 0), b_dec=jnp.zeros(d))  # relu(x) - relu(-x) = x
    zero = jax.tree.map(jnp.zeros_like, exact)
    mean = jnp.linspace(-0.5, 0.5, d)
    writes_mean = zero.replace(b_dec=mean)  # decodes every input to `mean`
    sweep = jax.tree.map(lambda *a: jnp.stack(a), exact, zero, writes_mean)
    return bb, params, source, ae, sweep, mean


def test_exact_zero_and_mean_saes_score_1_and_the_ablations(setting):
    bb, params, source, ae, sweep, mean = setting
    sweep_site = Site(bb, params, layer=LAYER, ae=ae, sae_params=sweep)  # a Site over a stacked sweep
    results = fidelity.spliced_fidelity(sweep_site, source, ablation_mean=mean, batch_size=4)
    exact, zero, writes_mean = results
    assert exact["n_images"] == 10 and exact["targets"] == "labels"
    assert exact["kl_spliced"] == pytest.approx(0.0, abs=1e-7)
    assert exact["fidelity"] == pytest.approx(1.0, abs=3e-6) and exact["fidelity_ce"] == pytest.approx(1.0, abs=1e-5)
    assert exact["pooled_cosine"] == pytest.approx(1.0, abs=3e-6) and exact["fidelity_pooled"] == pytest.approx(1.0)
    assert exact["accuracy_spliced"] == exact["accuracy_clean"]
    # the zero SAE's reconstruction is the zero ablation; the mean-writing one is the mean ablation
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero_ablated"], rel=1e-5)
    assert zero["accuracy_spliced"] == zero["accuracy_zero_ablated"]
    assert zero["fidelity_zero_ablated"] == pytest.approx(0.0, abs=1e-5)
    assert writes_mean["kl_spliced"] == pytest.approx(writes_mean["kl_mean_ablated"], rel=1e-5)
    assert writes_mean["fidelity"] == pytest.approx(0.0, abs=1e-5)
    assert writes_mean["fidelity_pooled"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_zero_ablated"] > 1e-3  # the ablation really changes the model's output


def test_matches_a_hand_computation_with_forward_edits(setting):
    bb, params, source, ae, sweep, mean = setting
    images = jnp.asarray(bb.preprocess(np.stack([source[i].image for i in range(len(source))])))
    labels = np.asarray([source[i].label for i in range(len(source))])
    start, stop = bb.layout.patches

    def edited(fn):
        return bb.forward(params, images, edits={LAYER: lambda r: r.at[:, start:stop].set(fn(r[:, start:stop]))})

    clean = bb.forward(params, images)
    zero_out = edited(jnp.zeros_like)
    p, q = jax.nn.log_softmax(clean.logits), jax.nn.log_softmax(zero_out.logits)
    kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
    ce = float(-jnp.mean(q[jnp.arange(10), labels]))
    accuracy = float(np.mean(np.argmax(zero_out.logits, -1) == labels))
    zero_site = Site(bb, params, layer=LAYER, ae=ae, sae_params=jax.tree.map(lambda a: a[1], sweep))
    (r,) = fidelity.spliced_fidelity(zero_site, source, ablation_mean=mean, batch_size=3)  # one SAE; uneven batches
    assert r["kl_zero_ablated"] == pytest.approx(kl, rel=1e-4)  # a KL of ~5e-3 from float32 log-softmaxes of batches of 3 and of 10
    assert r["ce_zero_ablated"] == pytest.approx(ce, rel=1e-5)
    assert r["accuracy_zero_ablated"] == pytest.approx(accuracy)
    assert r["accuracy_clean"] == pytest.approx(float(np.mean(np.argmax(clean.logits, -1) == labels)))
    cos = jnp.sum(zero_out.pooled * clean.pooled, -1) / (jnp.linalg.norm(zero_out.pooled, axis=-1)
                                                         * jnp.linalg.norm(clean.pooled, axis=-1))
    assert r["pooled_cosine"] == pytest.approx(float(jnp.mean(cos)), rel=1e-5)


def test_normalization_probe_head_and_no_head(setting):
    bb, params, source, ae, sweep, mean = setting
    norm = Normalization(mean=mean, scalar=jnp.asarray(3.0))
    exact = jax.tree.map(lambda a: a[0], sweep)  # exact in any normalised space too
    probe = fidelity.linear_probe_head(jax.random.normal(jax.random.key(0), (bb.d_model, 4)), jnp.zeros(4))
    unlabelled = data.ArraySource(np.stack([source[i].image for i in range(len(source))]))
    (r,) = fidelity.spliced_fidelity(Site(bb, params, layer=LAYER, ae=ae, sae_params=exact, norm=norm), unlabelled,
                                     head=probe)
    assert r["targets"] == "clean predictions" and r["accuracy_clean"] == 1.0
    assert r["kl_spliced"] == pytest.approx(0.0, abs=1e-7) and r["fidelity"] == pytest.approx(1.0, abs=1e-6)
    (r,) = fidelity.spliced_fidelity(Site(bb, params, layer=LAYER, ae=ae, sae_params=exact), source, head=None,
                                     max_images=4, batch_size=4)
    assert r["n_images"] == 4 and "kl_spliced" not in r and r["pooled_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_errors_name_the_problem(setting):
    bb, params, source, ae, sweep, _ = setting
    with pytest.raises(ValueError, match="block index 3 out of range"):
        Site(bb, params, layer=3, ae=ae, sae_params=sweep)
    clip, clip_params = backbones.load(os.path.join(FIXTURES, "clip_vision"), cache_dir=False)
    clip_site = Site(clip, clip_params, layer=1, ae=sae.relu(32, 64), sae_params=sae.relu(32, 64).init(jax.random.key(0)))
    with pytest.raises(ValueError, match="this backbone has no classification head"):
        fidelity.spliced_fidelity(clip_site, data.ArraySource(np.zeros((2, 32, 32, 3), np.uint8)))


def test_the_splice_and_the_ablations_are_residual_edits(setting):
    """`interventions.splice` and `replace_tokens` change only the tokens named, as the hand
    computation does, and the old loose-argument spelling still gives the same numbers (with a
    DeprecationWarning)."""
    bb, params, source, ae, sweep, mean = setting
    resid = jax.random.normal(jax.random.key(0), (2, bb.layout.n_tokens, bb.d_model))
    patches = range(*bb.layout.patches)
    exact = jax.tree.map(lambda a: a[0], sweep)
    np.testing.assert_allclose(interventions.splice(ae, exact, tokens=patches)(resid), resid, atol=1e-6)
    writes_mean = interventions.splice(ae, jax.tree.map(lambda a: a[2], sweep), tokens=patches)(resid)
    ablated = interventions.replace_tokens(mean, patches)(resid)
    np.testing.assert_allclose(writes_mean, ablated, atol=1e-6)
    np.testing.assert_array_equal(ablated[:, 0], resid[:, 0])  # CLS untouched
    np.testing.assert_array_equal(ablated[:, 1:], jnp.broadcast_to(mean, ablated[:, 1:].shape))
    np.testing.assert_array_equal(interventions.replace_tokens(0.0)(resid), jnp.zeros_like(resid))
    want = fidelity.spliced_fidelity(Site(bb, params, layer=LAYER, ae=ae, sae_params=sweep), source,
                                     ablation_mean=mean, batch_size=4)
    with pytest.warns(DeprecationWarning, match="pass a Site"):
        old = fidelity.spliced_fidelity(bb, params, ae, sweep, source, layer=LAYER, ablation_mean=mean, batch_size=4)
    assert old == want


def _clip_with_tokenizer(directory):
    """The clip_full fixture plus a tiny CLIP tokenizer (ids below its 64-token vocabulary, end
    of text the highest), with `eos_token_id` 2 as in OpenAI's configs (pool at the highest id)."""
    import json
    import shutil

    shutil.copytree(os.path.join(FIXTURES, "clip_full"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    # A whole BPE vocabulary (every merge's parts and result), as `transformers` 5's tokenizer
    # (the `tokenizers` library) requires; 4's Python tokenizer reads it too.
    vocab = {"<|startoftext|>": 0, "<|unk|>": 1, "a</w>": 5, "photo</w>": 9, "of</w>": 12, "cat</w>": 20,
             "dog</w>": 21, "<|endoftext|>": 63}
    pieces = ["a", "c", "d", "f", "g", "h", "o", "p", "t", "f</w>", "g</w>", "o</w>", "t</w>", "ph", "pho", "phot",
              "ca", "do"]
    vocab.update({piece: 30 + i for i, piece in enumerate(pieces)})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\np h\nph o\npho t\nphot o</w>\no f</w>\nc a\nca t</w>\n"
                                          "d o\ndo g</w>\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"unk_token": "<|unk|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return directory


def test_zero_shot_head_from_prompts(tmp_path):
    from saejax.cli.builders import fidelity_head

    bb, params = backbones.load(_clip_with_tokenizer(tmp_path / "clip"), cache_dir=False)
    ids, mask = backbones.clip_tokenize(bb, ["a photo of a cat", "a dog"])
    np.testing.assert_array_equal(ids, [[0, 5, 9, 12, 5, 20, 63], [0, 5, 21, 63, 63, 63, 63]])
    np.testing.assert_array_equal(mask, [[1] * 7, [1] * 4 + [0] * 3])
    head = fidelity_head(bb, params, "zero_shot", ["a photo of a cat", "a dog"])
    text = backbones.clip_text_embeddings(bb, params, ids, mask)
    images = np.load(os.path.join(FIXTURES, "clip_full.npz"))["pixel_values"]
    out = bb.forward(params, images)
    expected = fidelity.zero_shot_head(backbones.clip_projection(params), text,
                                       backbones.clip_logit_scale(params))(out.tokens, out.pooled, out.logits)
    np.testing.assert_allclose(head(out.tokens, out.pooled, out.logits), expected, rtol=1e-6)
    ae = sae.relu(bb.d_model, 2 * bb.d_model)
    (r,) = fidelity.spliced_fidelity(Site(bb, params, layer=1, ae=ae, sae_params=ae.init(jax.random.key(0))),
                                     data.ArraySource(np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3),
                                                                                        dtype=np.uint8)), head=head)
    assert r["targets"] == "clean predictions" and r["kl_spliced"] >= 0 and np.isfinite(r["fidelity"])
    with pytest.raises(ValueError, match="needs fidelity.prompts"):
        fidelity_head(bb, params, "zero_shot")
    plain, plain_params = backbones.load(os.path.join(FIXTURES, "clip_full"), cache_dir=False)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer \\(vocab.json and merges.txt\\) in"):
        backbones.clip_tokenize(plain, ["a cat"])
