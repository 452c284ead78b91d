"""Tests of vaekit.budget: the epoch's time that --time-budget divides by, estimated from
seconds of steps and one end of epoch, on a model whose training steps are slowed by a
known sleep (the estimate is compared with epochs of a real run, not with a constant)."""

import os
import signal
import time

import pytest

import vaekit.models
import vaekit.train
import vaekit.wiring
from test_cli import steps_per_epoch, tiny_config
from vaekit.budget import epochs_for_budget

SLEEP = 0.01  # seconds added to each training step


def _slow_vae(calls: list, on_call=None):
    """A VAE whose training-mode ``decode`` sleeps ``SLEEP`` and counts its calls."""

    class VAE(vaekit.models.VAE):  # same name: save_model records the class name
        def decode(self, z):
            if self.training:
                calls.append(1)
                time.sleep(SLEEP)
                if on_call is not None:
                    on_call(len(calls))
            return super().decode(z)

    return VAE


def test_the_estimate_is_an_epoch_of_the_real_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vaekit.wiring, "VAE", _slow_vae(calls))
    config = tiny_config(train__epochs=3)
    epochs, per_epoch = epochs_for_budget(config, 100.0)
    assert epochs == max(1, int(100.0 / per_epoch))
    assert config.train.epochs == 3  # the caller's config is left alone
    spe = steps_per_epoch(config)
    assert 5 < spe < 15 and len(calls) == 2 * spe  # a small epoch: one to warm up, one timed whole
    history = vaekit.train.fit(config, tmp_path / "run").history
    rows = [r for r in history if r["split"] == "train"]
    real = (rows[-1]["seconds"] - rows[0]["seconds"]) / (len(rows) - 1)  # epochs 2 and 3, each with an end
    assert real > spe * SLEEP
    assert 0.6 < per_epoch / real < 1.6, (per_epoch, real)


def test_the_calibration_costs_steps_not_epochs(monkeypatch):
    """An epoch of 162 steps (batch 8): a 0.1 s calibration times a few dozen of them."""
    calls = []
    monkeypatch.setattr(vaekit.wiring, "VAE", _slow_vae(calls))
    config = tiny_config(train__batch_size=8)
    spe = steps_per_epoch(config)
    _, per_epoch = epochs_for_budget(config, 100.0, calibration_seconds=0.1)
    assert len(calls) <= 5 + 31 < spe / 4  # warm-up, then chunks of 1, 2, 4, ... steps until 0.1 s
    assert per_epoch > spe * SLEEP


@pytest.mark.parametrize("fast", ["off", "static"])
def test_a_small_epoch_warms_up_on_whole_epochs_then_is_timed_whole(fast, monkeypatch):
    """Batch 512: 3 steps an epoch, the last partial (eager). The warm-up's 5 steps take 3
    epochs of 2 full batches (the static step captures after 3 on CUDA: that must not be
    timed), then an epoch is timed whole, its eager step included."""
    calls = []
    monkeypatch.setattr(vaekit.wiring, "VAE", _slow_vae(calls))
    config = tiny_config(train__batch_size=512, train__fast=fast)
    spe = steps_per_epoch(config)
    assert spe == 3
    _, per_epoch = epochs_for_budget(config, 100.0)
    assert len(calls) == 4 * spe and per_epoch > spe * SLEEP


@pytest.mark.parametrize("batch_size", [64, 8])  # a small epoch timed whole; a long one timed in part
def test_checkpoints_within_an_epoch_are_counted(batch_size, monkeypatch):
    """train.checkpoint_every: the trial times one checkpoint (here slowed by a known sleep)
    and counts the (n - 1) / checkpoint_every of them in an epoch of n steps."""
    import vaekit.budget

    monkeypatch.setattr(vaekit.wiring, "VAE", _slow_vae([]))
    real, calls = vaekit.budget._checkpoint, []

    def slow_checkpoint(run):
        calls.append(run.step)
        time.sleep(0.2)
        real(run)

    monkeypatch.setattr(vaekit.budget, "_checkpoint", slow_checkpoint)
    plain = tiny_config(train__batch_size=batch_size)
    every = tiny_config(train__batch_size=batch_size, train__checkpoint_every=3)
    spe = steps_per_epoch(plain)
    _, without = epochs_for_budget(plain, 100.0, calibration_seconds=0.2)
    assert calls == []
    _, with_checkpoints = epochs_for_budget(every, 100.0, calibration_seconds=0.2)
    assert len(calls) == 1
    expected = (spe - 1) / 3 * 0.2
    assert 0.75 < (with_checkpoints - without) / expected < 1.35, (with_checkpoints, without, expected)


