"""Training to a time budget: how many epochs of a run fit in a number of seconds.

``vaekit train --time-budget SECONDS`` sets the number of epochs before the run starts,
so that every schedule stays a function of the step and the run stays reproducible (a
cosine learning rate ends with the budget). The epoch is timed on a throwaway copy of the
run, in a temporary directory: a few warm-up steps (which compile or capture the step),
then steps timed for about ``calibration_seconds`` (at most to just before the end of the
first epoch), then one end of epoch (validation, the model saved, metrics, checkpoint). An
epoch is estimated as its steps at the measured pace plus that end, plus, with
``train.checkpoint_every``, the checkpoints inside it (one timed). The throwaway run
writes its files in the loop, where fit writes them in the background
(``vaekit.train.BACKGROUND_WRITES``): the estimate counts the writes whole, on the safe
side of the budget. An epoch shorter than
three warm-ups is timed whole instead, after whole epochs of warm-up. The calibration therefore
costs seconds, not epochs, however long an epoch is (it used to train whole epochs: for
``mnist-pixelcnn-late`` on 2 CPU cores, about 80 s each; now the whole command's start,
calibration included, takes about 40 s there, and it estimated 81.8 s an epoch).

Where an epoch is a few dozen steps, its bookkeeping is a large part of it and the
estimate is rougher: the bundled digits with a 15 s budget (11 steps an epoch at the time;
the digits preset now takes 22) timed
0.059 s an epoch and trained 256 epochs in 16.0 s; an earlier version of this
calibration, with the cores shared, 0.057 s and 260 epochs in 18.5 s (whole-epoch timing
before: 168 epochs in 9.2 s).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import tempfile
import time
from pathlib import Path

import torch

from .checks import check_number
from .config import RunConfig
from .train import (_autocast, _checkpoint, _end_epoch, _prepare_run_dir, _progress, _Stop, _tf32, _train_epoch,
                    _unvalidated)
from .wiring import _build, _dist_info

__all__ = ["epochs_for_budget"]

# Steps (or blocks of graph_steps) before the timing: the first ones compile or capture
# the step and allocate (a static step warms up 3 steps uncaptured, a block once).
_WARMUP_STEPS = 5
_STOPPED = "the time-budget calibration run was stopped; nothing was kept"


def epochs_for_budget(config: RunConfig, seconds: float, *,
                      calibration_seconds: float = 2.0) -> tuple[int, float]:
    """``(epochs, seconds per epoch)``: how many epochs of ``config``'s training fit in
    ``seconds`` of training loop, and the epoch's estimated time (see the module's text).
    Its training loop then takes the budget give or take the machine's noise; the
    calibration, the first epoch's compile or capture, the process's start and the
    end-of-run pictures come on top. Not under ``torchrun`` (the ranks could time
    differently). A stop signal (Ctrl-C) during the calibration raises
    ``KeyboardInterrupt``: there is no run to resume."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a vaekit RunConfig, got {type(config).__name__}")
    config.check()
    check_number("seconds", seconds, open_low=True)
    check_number("calibration_seconds", calibration_seconds, open_low=True)
    if _dist_info()[2] > 1:
        raise ValueError("a time budget is not supported under torchrun (the ranks could time differently); "
                         "give the epochs instead")
    trial = copy.deepcopy(config)
    # epochs: a config may give max_steps alone (epochs 0), which the trial does not keep
    trial.train = dataclasses.replace(trial.train, epochs=max(1, trial.train.epochs), max_steps=0,
                                      early_stopping=0, checkpoint_every=0, progress=False)
    threads = torch.get_num_threads()
    # silent: its messages (a resume hint for a directory about to vanish) are not the user's
    with tempfile.TemporaryDirectory(prefix="vaekit-calibrate-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), _Stop() as stop, _unvalidated():
        try:
            per_epoch = _time_an_epoch(trial, Path(tmp) / "run", stop, calibration_seconds,
                                       config.train.checkpoint_every)
        finally:
            torch.set_num_threads(threads)
    return max(1, int(seconds / max(per_epoch, 1e-9))), per_epoch


def _time_an_epoch(config: RunConfig, run_dir: Path, stop: _Stop, target: float,
                   checkpoint_every: int = 0) -> float:
    run = _build(config, run_dir, None)
    _prepare_run_dir(run, None, False)
    with _tf32(run):  # the arithmetic the training will use
        return _time_steps(run, stop, target, checkpoint_every)


def _time_steps(run, stop: _Stop, target: float, checkpoint_every: int = 0) -> float:
    """An epoch's estimated seconds: its steps, its end, and with ``checkpoint_every`` the
    checkpoints within it (one of them timed; an epoch of n steps holds about
    (n - 1) / checkpoint_every of them: the end of an epoch checkpoints anyway)."""
    amp = _autocast(run)
    quiet = _progress(False, 0, 0)
    steps = len(run.batches)  # an epoch's steps
    block = run.tc.graph_steps if run.static is not None else 1
    run.t0 = time.perf_counter()

    def timed(work) -> float:
        _sync(run.device)
        t = time.perf_counter()
        work()
        _sync(run.device)
        if stop.signum:  # a stop signal came (the training loop stopped at the next step)
            raise KeyboardInterrupt(_STOPPED)
        return time.perf_counter() - t

    def train_to(step: int) -> float:
        run.total_steps = step  # _train_epoch stops there
        return timed(lambda: _train_epoch(run, stop, quiet, amp))

    def checkpoints() -> float:
        if not checkpoint_every:
            return 0.0
        return max(0, steps - 1) / checkpoint_every * timed(lambda: _checkpoint(run))

    if stop.signum:  # a stop signal during the build
        raise KeyboardInterrupt(_STOPPED)
    # The steps that run as the static step or its blocks (an epoch's last, partial batch
    # runs eagerly, or on CUDA in a graph of its own; steps short of a whole block run one
    # at a time).
    fast = (run.batches.full_batches // block) * block or run.batches.full_batches
    warm = _WARMUP_STEPS * block
    if steps < 3 * warm:
        # A small epoch: warm up on whole epochs until the warm-up's static steps are done
        # (the capture or compile must not fall in the timing), then time an epoch whole.
        end = 0.0
        for _ in range(math.ceil(warm / max(1, fast))):
            train_to(run.step + steps)
            end = timed(lambda: _end_epoch(run, None))
        return train_to(run.step + steps) + end + checkpoints()
    # A long epoch: the warm-up's steps, then chunks of whole blocks (1, 2, 4, ... of them)
    # until about ``target`` seconds, short of the epoch's tail (its last partial batch and
    # any steps that do not make a block), then its end.
    train_to(warm)
    limit = (fast // block - 1) * block
    done, took, chunk = 0, 0.0, block
    while run.step < limit and (took < target or not done):
        chunk = min(chunk, limit - run.step)
        took += train_to(run.step + chunk)
        done += chunk
        chunk *= 2
    end = timed(lambda: _end_epoch(run, None))
    return steps * took / done + end + checkpoints()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
