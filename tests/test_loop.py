"""saejax.loop: fit is the hand-written loop (plus hooks, checkpoints and stops); evaluate equals
saejax.metrics on the same rows."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import loop, metrics, sae, train
from saejax.checkpoint import TrainCheckpointer
from saejax.core.losses import Objective
from saejax.core.normalization import Normalization


def setup(lr=(1e-3, 3e-3)):
    trainer = train.make_trainer(sae.topk(8, 32, k=3), objective=Objective(sparsity="none", auxk_coeff=1 / 32, k_aux=4),
                                 warmup_steps=2, dead_after_tokens=64, resample_every=3, resample_until=6)
    states = trainer.init_sweep(jax.random.key(0), train.Hparams.grid(list(lr)))
    xs = jax.random.normal(jax.random.key(1), (10, 32, 8))
    return trainer, states, xs


class Stream:
    def __init__(self, xs, start=0):
        self.xs, self.t = xs, start

    def __next__(self):
        self.t += 1
        return {3: self.xs[self.t - 1]}

    def position(self):
        return {"t": self.t}


def test_fit_equals_the_hand_written_loop_and_hooks_see_every_logged_step(tmp_path):
    trainer, states, xs = setup()
    want = states
    for t, x in enumerate(xs):
        want, _ = trainer.sweep_step(want, x)
        if trainer.resample_due(t + 1):
            want, _ = trainer.sweep_resample(want, x)
    seen, evaluated, stepped = [], [], []
    ckpt = TrainCheckpointer(tmp_path)
    got = loop.fit(trainer, {3: states}, Stream(xs), steps=10, log_every=4, checkpointer=ckpt, checkpoint_every=5,
                   hooks=[lambda step, m: seen.append((step, sorted(m[3]), m[3]["loss"].shape))],
                   step_hooks=[stepped.append],
                   state_hooks=[(5, lambda step, s: evaluated.append((step, int(s[3].step[0]))))])
    for a, b in zip(jax.tree.leaves(got[3].params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [s for s, _, _ in seen] == [4, 8, 10] and all(shape == (2,) for _, _, shape in seen)
    assert {"loss", "l0", "nmse", "dead_fraction"} <= set(seen[0][1])
    assert evaluated == [(5, 5), (10, 10)]
    assert stepped == list(range(1, 11))  # every step, as a host int (the watchdog's progress)
    assert ckpt.all_steps() == [5, 10] and ckpt.restore({"3": states}).extra == {"stream": {"t": 10}}
    ckpt.close()


def test_fit_resumes_from_its_checkpoint_to_the_same_parameters(tmp_path):
    trainer, states, xs = setup()
    copy = lambda: {3: jax.tree.map(jnp.copy, states)}  # noqa: E731  (fit donates the states it is given)
    straight = loop.fit(trainer, copy(), Stream(xs), steps=10)
    ckpt = TrainCheckpointer(tmp_path)
    loop.fit(trainer, copy(), Stream(xs), steps=6, checkpointer=ckpt)
    run = ckpt.restore({"3": states})
    resumed = loop.fit(trainer, {3: run.state["3"]}, Stream(xs, run.extra["stream"]["t"]), steps=10,
                       start_step=run.step)
    for a, b in zip(jax.tree.leaves(resumed[3]), jax.tree.leaves(straight[3])):
        if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(a, b)
    ckpt.close()


def test_a_non_finite_loss_stops_fit_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, states, xs = setup(lr=(1e30,))
    trainer = train.make_trainer(trainer.ae, objective=trainer.objective, warmup_steps=0)
    ckpt = TrainCheckpointer(tmp_path)
    with pytest.raises(loop.NonFiniteLossError, match=r"layer 3, sweep member\(s\) \[0\]"):
        loop.fit(trainer, {3: states}, Stream(xs), steps=10, checkpointer=ckpt, checkpoint_every=1)
    ckpt.wait_until_finished()
    good = ckpt.restore({"3": states})
    assert good.step < 10 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(good.state["3"].params))
    ckpt.close()


def test_evaluate_equals_saejax_metrics_on_the_same_rows():
    trainer, states, xs = setup()
    states, _ = trainer.sweep_step(states, xs[0])
    norm = Normalization(jnp.full((8,), 0.5), jnp.asarray(2.0))
    raw = [xs[i] * 3.0 + 1.0 for i in range(1, 4)]
    results = loop.evaluate(trainer.ae, states, iter(raw), normalization=norm)
    x = norm.apply(jnp.concatenate(raw))
    for i, r in enumerate(results):
        params = train.member(states, i).params
        z = trainer.ae.encode(params, x)
        x_hat = trainer.ae.decode(params, z)
        np.testing.assert_allclose(r["nmse"], metrics.normalized_mse(x, x_hat), rtol=1e-5)
        np.testing.assert_allclose(r["explained_variance"], metrics.explained_variance(x, x_hat), rtol=1e-5)
        np.testing.assert_allclose(r["mse"], metrics.mse(x, x_hat), rtol=1e-5)
        np.testing.assert_allclose(r["l0"], metrics.l0(z), rtol=1e-6)
        stats = metrics.FiringStats.zeros(32).update(z)
        np.testing.assert_allclose(r["frequency"], stats.frequency(), rtol=1e-6)
        np.testing.assert_allclose(r["cosine"], metrics.cosine_similarity(x, x_hat), rtol=1e-5)
        np.testing.assert_allclose(r["l2_ratio"], metrics.l2_ratio(x, x_hat), rtol=1e-5)
        np.testing.assert_allclose(r["relative_reconstruction_bias"], metrics.relative_reconstruction_bias(x, x_hat),
                                   rtol=1e-5)
        np.testing.assert_allclose(r["encoder_decoder_cosine"], metrics.encoder_decoder_cosine(params.w_enc, params.w_dec),
                                   rtol=1e-5, atol=1e-6)
        counts, dead = metrics.log10_frequency_histogram(stats.frequency())
        assert r["log10_frequency_histogram"]["counts"] == np.asarray(counts).tolist()
        assert r["log10_frequency_histogram"]["dead"] == int(dead) == round(32 * r["dead_fraction"])
        assert r["tokens"] == 96 and r["learning_rate"] == pytest.approx([1e-3, 3e-3][i])
    with pytest.raises(ValueError, match="held no rows"):
        loop.evaluate(trainer.ae, states, iter([]))


def test_an_error_mid_run_saves_the_steps_done_then_propagates(tmp_path):
    from saejax.data import UnreadableImageError

    class Breaks(Stream):
        def __next__(self):
            if self.t == 7:
                raise UnreadableImageError("/data/bad.jpg: cannot identify image file")
            return super().__next__()

    trainer, states, xs = setup()
    copy = lambda: {3: jax.tree.map(jnp.copy, states)}  # noqa: E731
    want = loop.fit(trainer, copy(), Stream(xs), steps=7)
    ckpt = TrainCheckpointer(tmp_path)
    with pytest.raises(UnreadableImageError, match="bad.jpg") as raised:
        loop.fit(trainer, copy(), Breaks(xs), steps=10, checkpointer=ckpt, checkpoint_every=5)
    assert "saved a checkpoint of step 7" in "".join(raised.value.__notes__)
    run = ckpt.restore({"3": states})
    assert (ckpt.all_steps(), run.extra) == ([5, 7], {"stream": {"t": 7}})
    for a, b in zip(jax.tree.leaves(run.state["3"].params), jax.tree.leaves(want[3].params)):
        np.testing.assert_array_equal(a, b)

    def failing_hook(step, metrics):  # e.g. a full disk under the metrics log
        if step == 3:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        loop.fit(trainer, copy(), Stream(xs), steps=10, checkpointer=TrainCheckpointer(tmp_path / "b"),
                 hooks=[failing_hook])
    assert TrainCheckpointer(tmp_path / "b").all_steps() == [4]  # step 3's metrics are read after step 4
    ckpt.close()


def test_freeze_mode_keeps_a_diverging_member_and_trains_the_others(tmp_path):
    trainer, _, xs = setup()
    trainer = train.make_trainer(trainer.ae, objective=trainer.objective, warmup_steps=0, dead_after_tokens=64,
                                 resample_every=3, resample_until=6)
    states = trainer.init_sweep(jax.random.key(0), train.Hparams.grid([1e30, 3e-3]))
    healthy = trainer.init_sweep(jax.random.key(0), train.Hparams.grid([3e-3, 3e-3]))  # same member inits
    seen = []
    ckpt = TrainCheckpointer(tmp_path)
    got = loop.fit(trainer, {3: states}, Stream(xs), steps=10, on_nonfinite="freeze", checkpointer=ckpt,
                   checkpoint_every=5, hooks=[lambda step, m: seen.append((step, m[3]["frozen"].tolist()))])
    # Member 0 blew up at some step and kept its last finite state; member 1 trained as if alone.
    first = next(step for step, frozen in seen if frozen[0])
    assert all(frozen == [1.0, 0.0] for step, frozen in seen if step >= first) and first <= 5
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got[3].params))
    assert int(got[3].step[0]) == first - 1 and int(got[3].step[1]) == 10
    alone = loop.fit(trainer, {3: healthy}, Stream(xs), steps=10)
    for a, b in zip(jax.tree.leaves(got[3].params), jax.tree.leaves(alone[3].params)):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-7)
    assert ckpt.restore({"3": states}).extra["frozen"] == {"3": [0]}
    ckpt.close()
    with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'freeze'"):
        loop.fit(trainer, {3: states}, Stream(xs), steps=1, on_nonfinite="skip")


def test_metrics_log_writes_each_step_once_across_restarts(tmp_path):
    """A run killed at step 7 (after a checkpoint at 4, or before any: start 0) is rerun from its
    checkpoint: metrics.jsonl and TensorBoard (a SessionLog START purge) show each step once."""
    from kill_soak import tensorboard_steps
    from saejax.run.logs import MetricsLog, read_metrics

    def log_steps(start_step, steps):
        log = MetricsLog(tmp_path, start_step=start_step)
        for step in steps:
            log(step, {1: {"loss": np.asarray([1.0 / step])}})
        log.close()

    for checkpoint in (0, 4):
        log_steps(None if checkpoint == 0 else 0, range(1, 8))  # the first run, killed after step 7
        log_steps(checkpoint, range(checkpoint + 1, 11))  # resumed from its checkpoint
        assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))
        assert tensorboard_steps(str(tmp_path)) == {"layer_1/member_0/loss": list(range(1, 11))}
        for name in os.listdir(tmp_path):
            shutil.rmtree(tmp_path / name) if os.path.isdir(tmp_path / name) else os.remove(tmp_path / name)


def test_the_old_module_level_progress_still_reaches_the_watchdog_and_says_so():
    from saejax.run import peers

    with peers.PeerWatchdog(timeout_s=3) as watchdog:
        with pytest.warns(DeprecationWarning, match=r"peers.progress is deprecated: pass the watchdog's own progress"):
            peers.progress(7)
        assert watchdog._step == 7  # pylint: disable=protected-access
    assert peers._ENTERED == []  # pylint: disable=protected-access