def test_a_config_of_max_steps_alone_is_calibrated(monkeypatch):
    """epochs 0 with max_steps is a valid config: its trial times whole epochs as any
    other config's does (not 30 steps, not 0), and the caller's config is left alone."""
    calls = []
    monkeypatch.setattr(vaekit.wiring, "VAE", _slow_vae(calls))
    config = tiny_config(train__epochs=0, train__max_steps=30)
    epochs, per_epoch = epochs_for_budget(config, 100.0)
    spe = steps_per_epoch(config)
    assert len(calls) == 2 * spe != 30  # one epoch to warm up, one timed whole
    assert per_epoch > spe * SLEEP and epochs == int(100.0 / per_epoch)
    assert (config.train.epochs, config.train.max_steps) == (0, 30)


@pytest.mark.parametrize("at", [2, 7, 30], ids=["early", "later", "in-the-timed-steps"])
def test_an_interrupted_calibration_stops_the_budget_and_hints_no_resume(at, monkeypatch, capsys):
    """Ctrl-C in the calibration: no number of epochs from a partial timing, no resume hint
    for its temporary directory."""
    def interrupt(n):
        if n == at:
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler only sets a flag

    monkeypatch.setattr(vaekit.wiring, "VAE", _slow_vae([], interrupt))
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt, match="the time-budget calibration run was stopped; nothing was kept"):
        epochs_for_budget(tiny_config(train__batch_size=8), 100.0, calibration_seconds=5.0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("kwargs, env, match", [
    (dict(seconds=0), {}, "seconds must be a finite number > 0, got 0"),
    (dict(seconds=float("inf")), {}, "seconds must be a finite number > 0, got inf"),
    (dict(seconds=10, calibration_seconds=0), {}, "calibration_seconds must be a finite number > 0, got 0"),
    (dict(seconds=10), {"WORLD_SIZE": "2"}, "not supported under torchrun"),
])
def test_epochs_for_budget_refuses(kwargs, env, match, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        epochs_for_budget(tiny_config(), **kwargs)


def test_still_importable_from_train():
    assert vaekit.train.epochs_for_budget is epochs_for_budget


def test_the_budget_names_a_config_it_cannot_use():
    with pytest.raises(TypeError, match=r"config must be a vaekit RunConfig, got NoneType"):
        epochs_for_budget(None, 10)
    config = tiny_config()
    config.train.batch_size = 0  # assigned later: named as the constructor names it
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size must be an integer in \[1, "):
        epochs_for_budget(config, 10)


def test_the_budget_estimate_is_steps_plus_end_plus_checkpoints_on_a_fake_clock(monkeypatch):
    """Every second comes from a fake clock that only the slowed parts advance (0.01 s a
    step, 0.5 s an epoch's end, 0.2 s a checkpoint): the estimate is then exact, for long
    epochs (timed in part) and a short one (timed whole). The tests on real time above
    allow 0.6-1.6 and could not tell a dropped epoch end."""
    import types

    import vaekit.budget as budget

    clock = [0.0]
    monkeypatch.setattr(budget, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class VAE(vaekit.models.VAE):
        def decode(self, z):
            if self.training:
                clock[0] += 0.01
            return super().decode(z)

    def slowed(fn, seconds):
        def call(*args):
            clock[0] += seconds
            return fn(*args)
        return call

    monkeypatch.setattr(vaekit.wiring, "VAE", VAE)
    monkeypatch.setattr(budget, "_end_epoch", slowed(budget._end_epoch, 0.5))
    monkeypatch.setattr(budget, "_checkpoint", slowed(budget._checkpoint, 0.2))
    for batch_size in (8, 64, 512):
        config = tiny_config(train__batch_size=batch_size, train__checkpoint_every=3)
        spe = steps_per_epoch(config)
        epochs, per_epoch = budget.epochs_for_budget(config, 100.0, calibration_seconds=0.1)
        assert per_epoch == pytest.approx(spe * 0.01 + 0.5 + (spe - 1) / 3 * 0.2, rel=1e-9), batch_size
        assert epochs == int(100.0 / per_epoch)
