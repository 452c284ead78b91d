"""The fit loop: a plain function, no Trainer hierarchy.

``fit(config, run_dir)`` trains a VAE and leaves in ``run_dir``:

* ``config.json``: the resolved run configuration (model, data, train, objective);
* ``model/``: the best model by validation ELBO (``model.safetensors`` + ``config.json``);
* ``checkpoint.pt``: the latest training state (atomic), for ``resume=True``;
* ``metrics.csv``, ``curves.png``, ``reconstructions.png``, ``samples.png``,
  ``traversals.png`` (one row per latent dimension, by decreasing KL);
* TensorBoard events in ``tb/`` when the ``tensorboard`` package is installed.

Resuming continues exactly where the run stopped: the checkpoint holds the model,
optimiser, step, random-number states, the position in the data order and the partial
epoch sums, so a resumed run ends with the same weights bit for bit (on the CPU).
Under ``torchrun`` the same function trains with DistributedDataParallel (see
``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import __version__
from .batching import BatchIterator, fits_on_device, mix_seed
from .config import RunConfig, TrainConfig
from .checks import check_int, check_number
from .data import check_images, load_dataset
from .fast import StaticStep
from .io import save_checkpoint, save_model, write_json
from .models import VAE
from .plots import save_run_pictures
from .runs import read_for_resume, restore, rng_state, write_metrics
from .steps import (
    _FOLD_EVERY, _Objective, _adam, _block_fits, _eager_step, _fold, _static_block, _static_step, _use_static, lr_at,
)

__all__ = ["TrainConfig", "RunConfig", "fit", "FitResult", "TrainingDiverged", "lr_at", "resolve_device",
           "epochs_for_budget"]

class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left intact."""


class FitResult(NamedTuple):
    model: VAE
    history: list
    run_dir: Path
    interrupted: bool


def resolve_device(name: str, *, what: str = "TrainConfig.device") -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; refuses CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} is {name!r} but no CUDA device is available")
    return dev


_SMALL_STEP = 2e7
def _work_per_step(model: nn.Module, batch_size: int) -> float:
    """Multiply-adds of one forward pass, roughly: parameters times batch size."""
    return sum(p.numel() for p in model.parameters()) * batch_size


_VAL_STREAM = 0x76616C  # validation noise: a function of (seed, epoch), the same on every rank


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


