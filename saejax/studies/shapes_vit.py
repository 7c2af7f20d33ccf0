"""Training a small ViT image classifier from scratch with optax, saved as an HF checkpoint.

This makes the backbone of the shapes world (`saejax.datasets.shapes`): `train_shapes_vit`
generates the world, trains a ViT classifier (the `vit` family's own modules) on the task (the shape and
colour of the largest object) and writes an ordinary HF checkpoint directory that
`saejax.backbones.load` reads like any other. The pieces (`make_train_step`, `vit_accuracy`,
`train_classifier`) work for any `saejax.data` source of uint8 images with integer labels.

Images are preprocessed on the host by the same `saejax.backbones.preprocess.ImageProcessing`
that the saved checkpoint's `preprocessor_config.json` describes (and so `Backbone.preprocess`),
so the training-time logits equal `bb.forward(params, bb.preprocess(images)).logits`. What the
model is asked for is `task_heads(targets)`: "factorised" (colour and shape of the largest
object as two heads; per patch, one head per factor of `shapes.FACTORS`) or "conjunction"
(the 16 colour-shape classes; per patch, `shapes.patch_labels`).

>>> result = train_shapes_vit("/tmp/shapes", image_size=64)   # ~3.5 min on 2 CPU cores; reused if present
>>> result.path, result.val_accuracy
('/tmp/shapes/vit', 0.9445)
>>> bb, params = saejax.backbones.load(result.path)

Long because it is one training program (model, task heads, loop, evaluation) for the demo's ViT.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax import data
from saejax.backbones.create import create_vit_classifier, save_hf_checkpoint
from saejax.backbones.preprocess import BILINEAR, HALF, ImageProcessing
from saejax.checkpoint.staging import staged_directory
from saejax.datasets import shapes
from saejax.provenance import check_written_by, written_by

__all__ = [
    "IMAGE_HEADS",
    "SHAPES_VIT",
    "TARGETS",
    "ClassifierState",
    "TrainedClassifier",
    "TrainedVit",
    "vit_accuracy",
    "heads_argmax",
    "heads_loss",
    "vit_optimizer",
    "make_schedule",
    "make_train_step",
    "predict",
    "vit_processing",
    "train_classifier",
    "task_heads",
    "train_shapes_vit",
]

# The shapes world's ViT: 40 px images, 8 px patches (a 5 x 5 grid + CLS = 26 tokens).
SHAPES_VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=40,
                  patch_size=8)

_FORMAT = "saejax-shapes-vit-v3"  # v3: saejax's own ViT module and initialisation, PyTorch-named safetensors
_INFO = "training.json"


class ClassifierState(NamedTuple):
    """Training state (a pytree).

    Attributes:
        params: the classifier params (the `vit` family's tree, `{"embed", "blocks", "readout"}`).
        patch_head: the auxiliary per-patch head `{"kernel": [D, K], "bias": [K]}` (training
            only, not saved), or None.
        opt_state: the optax state of `(params, patch_head)`.
        step: int32 scalar, steps taken.
    """

    params: Any
    patch_head: Any
    opt_state: Any
    step: jax.Array


class TrainedClassifier(NamedTuple):
    """What `train_classifier` returns.

    Attributes:
        apply_fn: `apply_fn(params, pixels) -> logits` (pixels normalised, NHWC float).
        params: the trained params.
        val_accuracy: accuracy on the validation source (float).
        history: one dict per logged step: step, loss, accuracy (of the training batch), lr.
    """

    apply_fn: Callable
    params: Any
    val_accuracy: float
    history: list


class TrainedVit(NamedTuple):
    """What `train_shapes_vit` returns.

    Attributes:
        path: the HF checkpoint directory (`saejax.backbones.load(path)`).
        val_accuracy: validation accuracy on the task, measured after training.
        seconds: training wall time in seconds (of the run that made the checkpoint).
        reused: True when an existing checkpoint with the same settings was returned.
        info: the contents of `<path>/training.json` (settings, accuracy, history).
    """

    path: str
    val_accuracy: float
    seconds: float
    reused: bool
    info: dict


def vit_processing(image_size: int, mean=HALF, std=HALF) -> ImageProcessing:
    """The preprocessing that `save_hf_checkpoint` writes for a ViT of `image_size` px: bilinear
    resize to `image_size` x `image_size`, rescale by 1/255, normalise with `mean` and `std`."""
    return ImageProcessing(resize_to=(int(image_size), int(image_size)), resample=BILINEAR, mean=tuple(mean),
                           std=tuple(std))


def make_schedule(*, learning_rate: float, steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to 1% of it at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup_steps), max(steps, warmup_steps + 1),
                                              end_value=learning_rate * 0.01)


def vit_optimizer(*, learning_rate: float, steps: int, warmup_steps: int, weight_decay: float,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW on `make_schedule`; weight decay on kernels and embeddings (arrays of rank >= 2)
    only; global-norm gradient clipping."""
    schedule = make_schedule(learning_rate=learning_rate, steps=steps, warmup_steps=warmup_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay, mask=decay_mask))


