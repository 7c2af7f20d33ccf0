"""Linear probes: a frozen model's features -> labels, trained with optax.

The paper reads interventions out through linear probes (CLIP CLS -> bird species, DINOv2
patch tokens -> ADE20K classes). `train_linear_probe` fits one with AdamW on full batches or
minibatches; `predict` applies it.

>>> probe = train_linear_probe(jax.random.key(0), feats_ND, labels_N, n_classes=151, epochs=20)
>>> pred_N = predict(probe, feats_ND)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class LinearProbe:
    """`logits = x @ w + b`. w: [D, K], b: [K]."""

    w: jax.Array
    b: jax.Array

    def logits(self, x_ND: jax.Array) -> jax.Array:
        return x_ND @ self.w + self.b


def predict(probe: LinearProbe, x_ND: jax.Array) -> jax.Array:
    """[N, D] -> [N] int32 class predictions."""
    return jnp.argmax(probe.logits(x_ND), axis=-1).astype(jnp.int32)


def train_linear_probe(key: jax.Array, x_ND: jax.Array, labels_N: jax.Array, n_classes: int, *, epochs: int = 20,
                       batch_size: int = 4096, learning_rate: float = 1e-2, weight_decay: float = 1e-4) -> LinearProbe:
    """Fit a softmax linear probe with AdamW (cross-entropy, shuffled minibatches).

    Args:
        key: `jax.random.key` for initialisation and shuffling.
        x_ND: features.
        labels_N: int labels in [0, n_classes).
        n_classes: K.
        epochs, batch_size, learning_rate, weight_decay: optimisation settings.
    """
    n, d = x_ND.shape
    return train_linear_probe_streamed(key, lambda epoch: [(x_ND, labels_N)], d, n_classes, epochs=epochs,
                                       batch_size=min(batch_size, n), learning_rate=learning_rate,
                                       weight_decay=weight_decay, buffer_rows=n)


def train_linear_probe_streamed(key: jax.Array, chunks: Callable[[int], Iterable[tuple[Any, Any]]], d_model: int,
                                n_classes: int, *, epochs: int = 20, batch_size: int = 4096, learning_rate: float = 1e-2,
                                weight_decay: float = 1e-4, buffer_rows: int = 2**18) -> LinearProbe:
    """`train_linear_probe` on features that do not fit in memory: `chunks(epoch)` yields
    `(x [n, D], labels [n])` pieces of the data (encoded on the fly, say), gathered into a
    buffer of `buffer_rows` rows that is shuffled and trained on in minibatches, so at most
    `buffer_rows` plus one piece are held. With a buffer that holds all the data this is
    exactly `train_linear_probe` (the same permutation per epoch); with a smaller one, rows mix
    within a buffer fill (the activation stream's trade). The last partial minibatch of an
    epoch is dropped; data smaller than one batch trains in one step on all of it.
    """
    if buffer_rows < batch_size:
        raise ValueError(f"buffer_rows={buffer_rows} must hold at least one batch (batch_size={batch_size})")
    init_key, key = jax.random.split(key)
    probe = LinearProbe(jax.random.normal(init_key, (d_model, n_classes)) * (1.0 / jnp.sqrt(d_model)),
                        jnp.zeros((n_classes,)))
    tx, fill = _probe_fill(float(learning_rate), float(weight_decay))

    carry = (probe, tx.init(probe))
    for e in range(epochs):
        epoch_key, xs, ys, held, n_fill = jax.random.fold_in(key, e), [], [], 0, 0

        def train_on(rows_x, rows_y, batch=batch_size):
            nonlocal carry, n_fill
            fill_key = epoch_key if n_fill == 0 else jax.random.fold_in(epoch_key, n_fill)
            carry = fill(carry, jnp.asarray(rows_x, jnp.float32), jnp.asarray(rows_y, jnp.int32), fill_key,
                         rows_y.shape[0] // batch, batch)
            n_fill += 1

        for x, y in chunks(e):
            xs.append(x.reshape(-1, d_model))
            ys.append(y.reshape(-1))
            held += ys[-1].shape[0]
            while held >= buffer_rows:
                rows_x, rows_y = _joined(xs), _joined(ys)
                train_on(rows_x[:buffer_rows], rows_y[:buffer_rows])
                xs, ys, held = [rows_x[buffer_rows:]], [rows_y[buffer_rows:]], held - buffer_rows
        if held >= batch_size or (held and n_fill == 0):  # all the data in less than a batch: one step on it
            train_on(_joined(xs), _joined(ys), min(batch_size, held))
    return carry[0]


@functools.lru_cache(maxsize=32)
def _probe_fill(learning_rate: float, weight_decay: float):
    """`(tx, fill)` for these settings, built once: probes trained alike (one per concept, say)
    share one compilation."""
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(p.logits(x), y))

    @functools.partial(jax.jit, static_argnums=(4, 5))
    def fill(carry, x_ND, labels_N, fill_key, steps, batch):
        def step(carry, idx):
            p, opt = carry
            grads = jax.grad(loss)(p, x_ND[idx], labels_N[idx])
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        order = jax.random.permutation(fill_key, x_ND.shape[0])[: steps * batch].reshape(steps, -1)
        return jax.lax.scan(step, carry, order)[0]

    return tx, fill


def _joined(pieces):
    """One array of the pieces (the piece itself when there is one: no copy of in-memory data)."""
    return pieces[0] if len(pieces) == 1 else np.concatenate([np.asarray(p) for p in pieces])


def select_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, n_classes: int, *,
                 learning_rates=(3e-4, 1e-3, 3e-3), weight_decays=(0.01, 0.1), epochs: int = 20,
                 batch_size: int = 512, seed: int = 0) -> tuple[LinearProbe, dict]:
    """A learning-rate x weight-decay sweep scored on a held-out 10% of train; the chosen probe
    retrained on all of train and scored on test (the paper's CUB probe).

    Returns:
        `(probe, report)`: report has the `sweep` (held-out accuracy per setting), the `chosen`
        setting, `test_accuracy`, `chance` and the image counts.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_x))
    held = order[: max(1, len(order) // 10)]
    fit = order[len(held):]

    def train(x, y, lr, wd):
        return train_linear_probe(jax.random.key(seed), jnp.asarray(x), jnp.asarray(y), n_classes, epochs=epochs,
                                  batch_size=batch_size, learning_rate=lr, weight_decay=wd)

    def accuracy(probe, x, y):
        return float(np.mean(np.asarray(predict(probe, jnp.asarray(x))) == y))

    sweep = [{"learning_rate": lr, "weight_decay": wd,
              "held_out_accuracy": accuracy(train(train_x[fit], train_y[fit], lr, wd), train_x[held], train_y[held])}
             for lr in learning_rates for wd in weight_decays]
    best = max(sweep, key=lambda r: r["held_out_accuracy"])
    probe = train(train_x, train_y, best["learning_rate"], best["weight_decay"])
    return probe, {"sweep": sweep, "chosen": best, "test_accuracy": accuracy(probe, test_x, test_y),
                   "chance": 1 / n_classes, "train_images": len(train_x), "test_images": len(test_x)}
