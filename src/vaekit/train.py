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
from .batching import BatchIterator, block_steps, mix_seed
from .config import RunConfig, TrainConfig
from .checks import check_int, check_number
from .data import check_images, load_dataset
from .fast import StaticStep, grad_norm, static_step_supported
from .io import save_checkpoint, save_model, write_json
from .models import VAE
from .plots import save_run_pictures
from .runs import read_for_resume, restore, rng_state, write_metrics
from .objectives import ObjectiveConfig, beta_schedule, objective_loss

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


def _adam(model: nn.Module, tc: TrainConfig, *, captured_on: torch.device | None = None) -> torch.optim.Adam:
    """Adam, fused where this PyTorch has the fused kernel for the device (on a CPU it
    takes about a third of the unfused step's time: docs/benchmarks.md; in a captured
    step the kernel itself skips a non-finite step, with no copies to undo it:
    ``vaekit.fast``). ``captured_on``: the device of a CUDA-graph-captured step, which
    reads the learning rate from a tensor there."""
    kw = dict(lr=tc.lr, weight_decay=tc.weight_decay)
    if captured_on is not None:
        kw.update(lr=torch.tensor(tc.lr, device=captured_on), capturable=True)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(model.parameters(), **kw)


def _use_static(tc, oc, model, device, distributed: bool) -> bool:
    if tc.fast == "off" or distributed or not static_step_supported(model, oc):
        return False
    return tc.fast in ("static", "compile") or device.type == "cuda"


def _fold(static: StaticStep, sums: torch.Tensor, bad_run: int, skipped: int) -> tuple[int, int]:
    """Move the static step's device counters into the loop's (one sync)."""
    sums += static.sums
    static.sums.zero_()
    n_bad, run = int(static.skipped), int(static.bad_run)
    static.skipped.zero_()
    return (run if n_bad else bad_run), skipped + n_bad


_SMALL_STEP = 2e7
# Steps between reads of the device counters (progress bar, non-finite streaks).
_FOLD_EVERY = 50


