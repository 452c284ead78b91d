"""The fit loop: a plain function, no Trainer hierarchy.

``fit(config, run_dir)`` trains a VAE and leaves in ``run_dir``:

* ``config.json``: the resolved run configuration (model, data, train, objective);
* ``model/``: the best model by validation ELBO (``model.safetensors`` + ``config.json``);
* ``checkpoint.pt``: the latest training state (atomic), for ``resume=True``;
* ``metrics.csv``, ``curves.png``, ``reconstructions.png``, ``samples.png``,
  ``traversals.png`` (a row for each of the (up to) 10 latent dimensions of highest mean KL
  over the test examples, in decreasing order);
* TensorBoard events in ``tb/`` when the ``tensorboard`` package is installed.

Resuming continues exactly where the run stopped: the checkpoint holds the model,
optimiser, step, random-number states, the position in the data order and the partial
epoch sums, so a resumed run ends with the same weights bit for bit (on the CPU).
Under ``torchrun`` the same function trains with DistributedDataParallel (see
``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch

from . import __version__
from .batching import mix_seed
from .config import RunConfig, TrainConfig
from .io import BackgroundWriter, checkpoint_bytes, host_copy, save_checkpoint, save_model, write_json
from .latents import tf32_flags
from .models import VAE
from .plots import save_run_pictures
from .runs import read_for_resume, rng_state, write_metrics
from .steps import _FOLD_EVERY, _block_fits, _eager_step, _fold, _static_block, _static_step, lr_at
from .wiring import _Run, _build, resolve_device

__all__ = ["TrainConfig", "RunConfig", "fit", "FitResult", "TrainingDiverged", "lr_at", "resolve_device",
           "epochs_for_budget", "holds_a_run", "in_use", "RunDirectoryInUse"]


class RunDirectoryInUse(ValueError):
    """Another process trains in the run directory (it holds the directory's lock)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        super().__init__(f"run_dir {run_dir} is in use: {self.why}")

    why = "another vaekit process is training there; wait for it to end, or choose another directory"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left intact."""


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    ``model``: the model as training left it (the last step's weights; the model kept,
    the best on validation, is in ``run_dir / "model"``). ``history``: one dict per row
    of ``metrics.csv`` (a ``"train"`` row per epoch, and a ``"val"`` row where there is a
    validation split), the whole run's, resumed parts included. ``run_dir``: the run's
    directory. ``interrupted``: stopped by SIGINT or SIGTERM (Ctrl-C), with a checkpoint
    saved to resume from. ``trained``: False for a resume of a run that was finished
    already (nothing trained). ``steps_per_epoch``: the steps of a full epoch
    (0: not known). ``resumed_from``: ``(epoch, step)`` of the checkpoint this call went
    on from; None for a run from the start.
    """

    model: VAE
    history: list
    run_dir: Path
    interrupted: bool
    trained: bool = True  # False: a resumed run that was finished already (nothing written)
    steps_per_epoch: int = 0  # the steps of a full epoch (0: not known)
    resumed_from: tuple | None = None  # (epoch, step) of the checkpoint this call went on from; None: from the start

    def trained_for(self) -> str:
        """How long the run has trained in all, for a summary line: "3 epochs", or where
        ``train.max_steps`` ended its last epoch part way, "300 steps (0.6 epochs)"."""
        rows = [r for r in self.history if r["split"] == "train"]
        return _trained_for(rows[-1]["epoch"] if rows else 0, rows[-1]["step"] if rows else 0, self.steps_per_epoch)


def _trained_for(epochs: int, steps: int, steps_per_epoch: int) -> str:
    if steps_per_epoch and steps < epochs * steps_per_epoch:  # the last epoch is partial
        return f"{steps} steps ({steps / steps_per_epoch:.3g} epochs)"
    return f"{epochs} epoch{'' if epochs == 1 else 's'}"


# Whether fit writes its model, metrics and checkpoints on a thread of its own while
# training goes on (io.BackgroundWriter); False writes them in the loop, as the benchmarks
# compare (docs/benchmarks.md).
BACKGROUND_WRITES = True

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


@torch.no_grad()
def _validate(model: VAE, x: torch.Tensor, batch_size: int, generator: torch.Generator) -> dict:
    from .evaluate import elbo_terms

    was = model.training
    model.eval()
    keys = ("elbo", "reconstruction", "kl")
    device = next(model.parameters()).device
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # on the device: one sync in all
    for i in range(0, x.shape[0], batch_size):
        t = elbo_terms(model, x[i : i + batch_size].to(device), generator=generator)
        sums += torch.stack([t[k].sum() for k in keys])
    model.train(was)
    n = max(1, x.shape[0])
    out = {k: v / n for k, v in zip(keys, sums.tolist())}
    out["loss"] = -out["elbo"]
    return out


def check_resume_only(resume: bool, epochs, data_dir, error: type[Exception] = ValueError) -> None:
    """``epochs`` and ``data_dir`` belong to a resumed run: refused (as ``error``) without
    ``resume``. Shared by :func:`fit` and ``vaekit.commands.train_command``."""
    if epochs is not None and not resume:
        raise error(f"epochs extends a resumed run (resume); a new run takes config.train.epochs, "
                    f"got epochs={epochs!r} without resume")
    if data_dir is not None and not resume:
        raise error(f"data_dir moves a resumed run's data (resume); a new run takes config.data.data_dir, "
                    f"got data_dir={data_dir!r} without resume")


def fit(config: RunConfig, run_dir, *, resume: bool = False, epochs: int | None = None,
        data_dir: str | None = None) -> FitResult:
    """Train a VAE as ``config`` says; write everything into ``run_dir``.

    With ``resume=True`` the run continues from ``run_dir/checkpoint.pt`` with the
    configuration saved there (``config`` is ignored but for ``train.progress``).
    ``epochs`` (with ``resume=True`` only; ``--resume RUN --epochs N``) extends the run to
    that many epochs in all: more than it has done, and not a run that stopped early or
    reached ``train.max_steps``; the checkpoint and ``config.json`` are rewritten
    (atomically) with the new count before training goes on, so a later plain resume
    continues the extended run. ``data_dir`` (with ``resume=True`` only; ``--resume RUN
    --data-dir DIR``) says where the run's data are now, if not where it recorded them (an
    absolute path, which another machine may lack); they must be the data it trained on,
    and the run records the new place. With a cosine ``lr_schedule`` the learning rate
    from the resume point on follows the cosine over the new total (it goes back up, then
    decays to 0 at the new end), while a resume without ``epochs`` stays bit for bit the
    uninterrupted run. A plain resume of a finished run (or one that stopped early) trains
    nothing and writes nothing (but, with ``data_dir``, the new place of its data): its
    result says ``trained=False``. A run that stopped before its first checkpoint (no
    ``checkpoint.pt``, and a ``metrics.csv`` of its first epoch at most) trains again from
    the start with its ``config.json``, ``epochs`` and ``data_dir`` applied: the run it
    was, since training is a function of its seeds.
    PyTorch's CPU thread count, which a run may set, is restored on the way out.
    """
    if not isinstance(resume, bool):  # resume="no" resumed
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a vaekit RunConfig, got {type(config).__name__}")
    if not resume:  # (a resumed run takes the config it saved)
        config.check()
    check_resume_only(resume, epochs, data_dir)
    if not resume and holds_a_run(run_dir):
        raise ValueError(_holds_a_run_message(run_dir))
    threads = torch.get_num_threads()
    try:
        with _run_lock(Path(run_dir), resume):
            return _fit(config, run_dir, resume, epochs, data_dir)
    finally:
        torch.set_num_threads(threads)


def _holds_a_run_message(run_dir) -> str:
    return f"run_dir {run_dir} already holds a run; choose another directory, or continue it with resume=True"


@contextlib.contextmanager
def _run_lock(run_dir: Path, resume: bool):
    """``run_dir`` held by this process (rank 0 under torchrun, the one that writes) while
    it trains or resumes there: another process that tries the same directory meanwhile
    is refused, where two runs started together would have passed :func:`holds_a_run`
    both and mixed their files. An advisory lock (``flock``) on the directory itself: no
    file is added, and the system releases it when the process ends however it ends.
    Where the file system does not lock directories, or without ``fcntl`` (Windows),
    nothing is held. A directory made here is removed again, while still held, when its
    run ends having written nothing (refused after the lock), and with it the folders made
    above it here that are empty; a run refused because another holds the directory
    removes nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    made = held = False
    fd = None
    above = []  # the folders above run_dir made here, innermost first
    for _ in range(100):
        try:
            missing = [d for d in run_dir.parents if not d.exists()]
            run_dir.mkdir(parents=True)  # made here (not merely found), or there already
            made, above = True, missing
        except FileExistsError:
            pass
        try:
            fd = os.open(run_dir, os.O_RDONLY)
        except FileNotFoundError:  # removed meanwhile (a refused run that had made it): again
            continue
        try:
            _lock_or_wait(fd, fcntl)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryInUse(run_dir) from None
        except OSError:  # a file system that does not lock directories: unguarded, as before
            break
        try:
            held = os.path.samestat(os.fstat(fd), os.stat(run_dir))
        except FileNotFoundError:
            held = False
        if held:
            break
        # the directory locked is gone from its path (removed by the run that made it, which
        # was refused): the path's directory now is the one to hold
        os.close(fd)
        fd = None
    try:
        if not resume and holds_a_run(run_dir):  # again under the lock: another process may have written since
            raise ValueError(_holds_a_run_message(run_dir))
        yield
    finally:
        if made and held:  # a directory made for a run that wrote nothing: removed while still held
            with contextlib.suppress(OSError):  # only if still empty, and the folders made above it too
                for d in (run_dir, *above):
                    d.rmdir()
        if fd is not None:
            os.close(fd)


def _lock_or_wait(fd: int, fcntl) -> None:
    """The run's lock taken on ``fd``, or BlockingIOError where another process holds it:
    tried for a tenth of a second, since :func:`in_use` holds it shared for a moment."""
    for wait in (0.0, 0.01, 0.03, 0.06):
        time.sleep(wait)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
    raise BlockingIOError


def in_use(run_dir) -> bool:
    """Whether a vaekit process trains or resumes in ``run_dir`` now (holds its lock, see
    :func:`fit`); False where that cannot be told (no such directory, no directory locks)."""
    try:
        import fcntl
        fd = os.open(run_dir, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released on close
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def holds_a_run(run_dir) -> bool:
    """Whether ``run_dir`` is anything but a missing or empty directory, or one where a
    run stopped before its first checkpoint (``config.json`` alone: nothing to lose): a
    new run would mix its files with another's."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return False
    return not run_dir.is_dir() or any(p.name != "config.json" and not p.name.endswith(".tmp")
                                       for p in run_dir.iterdir())


# The files a run writes through io.atomic_write, by folder: a resume removes the temporary
# files (".<name>.<random>.tmp") a killed run left of these, and no others: an evaluation
# writing its metrics-<split>.json in the run meanwhile keeps its own.
_RUN_FILES = {".": ("config.json", "checkpoint.pt", "metrics.csv", "reconstructions.png", "samples.png",
                    "traversals.png"),
              "model": ("model.safetensors", "config.json")}


def _prepare_run_dir(run: _Run, state: dict | None, changed: bool) -> None:
    """The run directory made; with ``changed`` (a resume that extends the run or moves its
    data) the checkpoint's config rewritten first, so a later plain resume reads it."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for folder, names in _RUN_FILES.items():
        for name in names:  # left by a run killed mid-write (io.atomic_write's names); others' are theirs
            for stale in (run.run_dir / folder).glob(f".{glob.escape(name)}.*.tmp"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)
    if changed and state is not None:  # first the checkpoint: a plain resume reads its config
        save_checkpoint(run.ckpt_path, {**{k: v for k, v in state.items() if k not in ("format", "format_version")},
                                        "config": run.config.to_dict()})
    write_json(run.run_dir / "config.json", {"vaekit_version": __version__, **run.config.to_dict()})


def _checkpoint(run: _Run, before=()) -> None:
    """The training state written to ``checkpoint.pt`` (by rank 0), after the writing jobs
    ``before`` (the end of an epoch's model and metrics). The state is copied into host
    memory and serialised now; the files are written and synced by ``run.writes``, in the
    background while training goes on (``BACKGROUND_WRITES``)."""
    if run.static is not None:
        _fold(run)
    rng = rng_state(run.device)
    rngs, all_sums = [rng], run.sums.clone()
    if run.distributed:
        torch.distributed.all_reduce(all_sums)
        rngs = [None] * run.world
        torch.distributed.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
    if run.is_main:
        # The last checkpoint's copy is written over once its jobs are done with it (a slow
        # disk still writing it: a new copy, made while the writing goes on).
        reuse = run.snapshot if run.writes.idle() else None
        state = run.snapshot = host_copy({
            "config": run.config.to_dict(), "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
            "step": run.step, "epoch": run.epoch, "history": run.history, "best": run.best,
            "since_best": run.since_best, "skipped": run.skipped, "sums": all_sums,
            "batches": run.batches.state_dict(), "rng": rngs, "world_size": run.world, "vaekit_version": __version__,
            "data": run.data_seen, "seconds": time.perf_counter() - run.t0,
        }, into=reuse)
        # Serialised here: in the writing thread it would hold the GIL that the steps need.
        path, jobs, data = run.ckpt_path, list(before), checkpoint_bytes(state)

        def write() -> None:
            for job in jobs:
                job(state)
            save_checkpoint(path, state, data=data)

        run.writes.submit(write)
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
            if not (run.static is not None and run.static.serves(x.shape[0]) and _static_step(run, x)):
                _eager_step(run, x, stop, amp)
            done = 1
        if run.bad_run >= tc.max_bad_steps:
            progress.close()
            try:
                run.writes.wait()  # the checkpoint named below is on disk
            except Exception as e:  # noqa: BLE001  (its failure is told with the divergence)
                failed = e
            else:
                failed = None
            raise TrainingDiverged(
                f"{run.bad_run} non-finite steps in a row (at step {run.step}); stopped. The last good checkpoint "
                f"is {run.ckpt_path if run.ckpt_path.exists() else 'not written yet'}"
            ) from failed
        run.step += done
        progress.update(done)
        if (run.step - done) // _FOLD_EVERY != run.step // _FOLD_EVERY:
            run.writes.check()  # a checkpoint that could not be written stops the run now
            if not progress.disable:
                loss, rec, kl, n = run.sums.tolist()  # one sync, and none without a bar to show them on
                if n > 0:
                    progress.set_postfix(loss=f"{loss / n:.2f}", rec=f"{rec / n:.2f}", kl=f"{kl / n:.2f}",
                                         beta=f"{run.beta:.3g}")
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


def _end_epoch(run: _Run, writer) -> None:
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
           "skipped": run.skipped, "seconds": round(time.perf_counter() - run.t0, 3)}
    run.history.append(row)
    if run.distributed:  # a buffer each rank updated in its own forward (decoder_mse): rank 0's, for all
        for buffer in run.model.buffers():
            torch.distributed.broadcast(buffer, 0)
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
    before = []  # written with the checkpoint, from its copies of the weights and the history
    if run.is_main:
        model, model_dir, metrics = run.model, run.run_dir / "model", run.run_dir / "metrics.csv"
        if improved:
            before.append(lambda state: save_model(model, model_dir, state=state["model"]))
        before.append(lambda state: write_metrics(metrics, state["history"]))
        if writer is not None:
            for r in run.history[-2 if run.val_x.shape[0] else -1:]:  # this epoch's rows
                split = r["split"]
                for k in ("loss", "reconstruction", "kl"):
                    writer.add_scalar(f"{split}/{k}", r[k], run.epoch)
    _checkpoint(run, before)


def _fit(config: RunConfig, run_dir, resume: bool, extend_to: int | None = None,
         data_dir: str | None = None) -> FitResult:
    run_dir = Path(run_dir)
    state = None
    if resume:
        config, state = read_for_resume(run_dir, progress=config.train.progress, extend_to=extend_to,
                                        data_dir=data_dir)
    run = _build(config, run_dir, state, resumed=resume)
    per_epoch = len(run.batches)
    start = (run.epoch, run.step) if state is not None else None
    if state is not None and not (run.more_to_do() and not run.stopped_early()):
        # A run resumed after it finished (or stopped early) does not train on, and its
        # files (config.json, the pictures) stay as they are, but for the new place of its
        # data when it was given (they were loaded and checked above).
        if run.is_main:
            if data_dir is not None:
                _prepare_run_dir(run, state, True)
            if not (run_dir / "curves.png").exists():  # stopped (killed) after its last checkpoint
                _finish(run)
            done = _trained_for(run.epoch, run.step, per_epoch)
            if run.stopped_early():
                what = f" ({done}, stopped early); nothing to train"
            elif run.tc.max_steps and run.step >= run.tc.max_steps:  # which no --epochs extends
                what = f": train.max_steps {run.tc.max_steps} ended it after {done}; nothing to train"
            else:
                what = f" ({done}); nothing to train (extend it with --epochs N)"
            print(f"vaekit: {run_dir} is finished{what}"
                  f"{'; the new place of its data is recorded' if data_dir is not None else ''}", flush=True)
        return FitResult(run.model, run.history, run_dir, False, trained=False, steps_per_epoch=per_epoch,
                         resumed_from=start)
    if resume and state is None and run.is_main:
        print(f"vaekit: {run_dir} stopped before its first checkpoint; training it from the start", flush=True)
    if run.is_main:
        _prepare_run_dir(run, state, extend_to is not None or data_dir is not None)
    writer = _tensorboard(run_dir) if run.is_main else None
    amp = _autocast(run)
    progress = _progress(run.tc.progress and run.is_main, run.total_steps, run.step)
    interrupted = False
    # `seconds` counts the training loop's time since the run began, across resumes (a
    # checkpoint keeps it; older ones only their last epoch row's).
    done = state.get("seconds", (state["history"] or [{}])[-1].get("seconds", 0.0)) if state else 0.0
    run.t0 = time.perf_counter() - float(done)
    # Under torchrun rank 0 writes in the loop: torchrun kills it if another rank fails,
    # and a write behind the barrier would be lost with it.
    run.writes = BackgroundWriter(BACKGROUND_WRITES and run.is_main and not run.distributed)
    with _Stop() as stop, _unvalidated(), _tf32(run):  # a signal must not cut the last writes either
        try:
            while run.more_to_do() and not run.stopped_early():
                if _train_epoch(run, stop, progress, amp):
                    interrupted = True
                    break
                _end_epoch(run, writer)
                if run.stopped_early():
                    break
                if (run.stop_all if run.distributed else stop.signum) and run.more_to_do():
                    interrupted = True
                    break
        except BaseException:
            run.writes.close(raise_error=False)  # what was handed to it is on disk; the first error is the news
            raise
        run.writes.close()
    progress.close()
    if interrupted:
        if run.is_main:
            why = f"signal {stop.signum}" if stop.signum else "a signal to another rank"
            print(f"vaekit: interrupted by {why}; checkpoint saved to {run.ckpt_path}; "
                  f"continue with: {_resume_command(run)}", flush=True)
        return FitResult(run.model, run.history, run_dir, True, steps_per_epoch=per_epoch, resumed_from=start)
    if run.is_main:
        _finish(run)
        if writer is not None:
            writer.close()
    if run.distributed:
        torch.distributed.barrier()
    return FitResult(run.model, run.history, run_dir, False, steps_per_epoch=per_epoch, resumed_from=start)


def _finish(run: _Run) -> None:
    """A finished run's last files: the model (when no epoch saved one) and the pictures
    of the model kept. Also made by a resume of a finished run that lacks them (a process
    killed after its last checkpoint)."""
    if not (run.run_dir / "model" / "model.safetensors").exists():
        save_model(run.model, run.run_dir / "model")
    best_model = VAE.from_pretrained(run.run_dir / "model", device=run.device)
    data = run.data
    with _unvalidated():  # a model made of NaNs still gets its (blank) pictures
        save_run_pictures(best_model, data.test if data.test.shape[0] else data.val, run.run_dir, run.history,
                          seed=run.tc.seed)


def _resume_command(run: _Run) -> str:
    """The command that continues ``run``: under torchrun, with as many processes (a
    checkpoint resumes on the world size that wrote it)."""
    if run.world == 1:
        return f"vaekit train --resume {run.run_dir}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", run.world))
    nodes = f" --nnodes={run.world // local}" if local < run.world else ""
    return f"torchrun --nproc_per_node={local}{nodes} -m vaekit train --resume {run.run_dir}"


def _autocast(run: _Run):
    """The context the training steps run in: bf16 autocast for ``train.amp="bf16"``."""
    if run.tc.amp == "bf16":
        return torch.autocast(run.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _tf32(run):
    """CUDA's float32 matrix products and convolutions on TF32 tensor cores while the
    training loop runs, for ``train.amp="tf32"`` (the flags are restored after; the
    validation inside the loop runs in float32 regardless: vaekit.latents._evaluating)."""
    return tf32_flags(True) if run.tc.amp == "tf32" else contextlib.nullcontext()


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



def __getattr__(name: str):
    # epochs_for_budget lives in vaekit.budget (which times this module's loop, so imports
    # it); still importable from here, as before it moved
    if name == "epochs_for_budget":
        from .budget import epochs_for_budget

        return epochs_for_budget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