@torch.no_grad()
def _validate(model: VAE, x: torch.Tensor, batch_size: int, generator: torch.Generator) -> dict:
    from .evaluate import elbo_terms

    was = model.training
    model.eval()
    sums = {"elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
    device = next(model.parameters()).device
    for i in range(0, x.shape[0], batch_size):
        t = elbo_terms(model, x[i : i + batch_size].to(device), generator=generator)
        for k in sums:
            sums[k] += float(t[k].sum())
    model.train(was)
    n = max(1, x.shape[0])
    out = {k: v / n for k, v in sums.items()}
    out["loss"] = -out["elbo"]
    return out


def _check_training_data(data, likelihood: str) -> None:
    """Refuse data the likelihood cannot score, before the run directory is touched: the
    loop runs the losses without their value checks and would otherwise train on
    impossible targets."""
    for split in ("train", "val", "test"):
        t = getattr(data, split)
        if not len(t):
            continue
        if likelihood in ("bernoulli", "continuous_bernoulli"):
            check_images(t, f"{data.name} {split} data (likelihood {likelihood!r})")
        elif likelihood == "discretized_logistic" and not bool(
                ((t * 255 - torch.round(t * 255)).abs() < 1e-3).all() & (t >= 0).all() & (t <= 1).all()):
            raise ValueError(f"{data.name} {split} data must be 8-bit levels k/255 in [0, 1] for the "
                             f"discretized_logistic likelihood (use binarize 'none' on uint8 images)")


def fit(config: RunConfig, run_dir, *, resume: bool = False, epochs: int | None = None) -> FitResult:
    """Train a VAE as ``config`` says; write everything into ``run_dir``.

    With ``resume=True`` the run continues from ``run_dir/checkpoint.pt`` with the
    configuration saved there (``config`` is ignored but for ``train.progress``).
    ``epochs`` (with ``resume=True`` only; ``--resume RUN --epochs N``) extends the run to
    that many epochs in all: more than it has done, and not a run that stopped early or
    reached ``train.max_steps``; the checkpoint and ``config.json`` are rewritten
    (atomically) with the new count before training goes on, so a later plain resume
    continues the extended run. With a cosine ``lr_schedule`` the learning rate from the
    resume point on follows the cosine over the new total (it goes back up, then decays
    to 0 at the new end), while a resume without ``epochs`` stays bit for bit the
    uninterrupted run.
    PyTorch's CPU thread count, which a run may set, is restored on the way out.
    """
    if epochs is not None and not resume:
        raise ValueError(f"epochs extends a resumed run (resume=True); a new run takes config.train.epochs, "
                         f"got epochs={epochs!r} with resume=False")
    if not resume and holds_a_run(run_dir):
        raise ValueError(f"run_dir {run_dir} already holds a run; choose another directory, or continue it "
                         f"with resume=True")
    threads = torch.get_num_threads()
    try:
        return _fit(config, run_dir, resume, epochs)
    finally:
        torch.set_num_threads(threads)


def holds_a_run(run_dir) -> bool:
    """Whether ``run_dir`` is anything but a missing or empty directory, or one where a
    run stopped before its first checkpoint (``config.json`` alone: nothing to lose): a
    new run would mix its files with another's."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return False
    return not run_dir.is_dir() or any(p.name != "config.json" and not p.name.endswith(".tmp")
                                       for p in run_dir.iterdir())


def epochs_for_budget(config: RunConfig, seconds: float, *, calibration_epochs: int = 3) -> tuple[int, float]:
    """How many epochs of ``config``'s training fit in ``seconds`` of training loop:
    ``(epochs, seconds per epoch)``, the latter timed by a short run of
    ``calibration_epochs`` epochs (in a temporary directory, thrown away; its first epoch,
    which compiles or captures the step, is left out of the timing). Training that many
    epochs keeps every schedule a function of the step (the cosine ends with the budget),
    so the run stays reproducible; its training loop takes the budget give or take the
    machine's noise, and the calibration run, the process's start and the end-of-run
    pictures come on top. Not under ``torchrun``
    (the ranks could time differently)."""
    check_number("seconds", seconds, open_low=True)
    check_int("calibration_epochs", calibration_epochs, low=2)
    if _dist_info()[2] > 1:
        raise ValueError("a time budget is not supported under torchrun (the ranks could time differently); "
                         "give the epochs instead")
    trial = copy.deepcopy(config)
    trial.train = dataclasses.replace(trial.train, epochs=calibration_epochs, max_steps=0, early_stopping=0,
                                      checkpoint_every=0, progress=False)
    with tempfile.TemporaryDirectory(prefix="vaekit-calibrate-") as tmp:
        history = fit(trial, Path(tmp) / "run").history
    rows = [r for r in history if r["split"] == "train"]
    per_epoch = (rows[-1]["seconds"] - rows[0]["seconds"]) / (len(rows) - 1)
    return max(1, int(seconds / max(per_epoch, 1e-9))), per_epoch


@dataclasses.dataclass(eq=False)
class _Run:
    """What one training run wires together, and the loop's counters (with the weights,
    what a checkpoint holds): the state that the loop's pieces, below and in
    :mod:`vaekit.steps` (the three kinds of step), share."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    data: object
    val_x: torch.Tensor  # the validation images, on the device if they fit there
    model: VAE
    batches: BatchIterator
    objective: nn.Module  # _Objective, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    total_steps: int
    epochs: int
    sums: torch.Tensor  # loss, rec, kl, n over the epoch so far
    static: StaticStep | None = None
    step: int = 0
    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: float = math.inf
    since_best: int = 0
    skipped: int = 0
    bad_run: int = 0  # non-finite steps in a row
    lr: float = 0.0  # the last step's learning rate and KL weight, for the epoch's row
    beta: float = 0.0
    stop_all: bool = False  # under torchrun: some rank got a stop signal

    @property
    def tc(self) -> TrainConfig:
        return self.config.train

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def more_to_do(self) -> bool:
        return self.epoch < self.epochs and self.step < self.total_steps

    def stopped_early(self) -> bool:
        return bool(self.tc.early_stopping) and self.since_best >= self.tc.early_stopping