def _work_per_step(model: nn.Module, batch_size: int) -> float:
    """Multiply-adds of one forward pass, roughly: parameters times batch size."""
    return sum(p.numel() for p in model.parameters()) * batch_size


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate at ``step``: a pure function of the step."""
    if config.lr_schedule == "cosine" and total_steps > 0:
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


class _Objective(nn.Module):
    """The objective as a module, so that DistributedDataParallel sees every forward.

    The reparameterisation noise is drawn for ``K`` steps at once (one kernel instead of one
    per step, as the batches are; ``K = vaekit.batching.block_steps`` of one step's combined
    draw, 32 but for big draws): steps ``i*K`` to
    ``i*K + K - 1`` take their noise from one draw for full combined batches by a generator
    seeded by ``(seed, i)``; step ``s`` takes its part ``s - i*K``, sliced to this process's
    examples (a short last batch: to the first rows). A run on W processes then draws
    exactly the noise of one process with the combined batch, and a resumed run the noise
    of the uninterrupted one.
    """

    def __init__(self, model: VAE, config: ObjectiveConfig, dataset_size: int, batches: BatchIterator,
                 seed: int, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.dataset_size = dataset_size
        self._batches = batches
        self._seed = seed
        self._gen = torch.Generator(device=device)
        self._block_key, self._block = None, None

    def noise(self, step: int, shape) -> torch.Tensor:
        """Standard-normal noise of ``shape`` (batch in dim -2) for this process's slice of
        the combined batch of ``step``."""
        offset, size, _ = self._batches.last_span
        full = self._batches.batch_size * self._batches.world_size
        k = block_steps(math.prod(shape[:-2]) * full * shape[-1])
        key = (step // k, k, tuple(shape[:-2]), shape[-1])
        if key != self._block_key:
            self._gen.manual_seed(mix_seed(self._seed, _NOISE_STREAM, step // k))
            self._block = torch.randn(k, *shape[:-2], full, shape[-1], generator=self._gen, device=self._gen.device)
            self._block_key = key
        return self._block[step % k][..., offset : offset + size, :]

    def forward(self, x, step: int):
        return objective_loss(self.model, x, self.config, step, dataset_size=self.dataset_size,
                              noise=lambda shape: self.noise(step, shape))


_NOISE_STREAM = 0x6E6F6973  # keeps the noise seeds apart from the data-order seeds
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
    for i in range(0, x.shape[0], batch_size):
        t = elbo_terms(model, x[i : i + batch_size], generator=generator)
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
    threads = torch.get_num_threads()
    try:
        return _fit(config, run_dir, resume, epochs)
    finally:
        torch.set_num_threads(threads)


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


def _fit(config: RunConfig, run_dir, resume: bool, extend_to: int | None = None) -> FitResult:
    run_dir = Path(run_dir)
    rank, local_rank, world = _dist_info()
    distributed = world > 1
    ckpt_path = run_dir / "checkpoint.pt"
    state = None
    if resume:
        config, state = read_for_resume(run_dir, progress=config.train.progress, extend_to=extend_to)
    tc, oc = config.train, config.objective
    device = resolve_device(tc.device)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    data = load_dataset(config.data)
    _check_training_data(data, config.model.likelihood)
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
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if _use_static(tc, oc, model, device, distributed) and device.type == "cuda":
        opt = _adam(model, tc, captured_on=device)
    else:
        opt = _adam(model, tc)
    val_x = data.val.to(device)
    steps_per_epoch = len(batches)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps) if tc.epochs else tc.max_steps
    epochs = tc.epochs if tc.epochs else math.ceil(total_steps / steps_per_epoch)

    # Only draws outside the step- and epoch-keyed streams come from here (none in vaekit itself).
    torch.manual_seed(tc.seed * 1000 + 17 + rank)
    step, epoch, history = 0, 0, []
    best, since_best, skipped, bad_run = math.inf, 0, 0, 0
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, rec, kl, n over the epoch
    if state is not None:
        restored = restore(state, ckpt_path, model=model, optimizer=opt, batches=batches, device=device,
                           rank=rank, world=world)
        step, epoch, history, sums = restored["step"], restored["epoch"], restored["history"], restored["sums"]
        best, since_best, skipped = restored["best"], restored["since_best"], restored["skipped"]
    static = None
    if _use_static(tc, oc, model, device, distributed):
        compiled = tc.fast == "compile"
        static = StaticStep(model, opt, batch_size=tc.batch_size, grad_clip=tc.grad_clip, amp=tc.amp == "bf16",
                            compile=compiled)
    inner = objective.module if distributed else objective
    is_main = rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        if extend_to is not None:  # first the checkpoint: a plain resume reads its config
            save_checkpoint(ckpt_path, {**{k: v for k, v in state.items() if k not in ("format", "format_version")},
                                        "config": config.to_dict()})
        write_json(run_dir / "config.json", {"vaekit_version": __version__, **config.to_dict()})
    writer = _tensorboard(run_dir) if is_main else None

    def checkpoint() -> None:
        nonlocal bad_run, skipped
        if static is not None:
            bad_run, skipped = _fold(static, sums, bad_run, skipped)
        rng = rng_state(device)
        rngs, all_sums = [rng], sums.clone()
        if distributed:
            torch.distributed.all_reduce(all_sums)
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
        if is_main:
            save_checkpoint(ckpt_path, {
                "config": config.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "epoch": epoch, "history": history, "best": best, "since_best": since_best,
                "skipped": skipped, "sums": all_sums.cpu(), "batches": batches.state_dict(), "rng": rngs,
                "world_size": world, "vaekit_version": __version__,
            })
        if distributed:
            torch.distributed.barrier()

    amp = torch.autocast(device.type, dtype=torch.bfloat16) if tc.amp == "bf16" else contextlib.nullcontext()
    progress = _progress(tc.progress and is_main, total_steps, step)
    interrupted = stop_all = False
    lr, beta = lr_at(step, total_steps, tc), oc.beta
    t0 = time.perf_counter()
    with _Stop() as stop, _unvalidated():
        # A run resumed after it stopped early is finished: it does not train on.
        while (epoch < epochs and step < total_steps and not interrupted
               and not (tc.early_stopping and since_best >= tc.early_stopping)):
            model.train()
            if batches.position == 0:
                batches.set_epoch(epoch)
            for x in batches:
                lr = lr_at(step, total_steps, tc)
                if static is not None and x.shape[0] == tc.batch_size:
                    beta = beta_schedule(oc.beta_schedule, step, beta=oc.beta, warmup_steps=oc.warmup_steps,
                                         cycle_steps=oc.cycle_steps, ratio=oc.cycle_ratio)
                    static.run(x, inner.noise(step, (x.shape[0], config.model.latent_dim)), lr, beta)
                    if step % _FOLD_EVERY == _FOLD_EVERY - 1:  # the only sync of the static path
                        bad_run, skipped = _fold(static, sums, bad_run, skipped)
                else:
                    for g in opt.param_groups:
                        if isinstance(g["lr"], torch.Tensor):  # capturable Adam: keep the tensor
                            g["lr"].fill_(lr)
                        else:
                            g["lr"] = lr
                    with amp:
                        out = objective(x, step)
                    opt.zero_grad(set_to_none=True)
                    loss = out.loss
                    if distributed:
                        # DDP averages the ranks' gradients: scaled by its share of the combined
                        # batch, each rank's mean makes that average the combined batch's mean
                        # (ranks get unequal slices of a partial last batch).
                        _, size, combined = batches.last_span
                        loss = loss * (size * world / combined)
                    loss.backward()
                    gnorm = grad_norm(model.parameters(), tc.grad_clip)
                    beta = out.beta
                    ok = torch.isfinite(out.loss) & torch.isfinite(gnorm)
                    if distributed:  # every rank must take the same decisions: step, and stop
                        flags = torch.stack([ok.to(torch.int32), torch.tensor(int(not stop.signum), device=device,
                                                                              dtype=torch.int32)])
                        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
                        ok, stop_all = flags[0], not bool(flags[1])
                    if bool(ok):
                        opt.step()
                        bad_run = 0
                        b = x.shape[0]
                        sums[:3] += torch.stack([out.loss.detach(), out.reconstruction.detach(), out.kl.detach()]) * b
                        sums[3] += b
                    else:
                        skipped += 1
                        bad_run += 1
                    if static is not None:
                        static.resync()
                if bad_run >= tc.max_bad_steps:
                    progress.close()
                    raise TrainingDiverged(
                        f"{bad_run} non-finite steps in a row (at step {step}); stopped. "
                        f"The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'not written yet'}"
                    )
                step += 1
                progress.update(1)
                if step % _FOLD_EVERY == 0 and sums[3] > 0:
                    progress.set_postfix(loss=f"{float(sums[0] / sums[3]):.2f}", rec=f"{float(sums[1] / sums[3]):.2f}",
                                         kl=f"{float(sums[2] / sums[3]):.2f}", beta=f"{beta:.3g}")
                stopping = stop_all if distributed else bool(stop.signum)
                if step >= total_steps:
                    break
                if batches.position == len(batches):
                    # The epoch's last batch: the end-of-epoch block below checkpoints and
                    # honours a stop; a checkpoint here would resume into the next epoch
                    # and skip this epoch's validation, metrics and best model.
                    continue
                if stopping:
                    interrupted = True
                    checkpoint()
                    break
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    checkpoint()
            if interrupted:
                break
            # -- end of epoch ---------------------------------------------------------------
            if static is not None:
                bad_run, skipped = _fold(static, sums, bad_run, skipped)
                if bad_run >= tc.max_bad_steps:
                    raise TrainingDiverged(f"{bad_run} non-finite steps in a row (at step {step}); stopped")
            if distributed:
                torch.distributed.all_reduce(sums)
            n = float(sums[3]) or math.nan  # every step skipped: no mean to report
            row = {"epoch": epoch + 1, "step": step, "split": "train", "loss": float(sums[0]) / n,
                   "reconstruction": float(sums[1]) / n, "kl": float(sums[2]) / n,
                   "elbo": -(float(sums[1]) + float(sums[2])) / n, "beta": beta, "lr": lr,
                   "skipped": skipped, "seconds": round(time.perf_counter() - t0, 3)}
            val_gen = torch.Generator(device=device).manual_seed(mix_seed(tc.seed, _VAL_STREAM, epoch))
            val = _validate(model, val_x, max(tc.batch_size, 500), val_gen)
            vrow = {**row, "split": "val", **val}
            history += [row, vrow]
            epoch += 1
            sums.zero_()
            batches.set_epoch(epoch)
            improved = val["loss"] < best
            if improved:
                best, since_best = val["loss"], 0
            else:
                since_best += 1
            if is_main:
                if improved:
                    save_model(model, run_dir / "model")
                write_metrics(run_dir / "metrics.csv", history)
                if writer is not None:
                    for split, r in (("train", row), ("val", vrow)):
                        for k in ("loss", "reconstruction", "kl"):
                            writer.add_scalar(f"{split}/{k}", r[k], epoch)
            checkpoint()
            if tc.early_stopping and since_best >= tc.early_stopping:
                break
            if (stop_all if distributed else stop.signum) and epoch < epochs and step < total_steps:
                interrupted = True
                break
    progress.close()
    if interrupted:
        if is_main:
            why = f"signal {stop.signum}" if stop.signum else "a signal to another rank"
            print(f"vaekit: interrupted by {why}; checkpoint saved to {ckpt_path}; "
                  f"continue with: vaekit train --resume {run_dir}", flush=True)
        return FitResult(model, history, run_dir, True)
    if is_main:
        if not (run_dir / "model" / "model.safetensors").exists():
            save_model(model, run_dir / "model")
        best_model = VAE.from_pretrained(run_dir / "model", device=device)
        with _unvalidated():  # a model made of NaNs still gets its (blank) pictures
            save_run_pictures(best_model, data.test if data.test.shape[0] else data.val, run_dir, history, seed=tc.seed)
        if writer is not None:
            writer.close()
    if distributed:
        torch.distributed.barrier()
    return FitResult(model, history, run_dir, False)


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
