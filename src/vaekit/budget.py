"""Training to a time budget: how many epochs of a run fit in a number of seconds.

``vaekit train --time-budget SECONDS`` sets the number of epochs before the run starts,
so that every schedule stays a function of the step and the run stays reproducible (a
cosine learning rate ends with the budget). The epoch is timed on a throwaway copy of the
run, in a temporary directory: a few warm-up steps (which compile or capture the step),
then steps timed for about ``calibration_seconds`` (at most to the end of the first
epoch), then one end of epoch (validation, the model saved, metrics, checkpoint). An epoch
is estimated as its steps at the measured pace plus that end. The calibration therefore
costs seconds, not epochs, however long an epoch is (it used to train whole epochs: for
``mnist-pixelcnn-late`` on 2 CPU cores, about 80 s each; now the whole command's start,
calibration included, takes about 40 s there, and it estimated 81.8 s an epoch).

Where an epoch is a few dozen steps, its bookkeeping is a large part of it and grows with
the run (the metrics file and the checkpoint hold the whole history): the bundled digits
at 15 s timed 0.057 s an epoch, the epochs took 0.056 s at first and 0.073 s after 200,
and the 260 epochs took 18.5 s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import torch

from .checks import check_number
from .config import RunConfig
from .train import _end_epoch, _prepare_run_dir, _progress, _Stop, _train_epoch, _unvalidated
from .wiring import _build, _dist_info

__all__ = ["epochs_for_budget"]

# Steps (or blocks of graph_steps) before the timing: the first ones compile or capture
# the step and allocate (a static step warms up 3 steps uncaptured, a block once).
_WARMUP_STEPS = 5


def epochs_for_budget(config: RunConfig, seconds: float, *,
                      calibration_seconds: float = 2.0) -> tuple[int, float]:
    """``(epochs, seconds per epoch)``: how many epochs of ``config``'s training fit in
    ``seconds`` of training loop, and the epoch's estimated time (see the module's text).
    Its training loop then takes the budget give or take the machine's noise; the
    calibration, the first epoch's compile or capture, the process's start and the
    end-of-run pictures come on top. Not under ``torchrun`` (the ranks could time
    differently). A stop signal (Ctrl-C) during the calibration raises
    ``KeyboardInterrupt``: there is no run to resume."""
    check_number("seconds", seconds, open_low=True)
    check_number("calibration_seconds", calibration_seconds, open_low=True)
    if _dist_info()[2] > 1:
        raise ValueError("a time budget is not supported under torchrun (the ranks could time differently); "
                         "give the epochs instead")
    trial = copy.deepcopy(config)
    trial.train = dataclasses.replace(trial.train, max_steps=0, early_stopping=0, checkpoint_every=0,
                                      progress=False)
    threads = torch.get_num_threads()
    # silent: its messages (a resume hint for a directory about to vanish) are not the user's
    with tempfile.TemporaryDirectory(prefix="vaekit-calibrate-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), _Stop() as stop, _unvalidated():
        try:
            per_epoch = _time_an_epoch(trial, Path(tmp) / "run", stop, calibration_seconds)
        finally:
            torch.set_num_threads(threads)
    return max(1, int(seconds / max(per_epoch, 1e-9))), per_epoch


def _time_an_epoch(config: RunConfig, run_dir: Path, stop: _Stop, target: float) -> float:
    run = _build(config, run_dir, None)
    _prepare_run_dir(run, None, False)
    amp = (torch.autocast(run.device.type, dtype=torch.bfloat16) if run.tc.amp == "bf16"
           else contextlib.nullcontext())
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
            raise KeyboardInterrupt("the time-budget calibration run was stopped; nothing was kept")
        return time.perf_counter() - t

    def train_to(step: int) -> float:
        run.total_steps = step  # _train_epoch stops there
        return timed(lambda: _train_epoch(run, stop, quiet, amp))

    train_to(min(steps, _WARMUP_STEPS * block))  # warm-up, not timed
    if run.step == steps:  # the warm-up was the whole epoch (a small one): time the next, whole
        end = timed(lambda: _end_epoch(run, None))
        return train_to(2 * steps) + end
    done, took, chunk = 0, 0.0, block
    while run.step < steps and (took < target or not done):
        chunk = min(chunk, steps - run.step)
        took += train_to(run.step + chunk)
        done += chunk
        chunk *= 2
    end = timed(lambda: _end_epoch(run, None))
    return steps * took / done + end


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