def heads_argmax(logits: jax.Array, heads: Sequence[int] | None) -> jax.Array:
    """Per-head argmax of logits split into consecutive softmax heads of `heads` classes:
    int [..., len(heads)] (or [...] for one softmax over all logits when `heads` is None)."""
    if heads is None:
        return jnp.argmax(logits, -1)
    starts = np.cumsum((0,) + tuple(heads))
    return jnp.stack([jnp.argmax(logits[..., a:b], -1) for a, b in zip(starts[:-1], starts[1:])], -1)


def heads_loss(logits: jax.Array, targets: jax.Array, heads: Sequence[int] | None) -> tuple[jax.Array, jax.Array]:
    """`(loss, accuracy)` of softmax heads: the sum over heads of the mean cross-entropy, and the
    share of rows where every head is right. `targets` int [..., len(heads)] ([...] when
    `heads` is None: one softmax over all logits)."""
    if heads is None:
        heads, targets = (logits.shape[-1],), targets[..., None]
    starts = np.cumsum((0,) + tuple(heads))
    loss, correct = 0.0, True
    for g, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        loss = loss + optax.softmax_cross_entropy_with_integer_labels(logits[..., a:b], targets[..., g]).mean()
        correct = correct & (jnp.argmax(logits[..., a:b], -1) == targets[..., g])
    return loss, jnp.mean(correct)


def make_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *, patch_weight: float = 0.0,
                    image_heads: Sequence[int] | None = None, patch_heads: Sequence[int] | None = None):
    """A pure train step: `step(state, pixels, labels, patch_targets) -> (state, metrics)`.

    The loss is the cross-entropy of the image label, plus, when `patch_weight > 0`,
    `patch_weight` times the cross-entropy of an auxiliary linear head on the final patch
    tokens predicting each patch's label(s) (e.g. `shapes.patch_labels` of the masks). The
    auxiliary head is dense supervision: it makes a tiny ViT learn shapes several times faster
    and gives its patch tokens the per-patch semantics that patch-level probes and SAEs look
    for. It is not part of the saved model.

    Either output may be several softmax heads (`heads_loss`): `image_heads=(4, 4)` splits the
    classifier's 8 logits into two 4-way heads with labels int [B, 2]; likewise `patch_heads`
    for the patch head's outputs with targets int [B, n_patches, len(patch_heads)]. None: one
    softmax over all outputs, labels [B] and targets [B, n_patches].

    Args:
        apply_fn: `apply_fn(params, pixels, return_tokens=False) -> logits` (or
            `(logits, tokens [B, 1 + n_patches, D])` with `return_tokens=True`, CLS first).
        optimizer: an optax transformation over `(params, patch_head)`.
        patch_weight: weight of the auxiliary loss; 0 disables it (then `patch_targets` may be
            None).
        image_heads: class counts of the image heads, or None.
        patch_heads: class counts of the patch heads, or None.

    Returns:
        `step(state: ClassifierState, pixels: float32 [B, H, W, 3] (preprocessed), labels,
        patch_targets (row-major patches) or None)` returning the new state and `{"loss",
        "accuracy", "patch_loss", "patch_accuracy"}` (device scalars; an accuracy counts a row
        right when all its heads are). Jit it (donate the state).
    """
    use_patches = patch_weight > 0

    def step(state: ClassifierState, pixels, labels, patch_targets=None):
        def loss_fn(trainable):
            params, head = trainable
            logits, tokens = apply_fn(params, pixels, return_tokens=True)
            loss, accuracy = heads_loss(logits, labels, image_heads)
            metrics = {"accuracy": accuracy}
            if use_patches:
                patch_logits = tokens[:, 1:] @ head["kernel"] + head["bias"]
                patch_loss, patch_accuracy = heads_loss(patch_logits, patch_targets, patch_heads)
                metrics.update(patch_loss=patch_loss, patch_accuracy=patch_accuracy, image_loss=loss)
                loss = loss + patch_weight * patch_loss
            return loss, metrics

        trainable = (state.params, state.patch_head)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params, head = optax.apply_updates(trainable, updates)
        return ClassifierState(params, head, opt_state, state.step + 1), {"loss": loss, **metrics}

    return step


