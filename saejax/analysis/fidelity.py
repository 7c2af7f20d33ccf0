"""Spliced-in fidelity: how much of a vision model's behaviour survives when an SAE's
reconstruction replaces its activations (the vision analogue of SAELens' CE-loss score).

The model runs three ways on the same images:

* clean;
* spliced: at `layer`, the SAE's reconstruction (error term dropped) replaces the tokens it was
  trained on, and the model finishes its forward pass from there;
* ablated: those tokens replaced by their mean activation (mean-ablated), or by zeros
  (zero-ablated).

A head turns each run's final tokens / pooled embedding / logits into class logits: the
checkpoint's classifier (`classifier_head`), a linear probe on the pooled embedding
(`linear_probe_head`), or CLIP zero-shot logits against text embeddings (`zero_shot_head`,
with `saejax.backbones.clip_text_embeddings` of a full CLIPModel checkpoint's prompts).
With `head=None` only the pooled embedding is compared.

Reported per sweep member (`spliced_fidelity`):

* `kl_spliced`, `kl_mean_ablated`, `kl_zero_ablated`: mean KL(clean || run) of the heads'
  class distributions;
* `accuracy_*` and `ce_*` for clean, spliced, mean- and zero-ablated runs, against the labels
  (or, without labels, against the clean model's predictions);
* `fidelity = (KL_ablated - KL_spliced) / (KL_ablated - KL_clean)` with KL_clean = 0 and the
  mean ablation: 1 when splicing changes nothing, 0 when it is as bad as erasing the tokens;
  `fidelity_ce`, the same with the cross-entropy (SAELens' CE-loss score);
  `fidelity_pooled`, the same with the squared distance of the pooled embedding to clean;
* `pooled_cosine`: mean cosine of the final pooled embedding, clean against spliced.

`fidelity_sums` is the pure, jittable core over one batch; `spliced_fidelity` streams it over
a `saejax.data.Source`. Both take a `Site` (`site.sae_params` may be a sweep's, stacked); the
splice and the ablations are residual edits (`interventions.splice`,
`interventions.replace_tokens`) that `Site.finish` continues from.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from saejax import backbones, data
from saejax import sharding as shd
from saejax.analysis import interventions
from saejax.analysis.site import Site, accepts_loose_arguments
from saejax.data import activations

# (final patch tokens [B, P, D], pooled [B, D], logits [B, C] or None) -> class logits [B, C]
Head = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
ABLATIONS = ("mean_ablated", "zero_ablated")


def classifier_head(tokens, pooled, logits):
    """The checkpoint's own classification head (ViT / DINOv2 `*ForImageClassification`)."""
    if logits is None:
        raise ValueError("classifier_head: this backbone has no classification head (logits is None); use "
                         "linear_probe_head, zero_shot_head or head=None")
    return logits


def linear_probe_head(w_DC: jax.Array, b_C: jax.Array) -> Head:
    """A linear probe on the pooled embedding: `pooled @ w + b`."""
    return lambda tokens, pooled, logits: pooled @ w_DC + b_C


def zero_shot_head(projection_DP: jax.Array, text_embeds_CP: jax.Array, logit_scale: float = 100.0) -> Head:
    """CLIP zero-shot logits: the cosine of the projected pooled embedding
    (`pooled @ saejax.backbones.clip_projection(params)`) with each class's text embedding, times
    `logit_scale` (CLIP's learned `exp(logit_scale)`, 100 for OpenAI's models)."""
    text = text_embeds_CP / jnp.linalg.norm(text_embeds_CP, axis=-1, keepdims=True)

    def head(tokens, pooled, logits):
        image = pooled @ projection_DP
        return logit_scale * (image / jnp.linalg.norm(image, axis=-1, keepdims=True)) @ text.T

    return head