def _build(config: RunConfig, run_dir: Path, state: dict | None) -> _Run:
    """Device, data, model, batches, objective, optimiser and fast step of a run, and its
    counters from ``state`` (a checkpoint) when it resumes."""
    rank, local_rank, world = _dist_info()
    tc, oc = config.train, config.objective
    device = resolve_device(tc.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    data = load_dataset(config.data)
    _check_training_data(data, config.model.likelihood)
    if config.data.dataset in ("mnist", "fashion-mnist", "array", "folder"):
        # the run records where its data are, whatever directory it is evaluated from later
        where = Path(config.data.data_dir or Path("data") / config.data.dataset).expanduser().resolve()
        config.data = dataclasses.replace(config.data, data_dir=str(where))
    if tc.early_stopping and data.val.shape[0] == 0:
        raise ValueError(f"train.early_stopping={tc.early_stopping} needs validation examples, and "
                         f"data.val_size={config.data.val_size!r} leaves none")
    config.model = dataclasses.replace(config.model, input_shape=tuple(data.train.shape[1:]))
    torch.manual_seed(tc.seed)
    model = VAE(config.model).to(device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    elif device.type == "cpu" and _work_per_step(model, tc.batch_size) < _SMALL_STEP:
        # A tiny step is slower on several threads: they spin on the OpenMP barrier and
        # fight other processes for the cores (measured: see docs/benchmarks.md).
        torch.set_num_threads(1)
    batches = BatchIterator(
        # A last combined batch with fewer examples than ranks cannot be split between
        # them: it is skipped (fewer than `world` examples an epoch).
        data.train, tc.batch_size, shuffle=True, drop_last=0 < data.train.shape[0] % (tc.batch_size * world) < world,
        dynamic_binarize=config.data.binarize == "dynamic", seed=tc.seed, device=device,
        rank=rank, world_size=world,
    )
    objective = _Objective(model, oc, data.train.shape[0], batches, tc.seed, device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    static = _use_static(tc, oc, model, device, world > 1)
    opt = _adam(model, tc, captured_on=device if static and device.type == "cuda" else None)
    steps_per_epoch = len(batches)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps) if tc.epochs else tc.max_steps
    val_x = data.val.to(device) if fits_on_device(data.val, device) else data.val  # else a batch at a time
    run = _Run(config, run_dir, device, rank, world, data, val_x, model, batches, objective, opt, total_steps,
               epochs=tc.epochs if tc.epochs else math.ceil(total_steps / steps_per_epoch),
               sums=torch.zeros(4, dtype=torch.float64, device=device))

    # Only draws outside the step- and epoch-keyed streams come from here (none in vaekit itself).
    torch.manual_seed(tc.seed * 1000 + 17 + rank)
    if state is not None:
        for key, value in restore(state, run.ckpt_path, model=model, optimizer=opt, batches=batches, device=device,
                                  rank=rank, world=world).items():
            setattr(run, key, value)
    if static:  # after the restore: the step's backups copy the optimiser's state
        run.static = StaticStep(model, opt, batch_size=tc.batch_size, grad_clip=tc.grad_clip, amp=tc.amp == "bf16",
                                compile=tc.fast == "compile")
    run.lr, run.beta = lr_at(run.step, total_steps, tc), oc.beta
    return run


def _prepare_run_dir(run: _Run, state: dict | None, extend_to: int | None) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run.run_dir.glob(".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    if extend_to is not None:  # first the checkpoint: a plain resume reads its config
        save_checkpoint(run.ckpt_path, {**{k: v for k, v in state.items() if k not in ("format", "format_version")},
                                        "config": run.config.to_dict()})
    write_json(run.run_dir / "config.json", {"vaekit_version": __version__, **run.config.to_dict()})


def _checkpoint(run: _Run) -> None:
    if run.static is not None:
        _fold(run)
    rng = rng_state(run.device)
    rngs, all_sums = [rng], run.sums.clone()
    if run.distributed:
        torch.distributed.all_reduce(all_sums)
        rngs = [None] * run.world
        torch.distributed.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
    if run.is_main:
        save_checkpoint(run.ckpt_path, {
            "config": run.config.to_dict(), "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
            "step": run.step, "epoch": run.epoch, "history": run.history, "best": run.best,
            "since_best": run.since_best, "skipped": run.skipped, "sums": all_sums.cpu(),
            "batches": run.batches.state_dict(), "rng": rngs, "world_size": run.world, "vaekit_version": __version__,
        })
    if run.distributed:
        torch.distributed.barrier()


def _train_epoch(run: _Run, stop: _Stop, progress, amp) -> bool:
    """The rest of the current epoch; True when a stop signal interrupted it (after a
    checkpoint)."""
    tc, batches = run.tc, run.batches
    run.model.train()
    if batches.position == 0:
        batches.set_epoch(run.epoch)
    k = tc.graph_steps if run.static is not None else 1
    pending = []  # full batches gathered for one block of k static steps
    for x in batches:
        if pending or (k > 1 and _block_fits(run, k)):
            pending.append(x)
            if len(pending) < k:
                continue
            _static_block(run, pending)
            done, pending = k, []
        else:
            run.lr = lr_at(run.step, run.total_steps, tc)
            if run.static is not None and x.shape[0] == tc.batch_size:
                _static_step(run, x)
            else:
                _eager_step(run, x, stop, amp)
            done = 1
        if run.bad_run >= tc.max_bad_steps:
            progress.close()
            raise TrainingDiverged(
                f"{run.bad_run} non-finite steps in a row (at step {run.step}); stopped. The last good checkpoint "
                f"is {run.ckpt_path if run.ckpt_path.exists() else 'not written yet'}"
            )
        run.step += done
        progress.update(done)
        sums = run.sums
        if (run.step - done) // _FOLD_EVERY != run.step // _FOLD_EVERY and sums[3] > 0:
            progress.set_postfix(loss=f"{float(sums[0] / sums[3]):.2f}", rec=f"{float(sums[1] / sums[3]):.2f}",
                                 kl=f"{float(sums[2] / sums[3]):.2f}", beta=f"{run.beta:.3g}")
        stopping = run.stop_all if run.distributed else bool(stop.signum)
        if run.step >= run.total_steps:
            break
        if batches.position == len(batches):
            # The epoch's last batch: the end-of-epoch block checkpoints and honours a
            # stop; a checkpoint here would resume into the next epoch and skip this
            # epoch's validation, metrics and best model.
            continue
        if stopping:
            _checkpoint(run)
            return True
        if tc.checkpoint_every and run.step % tc.checkpoint_every == 0:
            _checkpoint(run)
    return False


def _end_epoch(run: _Run, t0: float, writer) -> None:
    """The epoch's row, validation, best model, metrics and checkpoint."""
    tc = run.tc
    if run.static is not None:
        _fold(run)
        if run.bad_run >= tc.max_bad_steps:
            raise TrainingDiverged(f"{run.bad_run} non-finite steps in a row (at step {run.step}); stopped")
    sums = run.sums
    if run.distributed:
        torch.distributed.all_reduce(sums)
    n = float(sums[3]) or math.nan  # every step skipped: no mean to report
    row = {"epoch": run.epoch + 1, "step": run.step, "split": "train", "loss": float(sums[0]) / n,
           "reconstruction": float(sums[1]) / n, "kl": float(sums[2]) / n,
           "elbo": -(float(sums[1]) + float(sums[2])) / n, "beta": run.beta, "lr": run.lr,
           "skipped": run.skipped, "seconds": round(time.perf_counter() - t0, 3)}
    run.history.append(row)
    if run.val_x.shape[0]:
        val_gen = torch.Generator(device=run.device).manual_seed(mix_seed(tc.seed, _VAL_STREAM, run.epoch))
        val = _validate(run.model, run.val_x, max(tc.batch_size, 500), val_gen)
        # the validation loss is the negative ELBO (beta = 1), whatever the training objective
        run.history.append({**row, "split": "val", **val, "beta": 1.0})
        improved = val["loss"] < run.best
        run.best = min(run.best, val["loss"])
    else:  # no validation split: the model kept is the last one
        improved = True
    run.since_best = 0 if improved else run.since_best + 1
    run.epoch += 1
    sums.zero_()
    run.batches.set_epoch(run.epoch)
    if run.is_main:
        if improved:
            save_model(run.model, run.run_dir / "model")
        write_metrics(run.run_dir / "metrics.csv", run.history)
        if writer is not None:
            for r in run.history[-2 if run.val_x.shape[0] else -1:]:  # this epoch's rows
                split = r["split"]
                for k in ("loss", "reconstruction", "kl"):
                    writer.add_scalar(f"{split}/{k}", r[k], run.epoch)
    _checkpoint(run)


def _fit(config: RunConfig, run_dir, resume: bool, extend_to: int | None = None) -> FitResult:
    run_dir = Path(run_dir)
    state = None
    if resume:
        config, state = read_for_resume(run_dir, progress=config.train.progress, extend_to=extend_to)
    run = _build(config, run_dir, state)
    if run.is_main:
        _prepare_run_dir(run, state, extend_to)
    writer = _tensorboard(run_dir) if run.is_main else None
    amp = (torch.autocast(run.device.type, dtype=torch.bfloat16) if run.tc.amp == "bf16"
           else contextlib.nullcontext())
    progress = _progress(run.tc.progress and run.is_main, run.total_steps, run.step)
    interrupted = False
    if state is not None and run.is_main and not (run.more_to_do() and not run.stopped_early()):
        print(f"vaekit: {run_dir} is finished ({run.epoch} epochs"
              f"{', stopped early' if run.stopped_early() else ''}); nothing to train"
              f"{'' if run.stopped_early() else ' (extend it with --epochs N)'}", flush=True)
    t0 = time.perf_counter()
    with _Stop() as stop, _unvalidated():
        # A run resumed after it stopped early is finished: it does not train on.
        while run.more_to_do() and not run.stopped_early():
            if _train_epoch(run, stop, progress, amp):
                interrupted = True
                break
            _end_epoch(run, t0, writer)
            if run.stopped_early():
                break
            if (run.stop_all if run.distributed else stop.signum) and run.more_to_do():
                interrupted = True
                break
    progress.close()
    if interrupted:
        if run.is_main:
            why = f"signal {stop.signum}" if stop.signum else "a signal to another rank"
            print(f"vaekit: interrupted by {why}; checkpoint saved to {run.ckpt_path}; "
                  f"continue with: vaekit train --resume {run_dir}", flush=True)
        return FitResult(run.model, run.history, run_dir, True)
    if run.is_main:
        if not (run_dir / "model" / "model.safetensors").exists():
            save_model(run.model, run_dir / "model")
        best_model = VAE.from_pretrained(run_dir / "model", device=run.device)
        data = run.data
        with _unvalidated():  # a model made of NaNs still gets its (blank) pictures
            save_run_pictures(best_model, data.test if data.test.shape[0] else data.val, run_dir, run.history,
                              seed=run.tc.seed)
        if writer is not None:
            writer.close()
    if run.distributed:
        torch.distributed.barrier()
    return FitResult(run.model, run.history, run_dir, False)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _unvalidated():
    """The losses' value checks off while the loop runs: it judges finiteness itself and
    skips a non-finite step instead of raising (the data were checked before)."""
    from .checks import value_checks

    return value_checks(False, distributions=True)


def _progress(enabled: bool, total: int, initial: int):
    # disable=None: shown on a terminal, silent when stderr goes to a file or a pipe.
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=None if enabled else True, unit="step", dynamic_ncols=True, leave=False)
