"""SAE training: an explicit `TrainState` pytree and a pure step, for one SAE or a `vmap` sweep.

>>> ae = saejax.sae.relu(d_model=768, d_sae=24_576)
>>> trainer = make_trainer(ae, objective=Objective(sparsity="l1"), warmup_steps=500)
>>> state = trainer.init(jax.random.key(0), Hparams.of(learning_rate=1e-3, sparsity_coeff=4e-4))
>>> step = jax.jit(trainer.step, donate_argnums=0)
>>> state, metrics = step(state, x_ND)          # metrics: dict of device scalars

Any optax transformation can stand in for the recipe's Adam and schedule (the unit-norm decoder
transforms still wrap it, see `Trainer.tx`):

>>> trainer = make_trainer(ae, tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))

A sweep stacks members on a leading axis and trains them on the same batch:

>>> states = trainer.init_sweep(jax.random.key(0), Hparams.grid(learning_rate=[3e-4, 1e-3],
...                                                               sparsity_coeff=[4e-4, 8e-4]))
>>> states, metrics = jax.jit(trainer.sweep_step)(states, x_ND)   # metrics: [M] each
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from saejax import sharding as shd
from saejax.core.losses import Objective
from saejax.core.optim import learning_rate_schedule, make_optimizer, with_unit_norm_decoder
from saejax.core.resample import resample_dead
from saejax.core.sae import SAE, SAEParams

# Counters saturate here instead of overflowing int32 (about 10^9 tokens).
_COUNTER_LIMIT = 2**30


@flax.struct.dataclass
class Hparams:
    """Per-member hyperparameters, stored as array leaves so a sweep can `vmap` over them.

    Attributes:
        learning_rate: peak learning rate.
        sparsity_coeff: lambda of the sparsity penalty (after warmup).
        k: TopK family: latents kept per input (<= the SAE's static k). Ignored otherwise.
    """

    learning_rate: jax.Array
    sparsity_coeff: jax.Array
    k: jax.Array

    @classmethod
    def of(cls, learning_rate: float, sparsity_coeff: float = 0.0, k: int = 0) -> Hparams:
        return cls(jnp.asarray(learning_rate, jnp.float32), jnp.asarray(sparsity_coeff, jnp.float32),
                   jnp.asarray(k, jnp.int32))

    @classmethod
    def stack(cls, members: Sequence[Hparams]) -> Hparams:
        """Stack members on a leading sweep axis."""
        return jax.tree.map(lambda *xs: jnp.stack(xs), *members)

    @classmethod
    def grid(cls, learning_rate: Sequence[float], sparsity_coeff: Sequence[float] = (0.0,),
             k: Sequence[int] = (0,)) -> Hparams:
        """The Cartesian product of the given values, stacked (learning rate varies slowest)."""
        return cls.stack([cls.of(lr, c, kk) for lr, c, kk in itertools.product(learning_rate, sparsity_coeff, k)])


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue bit for bit.

    Attributes:
        step: int32 scalar, steps taken.
        params: `SAEParams`.
        opt_state: optax state of `Trainer.optimizer(hparams.learning_rate)`.
        hparams: `Hparams`.
        tokens_since_fired: [F] int32, inputs seen since each latent last fired (saturating).
        key: `jax.random.key` for resampling.
    """

    step: jax.Array
    params: SAEParams
    opt_state: Any
    hparams: Hparams
    tokens_since_fired: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Static training configuration and the pure functions built from it.

    Attributes:
        ae: the SAE architecture.
        objective: the loss.
        warmup_steps, decay_steps, final_fraction, b1, b2, eps: see `saejax.optim.make_optimizer`.
        unit_norm_decoder: keep decoder rows at unit norm (paper recipe).
        dead_after_tokens: a latent is dead once it has not fired for this many inputs.
        resample_every: resample dead latents after every this many steps (0: never); the
            training loop asks `resample_due(step)` and calls `resample` / `sweep_resample`.
        resample_until: no resampling after this step (None: no limit), so the last
            resampled latents have time to settle.
        resample_encoder_scale: resampled encoder directions get this times the mean norm of
            the live encoder directions (Anthropic: 0.2).
        tx: your own optax transformation in place of the recipe's Adam and learning-rate
            schedule (then `warmup_steps` ... `eps` are unused): clipping, weight decay, a
            schedule of your own. Either a transformation, which carries its own learning rate
            (`Hparams.learning_rate` is then only recorded, and a sweep may not vary it), or a
            function `learning_rate -> transformation`, called with each member's
            `Hparams.learning_rate` (a traced scalar in a sweep). With `unit_norm_decoder` it is
            wrapped by `saejax.optim.with_unit_norm_decoder`. None: the recipe (`make_optimizer`).
    """

    ae: SAE
    objective: Objective = Objective()
    warmup_steps: int = 500
    decay_steps: int | None = None
    final_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    unit_norm_decoder: bool = True
    dead_after_tokens: int = 10_000_000
    resample_every: int = 0
    resample_until: int | None = None
    resample_encoder_scale: float = 0.2
    tx: optax.GradientTransformation | Callable[[jax.Array], optax.GradientTransformation] | None = None

    def __post_init__(self):
        self.objective.check(self.ae)
        if self.tx is not None and not (isinstance(self.tx, optax.GradientTransformation) or callable(self.tx)):
            raise TypeError(f"Trainer(tx=...) takes an optax.GradientTransformation or a function "
                            f"learning_rate -> GradientTransformation, not {type(self.tx).__name__}")

    def schedule(self, learning_rate) -> optax.Schedule:
        """Step -> learning rate for a member whose peak rate is `learning_rate`."""
        return learning_rate_schedule(learning_rate, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                                      final_fraction=self.final_fraction)

    def optimizer(self, learning_rate) -> optax.GradientTransformation:
        """The optax transformation for one member (its learning rate may be traced)."""
        if self.tx is not None:
            tx = self.tx if isinstance(self.tx, optax.GradientTransformation) else self.tx(learning_rate)
            return with_unit_norm_decoder(tx) if self.unit_norm_decoder else tx
        return make_optimizer(learning_rate, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                              final_fraction=self.final_fraction, b1=self.b1, b2=self.b2, eps=self.eps,
                              unit_norm_decoder=self.unit_norm_decoder)

    def init(self, key: jax.Array, hparams: Hparams, *, b_dec: jax.Array | None = None) -> TrainState:
        """A fresh state. `b_dec` (e.g. `saejax.sae.data_mean(sample)`) seeds the decoder bias."""
        init_key, state_key = jax.random.split(key)
        params = self.ae.init(init_key, decoder_norm=1.0 if self.unit_norm_decoder else None, b_dec=b_dec)
        if self.ae.k is not None and hparams.k.ndim == 0:
            hparams = hparams.replace(k=jnp.where(hparams.k > 0, jnp.minimum(hparams.k, self.ae.k), self.ae.k))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer(hparams.learning_rate).init(params),
            hparams=hparams,
            tokens_since_fired=jnp.zeros((self.ae.d_sae,), jnp.int32),
            key=state_key,
        )

    def init_sweep(self, key: jax.Array, hparams: Hparams, *, b_dec: jax.Array | None = None) -> TrainState:
        """Stacked states, one per leading entry of `hparams`; member i is seeded with
        `jax.random.split(key, M)[i]`, so it equals `init(split(key, M)[i], hparams[i])`."""
        members = hparams.learning_rate.shape[0]
        if isinstance(self.tx, optax.GradientTransformation) and _distinct(hparams.learning_rate) > 1:
            raise ValueError("this sweep varies learning_rate, but Trainer(tx=...) was given one optax "
                             "transformation, which has its own rate; pass tx as a function "
                             "learning_rate -> transformation to give each member its rate")
        keys = jax.random.split(key, members)
        return jax.vmap(lambda k, h: self.init(k, h, b_dec=b_dec))(keys, hparams)

    def dead_latents(self, state: TrainState) -> jax.Array:
        """[F] bool: latents that have not fired for `dead_after_tokens` inputs."""
        return state.tokens_since_fired >= self.dead_after_tokens

    def step(self, state: TrainState, x_ND: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimisation step on a batch `x_ND` of (normalised) activations.

        Returns the new state and a dict of scalar device-array metrics: loss, mse, nmse,
        reconstruction, sparsity, penalty, auxk, l0, dead_fraction, sparsity_coeff, and
        learning_rate (the recipe's schedule; not with a `tx` of your own).
        """
        hp = state.hparams
        coeff = self.objective.sparsity_schedule(hp.sparsity_coeff, state.step)
        k = hp.k if self.ae.k is not None else None
        dead_F = self.dead_latents(state)

        def loss_fn(params):
            return self.objective(self.ae, params, x_ND, sparsity_coeff=coeff, k=k, dead_F=dead_F)

        (_, (enc, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        tx = self.optimizer(hp.learning_rate)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = self.ae.after_update(params, enc, state.step)

        fired_F = enc.firing_counts() > 0
        since = jnp.minimum(state.tokens_since_fired, _COUNTER_LIMIT) + x_ND.shape[0]
        tokens_since_fired = jnp.where(fired_F, 0, since)

        variance = jnp.mean((x_ND - jnp.mean(x_ND, axis=0)) ** 2)
        metrics = dict(terms._asdict())
        metrics.update(
            nmse=terms.mse / variance,
            dead_fraction=jnp.mean(tokens_since_fired >= self.dead_after_tokens),
            sparsity_coeff=coeff,
        )
        if self.tx is None:  # a transformation of the user's own has no schedule to read
            metrics["learning_rate"] = self.schedule(hp.learning_rate)(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  tokens_since_fired=tokens_since_fired)
        return new_state, metrics

    def resample_due(self, steps_done: int) -> bool:
        """Host-side schedule: whether to resample once `steps_done` steps are finished."""
        return (self.resample_every > 0 and steps_done % self.resample_every == 0
                and (self.resample_until is None or steps_done <= self.resample_until))

    def resample(self, state: TrainState, x_ND: jax.Array) -> tuple[TrainState, jax.Array]:
        """`saejax.resample.resample_dead` of the state's dead latents, with a key derived from
        the state's key and step; their dead counters restart.

        Returns `(state, number of latents resampled)`.
        """
        dead_F = self.dead_latents(state)
        params, opt_state, n = resample_dead(
            self.ae, self.optimizer(state.hparams.learning_rate), state.params, state.opt_state, dead_F, x_ND,
            jax.random.fold_in(state.key, state.step), encoder_scale=self.resample_encoder_scale)
        tokens_since_fired = jnp.where(dead_F, 0, state.tokens_since_fired)
        return state.replace(params=params, opt_state=opt_state, tokens_since_fired=tokens_since_fired), n

    def sweep_resample(self, states: TrainState, x_ND: jax.Array) -> tuple[TrainState, jax.Array]:
        """`resample` for every member of a stacked sweep."""
        return jax.vmap(self.resample, in_axes=(0, None))(states, x_ND)

    def sweep_step(self, states: TrainState, x_ND: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """`step` for every member of a stacked sweep, all on the same batch."""
        return jax.vmap(self.step, in_axes=(0, None))(states, x_ND)

    # --------------------------------------------------------------------------- sharding

    def logical_axes(self, state: TrainState) -> TrainState:
        """The logical axis names (`saejax.sharding.Logical`) of every leaf of `state`, a single
        state or a stacked sweep (leading `member` axis); `jax.eval_shape` output works."""
        lead = ("member",) if state.step.ndim == 1 else ()

        def axes(*names):
            return shd.Logical(*lead, *names)

        params = SAEParams(w_enc=axes("embed", "latent"), b_enc=axes("latent"), w_dec=axes("latent", "embed"),
                           b_dec=axes("embed"), **{name: axes("latent") for name in self.ae.arch.extra_params})
        opt_state = optax.tree_map_params(
            self.optimizer(1.0), lambda _, names: names, state.opt_state, params,
            transform_non_params=lambda leaf: axes(*([None] * (leaf.ndim - len(lead)))),
            is_leaf=lambda x: isinstance(x, shd.Logical))
        return TrainState(step=axes(), params=params, opt_state=opt_state,
                          hparams=Hparams(axes(), axes(), axes()), tokens_since_fired=axes("latent"), key=axes())

    def shardings(self, state: TrainState, mesh: Mesh) -> TrainState:
        """NamedShardings of every leaf of `state` on `mesh`, by `saejax.sharding.RULES`: sweep
        members over `model` when their number divides it, else a single SAE's latents
        (encoder columns, decoder rows) over `model`; replicated over `data`."""
        return shd.tree_shardings(mesh, state, self.logical_axes(state))

    def init_sweep_sharded(self, key: jax.Array, hparams: Hparams, mesh: Mesh, *,
                           b_dec: jax.Array | None = None) -> TrainState:
        """`init_sweep`, with every array born in its place on `mesh` (`shardings`): the state
        is never materialised on one device first."""
        init = lambda: self.init_sweep(key, hparams, b_dec=b_dec)  # noqa: E731
        return jax.jit(init, out_shardings=self.shardings(jax.eval_shape(init), mesh))()

    def jit_sweep(self, states: TrainState, mesh: Mesh, *, freeze_nonfinite: bool = False) -> tuple[Callable, Callable]:
        """Deprecated (until saejax 0.3): `saejax.core.sweep_step.jit_sweep_step(trainer, states, mesh, ...)`."""
        warnings.warn("Trainer.jit_sweep is deprecated: use saejax.core.sweep_step.jit_sweep_step(trainer, states, "
                      "mesh, freeze_nonfinite=...); jit_sweep goes away in saejax 0.3", DeprecationWarning, stacklevel=2)
        from saejax.core.sweep_step import jit_sweep_step  # noqa: PLC0415 - sweep_step builds on this module

        return jit_sweep_step(self, states, mesh, freeze_nonfinite=freeze_nonfinite)


def _distinct(values: jax.Array) -> int:
    """How many different values a concrete array holds (1 for a traced one: not knowable)."""
    try:
        return len(set(np.asarray(values).ravel().tolist()))
    except jax.errors.TracerArrayConversionError:
        return 1


def make_trainer(ae: SAE, **kwargs) -> Trainer:
    """`Trainer(ae, **kwargs)`; see `Trainer` for the options."""
    return Trainer(ae, **kwargs)


def member(states: TrainState, i: int) -> TrainState:
    """Member `i` of a stacked sweep."""
    return jax.tree.map(lambda x: x[i], states)