def clip_zero_shot_head(bb, bb_params, prompts) -> Head:
    """`zero_shot_head` for a full CLIP checkpoint over text prompts (one per class, in the
    labels' order), tokenized with the checkpoint's own tokenizer."""
    if not prompts:
        raise ValueError("a zero-shot head needs text prompts, one per class")
    text = backbones.clip_text_embeddings(bb, bb_params, *backbones.clip_tokenize(bb, prompts))
    return zero_shot_head(backbones.clip_projection(bb_params), text, backbones.clip_logit_scale(bb_params))


def _stats(logits, clean_logp, targets, valid):
    """KL(clean || run), cross-entropy against `targets` and correct counts, summed over the
    valid images (`valid` [B]: 1, or 0 for padding)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    kl = jnp.sum(valid * jnp.sum(jnp.exp(clean_logp) * (clean_logp - logp), axis=-1))
    ce = -jnp.sum(valid * jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])
    correct = jnp.sum(valid * (jnp.argmax(logits, axis=-1) == targets))
    return {"kl": kl, "ce": ce, "correct": correct}


@accepts_loose_arguments
def fidelity_sums(site: Site, images: jax.Array, labels: jax.Array | None, *, token_index, head: Head | None,
                  ablation_mean: jax.Array, valid: jax.Array | None = None) -> dict[str, Any]:
    """Sums over one batch of images for `spliced_fidelity` (pure, jittable; `token_index` and
    `head` are static).

    Args:
        site: the backbone and the SAE at its block; `site.sae_params` is one SAE's params or a
            sweep's stacked along a leading member axis [M] (with one normalisation for all).
        images: float [B, S, S, 3] from `bb.preprocess`.
        labels: int [B], or None to score against the clean model's predictions.
        token_index: the token positions the SAE reads (`activations.token_indices`).
        ablation_mean: [D] raw activation that mean ablation writes.
        valid: [B] 1 for an image, 0 for padding (a last batch filled up to the mesh's size);
            all ones when None.

    Returns:
        `{"n": valid images, "clean": {...}, "spliced": {...} with [M] leaves, "mean_ablated": {...},
        "zero_ablated": {...}}`; each holds sums of `kl`, `ce`, `correct` (with a head) and
        `pooled_sq` (squared distance of the pooled embedding to clean), and "spliced" also
        `pooled_cos`.
    """
    stacked = site.sae_params.b_dec.ndim == 2
    params = site.sae_params if stacked else jax.tree.map(lambda a: a[None], site.sae_params)
    forward = site.bb.forward(site.bb_params, images, capture=(site.layer,))  # the clean run: no SAE
    clean = {"at_layer": forward.captured[site.layer], "tokens": forward.tokens[:, slice(*site.bb.layout.patches)],
             "pooled": forward.pooled, "logits": forward.logits}

    def run(edit):  # the splice and the ablations are residual edits, finished from the clean residual
        out = site.finish(edit, clean["at_layer"])
        return (None if head is None else head(out["tokens"], out["pooled"], out["logits"])), out["pooled"]

    clean_logits = None if head is None else head(clean["tokens"], clean["pooled"], clean["logits"])
    runs = {"clean": (clean_logits, clean["pooled"]),
            "spliced": jax.vmap(lambda p: run(interventions.splice(site.ae, p, site.norm, token_index)))(params),
            "mean_ablated": run(interventions.replace_tokens(ablation_mean, token_index)),
            "zero_ablated": run(interventions.replace_tokens(0.0, token_index))}
    valid = jnp.ones(images.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
    sums = {"n": jnp.sum(valid)}
    clean_logp = None
    if head is not None:
        clean_logp = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
        targets = jnp.argmax(clean_logits, axis=-1) if labels is None else labels
    for name, (logits, pooled) in runs.items():
        sq = lambda pl: jnp.sum(valid[:, None] * (pl - clean["pooled"]) ** 2)  # noqa: E731
        entry = {"pooled_sq": jax.vmap(sq)(pooled) if name == "spliced" else sq(pooled)}
        if head is not None:
            stats = (jax.vmap(lambda lg: _stats(lg, clean_logp, targets, valid))(logits) if name == "spliced"
                     else _stats(logits, clean_logp, targets, valid))
            entry.update(stats)
        if name == "spliced":
            unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-8)  # noqa: E731
            entry["pooled_cos"] = jnp.sum(valid[:, None] * unit(pooled) * unit(clean["pooled"])[None], axis=(-2, -1))
        sums[name] = entry
    return sums


def sharded_fidelity_sums(*args, token_index, head: Head | None, mesh: Mesh, **deprecated) -> Callable:
    """`fidelity_sums` jitted for `mesh`: `step(site, images, labels, ablation_mean, valid)`
    with the images, labels and `valid` split over `data` (each device runs the forward passes
    of its rows) and the site's parameters replicated; the sums come out reduced over every
    device (and process), replicated. (Until saejax 0.3 also the old
    `sharded_fidelity_sums(bb, ae, layer=, normalization=, ...)`, whose step takes
    `(bb_params, sae_params, images, labels, ablation_mean, valid)`.)"""
    replicated, images_sh, rows_sh = shd.replicated(mesh), shd.batch_sharding(mesh, 4), shd.batch_sharding(mesh, 1)
    token_index = tuple(int(i) for i in token_index)

    def sums(site, images, labels, ablation_mean, valid):
        return fidelity_sums(site, images, labels, token_index=token_index, head=head, ablation_mean=ablation_mean,
                             valid=valid)

    step = jax.jit(sums, in_shardings=(replicated, images_sh, rows_sh, replicated, rows_sh), out_shardings=replicated)
    if not args:
        return step
    bb, ae = args
    layer, norm = deprecated.pop("layer"), deprecated.pop("normalization", None)
    warnings.warn("sharded_fidelity_sums(bb, ae, layer=, normalization=, ...) is deprecated and goes in saejax 0.3; "
                  "call sharded_fidelity_sums(token_index=, head=, mesh=) and pass its step a Site",
                  DeprecationWarning, stacklevel=2)
    return lambda bp, sp, im, lb, mean, valid: step(Site(bb, bp, layer=layer, ae=ae, sae_params=sp, norm=norm), im, lb,
                                                    mean, valid)


@accepts_loose_arguments
def spliced_fidelity(site: Site, source: data.Source, *, tokens: str = "patches", head: Head | None = classifier_head,
                     ablation_mean: jax.Array | None = None, batch_size: int = 32, max_images: int | None = None,
                     mesh: Mesh | None = None) -> list[dict[str, Any]]:
    """Spliced-in fidelity of an SAE (or each member of a stacked sweep) over a source's images.

    Args:
        site: the backbone and the SAE at its block (`site.sae_params`: one SAE's, or a sweep's
            stacked along axis 0; `site.norm`: the SAE's input normalisation, or None).
        source: images (and labels, if it has them; otherwise the clean predictions are the
            targets).
        tokens: the token set it was trained on ("patches", "cls", "registers", "all").
        head: `classifier_head`, `linear_probe_head(...)`, `zero_shot_head(...)`, or None (pooled
            embedding only: no KL, accuracy or CE).
        ablation_mean: [D] the raw activation mean ablation writes; default the
            normalisation's mean, or without one the mean over the first batch's tokens.
        batch_size: images per jitted call, over all devices and processes (a multiple of
            the mesh's `data` axis and of the number of processes).
        max_images: stop after this many images (None: the whole source).
        mesh: the devices: images are split over its `data` axis, each process reads only
            its share of every batch, and the sums are reduced over all of them, so every
            process gets the same result as one device would (default: one device).

    Returns:
        One dict per member; see the module docstring for the keys.
    """
    bb, layer = site.bb, site.layer
    token_index = tuple(int(i) for i in activations.token_indices(bb.layout, tokens))
    if ablation_mean is None and site.norm is not None:
        ablation_mean = site.norm.mean
    mesh = mesh if mesh is not None else shd.make_mesh(1, 1, jax.local_devices()[:1])
    processes = jax.process_count() if len(mesh.devices.flat) > len(jax.local_devices()) else 1
    if batch_size % shd.data_size(mesh) or batch_size % processes:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's data axis "
                         f"({shd.data_size(mesh)} devices) and of the number of processes ({processes})")
    per_process, side = batch_size // processes, bb.image_size
    replicated, images_sh, rows_sh = shd.replicated(mesh), shd.batch_sharding(mesh, 4), shd.batch_sharding(mesh, 1)
    step = sharded_fidelity_sums(token_index=token_index, head=head, mesh=mesh)

    @functools.partial(jax.jit, in_shardings=(replicated, images_sh, rows_sh), out_shardings=replicated)
    def first_batch_mean(bp, im, valid):
        x = bb.forward(bp, im, capture=(layer,), full=False).captured[layer][:, jnp.asarray(token_index)]
        return jnp.sum(valid[:, None, None] * x, axis=(0, 1)) / (jnp.sum(valid) * x.shape[1])

    def global_rows(sharding, local):
        return jax.make_array_from_process_local_data(sharding, local) if processes > 1 else \
            jax.device_put(local, sharding)

    total, has_labels = None, None
    for batch in data.batches(source, per_process, shuffle=False, epochs=1, drop_remainder=False,
                              process_index=jax.process_index() if processes > 1 else 0, process_count=processes):
        n = len(batch.ids)  # the last batch is padded up to the mesh's size; padding has weight 0
        pixels = np.zeros((per_process, side, side, 3), np.float32)
        if n:
            pixels[:n] = bb.preprocess(batch.images)
        valid = global_rows(rows_sh, (np.arange(per_process) < n).astype(np.float32))
        images = global_rows(images_sh, pixels)
        has_labels = batch.labels is not None
        labels = None
        if has_labels:
            local = np.zeros(per_process, np.int32)
            local[:n] = batch.labels
            labels = global_rows(rows_sh, local)
        if ablation_mean is None:
            ablation_mean = first_batch_mean(site.bb_params, images, valid)
        sums = step(site, images, labels, ablation_mean, valid)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        if max_images is not None and float(total["n"]) >= max_images:
            break
    if total is None or float(total["n"]) == 0:
        raise ValueError("spliced_fidelity: the source holds no images")
    return _results(jax.device_get(total), head is not None, has_labels)


def _results(total, with_head: bool, has_labels: bool) -> list[dict[str, Any]]:
    n = float(total["n"])
    members = int(np.shape(total["spliced"]["pooled_sq"])[0])
    results = []
    for i in range(members):
        spliced = {k: float(v[i]) / n for k, v in total["spliced"].items()}
        ablated = {name: {k: float(v) / n for k, v in total[name].items()} for name in ABLATIONS}
        r = {"n_images": int(n), "pooled_cosine": spliced["pooled_cos"],
             "fidelity_pooled": _score(ablated["mean_ablated"]["pooled_sq"], spliced["pooled_sq"], 0.0)}
        if with_head:
            clean = {k: float(v) / n for k, v in total["clean"].items()}
            r["targets"] = "labels" if has_labels else "clean predictions"
            for metric, key in (("kl", "kl"), ("accuracy", "correct"), ("ce", "ce")):
                r[f"{metric}_clean"] = clean[key] if metric != "kl" else 0.0
                r[f"{metric}_spliced"] = spliced[key]
                for name in ABLATIONS:
                    r[f"{metric}_{name}"] = ablated[name][key]
            r["fidelity"] = _score(r["kl_mean_ablated"], r["kl_spliced"], 0.0)
            r["fidelity_zero_ablated"] = _score(r["kl_zero_ablated"], r["kl_spliced"], 0.0)
            r["fidelity_ce"] = _score(r["ce_mean_ablated"], r["ce_spliced"], r["ce_clean"])
        results.append(r)
    return results


def _score(ablated: float, spliced: float, clean: float) -> float:
    """`(ablated - spliced) / (ablated - clean)`; NaN when ablating changes nothing."""
    gap = ablated - clean
    return float((ablated - spliced) / gap) if gap != 0 else float("nan")