def predict(apply_fn: Callable, params, source: data.Source, *, processing: ImageProcessing,
            batch_size: int = 500, image_heads: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax predictions for every example of `source` (preprocessed by `processing`), in
    index order.

    Returns:
        `(predictions int64 [N] (or [N, len(image_heads)], see `heads_argmax`), the source's
        labels [N] or None when it has none)`.
    """
    fn = jax.jit(lambda p, pixels: heads_argmax(apply_fn(p, pixels), image_heads))
    preds, labels = [], []
    for batch in data.batches(source, batch_size, shuffle=False, drop_remainder=False, epochs=1):
        m = batch.images.shape[0]
        images = batch.images
        if m < batch_size:  # pad the last batch to the compiled shape
            images = np.concatenate([images, np.zeros((batch_size - m,) + images.shape[1:], images.dtype)])
        preds.append(np.asarray(fn(params, processing(images)))[:m])
        if batch.labels is not None:
            labels.append(batch.labels)
    return np.concatenate(preds).astype(np.int64), (np.concatenate(labels) if labels else None)


def vit_accuracy(apply_fn: Callable, params, source: data.Source, *, processing: ImageProcessing,
             batch_size: int = 500, image_heads: Sequence[int] | None = None,
             image_targets: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """Classification accuracy of `apply_fn` on a labelled source (float in [0, 1]); with
    several heads, the share of examples where all are right (`image_targets` maps the source's
    labels to the heads' targets)."""
    if not source.has_labels:
        raise ValueError(f"{source!r} has no labels to evaluate against")
    preds, labels = predict(apply_fn, params, source, processing=processing, batch_size=batch_size,
                            image_heads=image_heads)
    targets = labels if image_targets is None else image_targets(labels)
    return float(np.mean(np.all((preds == targets).reshape(len(preds), -1), axis=1)))


def train_classifier(train_source: data.Source, val_source: data.Source, *, vit: Mapping, key: jax.Array,
                     steps: int, batch_size: int, learning_rate: float, warmup_steps: int, weight_decay: float,
                     patch_weight: float = 0.0, patch_heads: Sequence[int] = (),
                     patch_targets: Callable[[data.Batch], np.ndarray] | None = None,
                     image_heads: Sequence[int] | None = None,
                     image_targets: Callable[[np.ndarray], np.ndarray] | None = None,
                     init_range: float | None = 1.0, seed: int = 0, log_every: int = 50,
                     callback: Callable[[dict], None] | None = None,
                     processing: ImageProcessing | None = None) -> TrainedClassifier:
    """Trains an HF Flax ViT classifier from scratch on a labelled image source.

    Args:
        train_source: labelled uint8 images of the model's size (e.g. `shapes.source("train", ...)`);
            with masks when `patch_weight > 0`.
        val_source: labelled images for the final accuracy.
        vit: `ViTConfig` fields (`num_labels` is set from `train_source.classes`, or to
            `sum(image_heads)`, if absent).
        key: `jax.random.key` for the initialisation.
        steps: optimizer steps.
        batch_size: images per step.
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay (kernels and embeddings only).
        patch_weight: weight of the auxiliary per-patch loss (see `make_train_step`); 0: none.
        patch_heads: class counts of the per-patch softmax heads (needed when
            `patch_weight > 0`), e.g. `(17,)` for one head over `shapes.PIXEL_CLASSES`.
        patch_targets: `batch -> int [B, gh, gw, len(patch_heads)]` patch targets (needed when
            `patch_weight > 0`); e.g. `shapes.patch_labels(batch.masks, 8)[..., None]`.
        image_heads: class counts of the image softmax heads (None: one over all logits).
        image_targets: the source's labels [B] -> the heads' targets int [B, len(image_heads)]
            (None: the labels themselves).
        init_range: `initializer_range` of the random initialisation (see
            `saejax.backbones.create.create_vit_classifier`; None: the config's, 0.02 by default).
        seed: data order seed (`saejax.data.batches`).
        log_every: steps between history entries (and `callback` calls).
        callback: called with each history entry (a dict of floats: step, loss, accuracy of the
            training batch, lr, and the patch metrics), one log interval behind the device so
            the host does not stall it.
        processing: the checkpoint's preprocessing (default: `vit_processing` of the ViT's
            `image_size`, mean = std = 0.5, what `save_hf_checkpoint` writes).

    Returns:
        A `TrainedClassifier`.
    """
    vit = dict(vit)
    if image_heads is not None:
        vit.setdefault("num_labels", int(sum(image_heads)))
    vit = _with_labels(vit, train_source)
    if patch_weight > 0 and (not patch_heads or patch_targets is None):
        raise ValueError("patch_weight > 0 needs patch_heads (class counts) and patch_targets")
    processing = vit_processing(int(vit.get("image_size", 224))) if processing is None else processing
    model_key, head_key = jax.random.split(key)
    apply_fn, params = create_vit_classifier(vit, model_key, init_range=init_range)
    head = None
    if patch_weight > 0:
        d, n_out = int(vit.get("hidden_size", 768)), int(sum(patch_heads))
        head = {"kernel": jax.random.normal(head_key, (d, n_out), jnp.float32) * d ** -0.5,
                "bias": jnp.zeros((n_out,), jnp.float32)}
    optimizer = vit_optimizer(learning_rate=learning_rate, steps=steps, warmup_steps=warmup_steps,
                               weight_decay=weight_decay)
    schedule = make_schedule(learning_rate=learning_rate, steps=steps, warmup_steps=warmup_steps)
    state = ClassifierState(params, head, optimizer.init((params, head)), jnp.zeros((), jnp.int32))
    step_fn = jax.jit(make_train_step(apply_fn, optimizer, patch_weight=patch_weight, image_heads=image_heads,
                                      patch_heads=tuple(patch_heads)), donate_argnums=0)
    history, pending = [], None

    def flush(entry_step, metrics):
        entry = {"step": entry_step, **{k: float(v) for k, v in jax.device_get(metrics).items()},
                 "lr": float(schedule(entry_step - 1))}
        history.append(entry)
        if callback is not None:
            callback(entry)

    it = data.batches(train_source, batch_size, seed=seed)
    for i in range(steps):
        batch = next(it)
        targets = None
        if patch_weight > 0:
            targets = np.asarray(patch_targets(batch))
            targets = targets.reshape(len(batch.images), -1, targets.shape[-1])
        labels = batch.labels if image_targets is None else image_targets(batch.labels)
        state, metrics = step_fn(state, processing(batch.images), labels, targets)
        if pending is not None:
            flush(*pending)
            pending = None
        if (i + 1) % log_every == 0 or i + 1 == steps:
            pending = (i + 1, metrics)
    if pending is not None:
        flush(*pending)
    params = state.params
    accuracy = vit_accuracy(apply_fn, params, val_source, processing=processing, image_heads=image_heads,
                        image_targets=image_targets)
    return TrainedClassifier(apply_fn, params, accuracy, history)


TARGETS = ("factorised", "conjunction")
# The factorised ViT's image heads: the colour and the shape of the largest object, in this order.
IMAGE_HEADS = {"colour": shapes.COLOURS, "shape": shapes.SHAPES}


def task_heads(targets: str) -> dict:
    """How the shapes ViT is asked to represent the world (`targets`):

    - "factorised": two image heads (the colour and the shape of the largest object, 4 classes
      each, `IMAGE_HEADS`) and four per-patch heads, one per factor (`shapes.FACTORS`: colour,
      shape, size, texture; 5, 5, 3 and 5 classes);
    - "conjunction": one image head over the 16 colour-shape classes (`shapes.CLASSES`) and one
      per-patch head over the 17 pixel classes (`shapes.PIXEL_CLASSES`), so the model is asked
      for conjunctions and never for colour or shape alone.

    Returns:
        `train_classifier` keyword arguments: `image_heads`, `image_targets`, `patch_heads`
        and `patch_targets(batch, world, patch_size)` (bind the world and the patch size).
    """
    if targets == "factorised":
        def patch_targets(batch, world, patch_size):
            labels = shapes.factor_patch_labels(world, patch_size, batch.ids)
            return np.stack([labels[family] for family in shapes.FACTORS], -1)

        return dict(image_heads=tuple(len(v) for v in IMAGE_HEADS.values()),
                    image_targets=lambda labels: np.stack([labels % len(shapes.COLOURS),
                                                           labels // len(shapes.COLOURS)], -1),
                    patch_heads=tuple(len(v) for v in shapes.FACTORS.values()), patch_targets=patch_targets)
    if targets == "conjunction":
        return dict(image_heads=None, image_targets=None, patch_heads=(len(shapes.PIXEL_CLASSES),),
                    patch_targets=lambda batch, world, patch_size: shapes.patch_labels(batch.masks, patch_size)[..., None])
    raise ValueError(f"unknown targets {targets!r}; expected one of {TARGETS}")


def train_shapes_vit(workdir: str | os.PathLike, *, seed: int = 0, targets: str = "factorised", n_train: int = 30_000, n_val: int = 2_000,
                     image_size: int = 40, vit: Mapping | None = None, steps: int = 1_000, batch_size: int = 128,
                     learning_rate: float = 2e-3, warmup_steps: int = 100, weight_decay: float = 0.05,
                     patch_weight: float = 0.5, init_range: float | None = 1.0, reuse: bool = True,
                     callback: Callable[[dict], None] | None = None) -> TrainedVit:
    """Trains the shapes world's ViT (or reuses it) and saves it as an HF checkpoint.

    The model is `SHAPES_VIT` (hidden 64, 4 blocks, 4 heads, MLP 128, 40 px images, 8 px
    patches) trained from scratch on `shapes.source("train", n_train, seed=seed)` to classify
    the shape and colour of the largest object, with AdamW, plus (`patch_weight > 0`) an
    auxiliary linear head on the final patch tokens, which is dropped when saving. `targets`
    says how both are asked (`task_heads`): "factorised" (colour and shape as separate image
    heads; per patch, one head per factor: colour, shape, size, texture) or "conjunction" (the
    16 colour-shape classes; per patch, the majority pixel class). Defaults reach about 0.97
    validation accuracy (both heads right) in 1.5 to 2 minutes on 2 CPU cores.

    A factorised checkpoint's classifier has 8 logits: `heads_argmax(logits, (4, 4))` gives
    (colour, shape) of the largest object (`IMAGE_HEADS`; `id2label` says the same).

    The checkpoint goes to `<workdir>/vit` ("factorised") or `<workdir>/vit_conjunction` with a `training.json` recording the settings, the
    validation accuracy and the training history. When that file exists and its settings equal
    this call's, the checkpoint is reused without training; otherwise it is (re)trained and
    replaced. The directory is written to a temporary folder first and moved into place, so an
    interrupted run leaves no half-written checkpoint.

    Args:
        workdir: the working directory.
        seed: seeds the world (train split `shapes.source("train", n_train, seed=seed)`,
            validation split likewise), the initialisation and the data order.
        targets: "factorised" or "conjunction" (see `task_heads`).
        n_train: training images.
        n_val: validation images.
        image_size: image side in px (the ViT's `image_size`).
        vit: `ViTConfig` fields; default `SHAPES_VIT` (`id2label` = `shapes.CLASSES` is added).
        steps: optimizer steps.
        batch_size: images per step.
        learning_rate: peak AdamW learning rate.
        warmup_steps: warmup steps.
        weight_decay: AdamW weight decay.
        patch_weight: weight of the auxiliary per-patch loss (0: plain classification).
        init_range: `initializer_range` of the random initialisation (see `train_classifier`).
        reuse: reuse a matching checkpoint if present.
        callback: progress callback, see `train_classifier`.

    Returns:
        A `TrainedVit` (path, val_accuracy, seconds, reused, info).
    """
    heads = task_heads(targets)
    vit = dict(SHAPES_VIT if vit is None else vit)
    vit["image_size"] = image_size
    names = shapes.CLASSES if targets == "conjunction" else tuple(
        f"{head}={name}" for head, names in IMAGE_HEADS.items() for name in names)
    vit.setdefault("id2label", {str(i): name for i, name in enumerate(names)})
    vit.setdefault("label2id", {name: i for i, name in enumerate(names)})
    settings = dict(format=_FORMAT, seed=seed, targets=targets, n_train=n_train, n_val=n_val, image_size=image_size, vit=vit,
                    steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
                    weight_decay=weight_decay, patch_weight=patch_weight, init_range=init_range)
    settings = json.loads(json.dumps(settings))  # canonical (string keys) for the comparison
    path = os.path.join(os.fspath(workdir), "vit" if targets == "factorised" else f"vit_{targets}")
    info_file = os.path.join(path, _INFO)
    if reuse and os.path.isfile(info_file):
        with open(info_file) as f:
            info = json.load(f)
        check_written_by(info.get("written_by"), info_file)
        if info.get("settings") == settings:
            return TrainedVit(path, float(info["val_accuracy"]), float(info["seconds"]), True, info)

    start = time.time()
    train = shapes.source("train", n_train, seed=seed, image_size=image_size)
    val = shapes.source("validation", n_val, seed=seed, image_size=image_size)
    result = train_classifier(train, val, vit=vit, key=jax.random.key(seed), steps=steps, batch_size=batch_size,
                              learning_rate=learning_rate, warmup_steps=warmup_steps, weight_decay=weight_decay,
                              patch_weight=patch_weight, patch_heads=heads["patch_heads"],
                              patch_targets=functools.partial(heads["patch_targets"], world=train.world,
                                                              patch_size=int(vit["patch_size"])),
                              image_heads=heads["image_heads"], image_targets=heads["image_targets"],
                              init_range=init_range, seed=seed, callback=callback)
    seconds = time.time() - start
    info = dict(settings=settings, val_accuracy=result.val_accuracy, seconds=seconds, history=result.history,
                written_by=written_by(),
                classes=list(names), image_heads=None if targets == "conjunction" else
                {head: list(names) for head, names in IMAGE_HEADS.items()})
    with staged_directory(path) as staging:
        save_hf_checkpoint(staging, vit, result.params)
        with open(os.path.join(staging, _INFO), "w") as f:
            json.dump(info, f, indent=2)
    return TrainedVit(path, result.val_accuracy, seconds, False, info)


def _with_labels(vit: Mapping, source: data.Source) -> dict:
    vit = dict(vit)
    if "num_labels" not in vit and "id2label" not in vit:
        if source.classes is None:
            raise ValueError("give vit['num_labels'] (the source has no class names)")
        vit["num_labels"] = len(source.classes)
    return vit
