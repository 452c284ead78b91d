"""What one training run of :func:`vaekit.train.fit` wires together, and the state its
loop shares.

:func:`_build` turns a :class:`~vaekit.config.RunConfig` (and, on a resume, its
checkpoint) into a :class:`_Run`: the device (and the process group under ``torchrun``),
the data (checked against the likelihood before anything is written), the model, the
batch iterator, the objective, the optimiser and the static step where it serves; under
``torchrun``, every rank's load checked against rank 0's (:func:`_agree`). The
loop (:mod:`vaekit.train`) and the steps (:mod:`vaekit.steps`) read and update the run's
counters; nothing here writes to the run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .adam_tail import adam_tail_unsupported
from .batching import BatchIterator, fits_on_device, mix_seed
from .checks import _holds_for_all, slow_bf16_note
from .config import RunConfig, TrainConfig
from .data import FILE_DATASETS, check_images, load_dataset
from .fast import StaticStep
from .io import BackgroundWriter
from .models import VAE
from .runs import _sha256, data_record, restore
from .steps import _Objective, _adam, _use_static, lr_at

# The rest is fit's inside: its names may change between versions.
__all__ = ["resolve_device"]  # also vaekit.train.resolve_device


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


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


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
        elif likelihood == "discretized_logistic" and not _levels(t, 255):
            # (binarized data are levels 0 and 255/255; the digits, 17 levels k/16, are not)
            advice = ("they are 17 levels k/16: use binarize='static', or another likelihood" if _levels(t, 16) else
                      "use another likelihood (gaussian, continuous_bernoulli), or 8-bit images")
            raise ValueError(f"{data.name} {split} data must be 8-bit levels k/255 in [0, 1] for "
                             f"likelihood='discretized_logistic'; {advice}")


def _levels(t: torch.Tensor, n: int) -> bool:
    """Whether every value of ``t`` is a level k/n in [0, 1]."""
    return _holds_for_all(t, lambda b: ((b * n - torch.round(b * n)).abs() < 1e-3) & (b >= 0) & (b <= 1))


@dataclasses.dataclass(eq=False)
class _Run:
    """What one training run wires together, and the loop's counters (with the weights,
    what a checkpoint holds): the state that the loop's pieces, in :mod:`vaekit.train`
    and :mod:`vaekit.steps` (the three kinds of step), share."""

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
    t0: float = 0.0  # time.perf_counter() when the run would have started, had it not stopped
    data_seen: dict = dataclasses.field(default_factory=dict)  # runs.data_record of the run's three splits, once
    # Where the checkpoints are written: in the loop unless fit hands them to a thread
    writes: BackgroundWriter = dataclasses.field(default_factory=lambda: BackgroundWriter(False))
    snapshot: dict | None = None  # the last checkpoint's host copy, written over by the next
    notes: list = dataclasses.field(default_factory=list)  # said on stderr once the run's checks have passed

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


def _error_classes() -> dict:
    """The exceptions a rank's failure is raised as on every rank (by the name of the first
    of them in its class's MRO), so that the CLI maps it to the same status everywhere."""
    from .flags import UsageError
    from .fast import FastPathError
    from .io import CheckpointError

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError: 2.5 on
    return {c.__name__: c for c in (UsageError, CheckpointError, FastPathError, FileNotFoundError, PermissionError,
                                    OSError, ValueError, TypeError, oom, MemoryError)}


def _weights_hash(weights: dict) -> str:
    """The first 16 hex digits of a SHA-256 of a state dict's names and its tensors' hashes."""
    each = "".join(f"{key}:{_sha256(value)};" for key, value in weights.items() if isinstance(value, torch.Tensor))
    return hashlib.sha256(each.encode()).hexdigest()[:16]


def _facts(run: _Run, state: dict | None) -> dict:
    """What every rank must have loaded alike: the config (but where the data are, which
    their hashes check, and settings taken from the data), the data's record and, on a
    resume, where the checkpoint stands and a hash of its weights."""
    config = run.config.to_dict()
    config["data"].pop("data_dir")
    config["model"].pop("input_shape")
    config["train"].pop("progress")
    resume = None if state is None else (state["step"], state["epoch"], sorted(state["batches"].items()),
                                         _weights_hash(state["model"]))
    return {"resume": resume, "config": config, "data": run.data_seen, "from": run.data.name}


def _ranks(ranks: list) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _agree(run: _Run | None, state: dict | None, failed: Exception | None, rank: int, world: int) -> None:
    """Under torchrun, before DDP's first collective: every rank's load (``failed``: its
    error) gathered in one ``all_gather_object``. An error on any rank is raised on every
    rank (the lowest failing rank's, named when it is not rank 0's), and so is a rank
    whose config, data or checkpoint differ from rank 0's: it would train on other
    examples, or wait in a collective the others never enter."""
    import torch.distributed as dist

    if failed is not None:
        mine = ("error", [c.__name__ for c in type(failed).__mro__], str(failed))
    else:
        mine = ("ok", _facts(run, state))
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    errors = [(r, got) for r, got in enumerate(everyone) if got[0] == "error"]
    if errors:
        first, (_, names, text) = errors[0]
        if first == 0 and failed is not None and (type(failed).__name__, str(failed)) == (names[0], text):
            raise failed  # rank 0's error, met here too: as it was
        classes = _error_classes()
        cls = next((classes[n] for n in names if n in classes), None)
        text = (text or names[0]) if cls else f"{names[0]}: {text}"
        raise (cls or RuntimeError)(text if first == 0 else f"rank {first}: {text}") from (
            failed if rank == first else None)
    facts = [got[1] for got in everyone]
    for what, advice in (("resume", "every rank must read the same checkpoint.pt"),
                         ("config", "every rank must be given the same flags and config file"),
                         ("training", "every rank must read the same files"),
                         ("validation", "every rank must read the same files")):
        keys = {"training": ("examples", "shape", "hash"), "validation": ("val_examples", "val_hash")}.get(what, ())
        ranks = [r for r in range(1, world) if (facts[r][what] != facts[0][what] if not keys else
                                                any(facts[r]["data"].get(k) != facts[0]["data"].get(k) for k in keys))]
        if ranks:
            also = "" if len(ranks) == 1 else \
                f"; {_ranks(ranks[1:])} {'differs' if len(ranks) == 2 else 'differ'} from rank 0 too"
            raise ValueError(f"{_differs(what, ranks[0], facts[ranks[0]], facts[0])}{also}: {advice}")


def _differs(what: str, r: int, theirs: dict, ours: dict) -> str:
    """How rank ``r``'s load (:func:`_facts`) differs from rank 0's in ``what``."""
    if what == "resume":
        def at(resume) -> str:
            if resume is None:
                return "starts the run again from the start (no checkpoint.pt)"
            return f"resumes from step {resume[0]} ({resume[1]} epoch{'' if resume[1] == 1 else 's'} done)"

        a, b = theirs["resume"], ours["resume"]
        if a is not None and b is not None and a[:2] == b[:2]:
            return (f"rank {r} resumes from another checkpoint than rank 0 (at the same step {a[0]}, but with other "
                    f"weights or data position)")
        return f"rank {r} {at(a)} where rank 0 {at(b)}"
    if what == "config":
        changes = [f"{section}.{key} {theirs['config'][section].get(key)!r} vs {value!r}"
                   for section, fields in ours["config"].items() for key, value in fields.items()
                   if theirs["config"][section].get(key) != value]
        return (f"rank {r} was given another configuration than rank 0 ({'; '.join(changes[:3])}"
                f"{'; ...' if len(changes) > 3 else ''})")

    def told(rank: int, facts: dict) -> str:
        d = facts["data"]
        if what == "training":
            return (f"rank {rank}: {d['examples']:,} examples of shape {tuple(d['shape'])}, hash {d['hash']}, "
                    f"from {facts['from']}")
        return f"rank {rank}: {d.get('val_examples', 0):,} examples, hash {d.get('val_hash')}"

    return f"rank {r} loaded other {what} data than rank 0 ({told(r, theirs)}; {told(0, ours)})"


_GLOBAL_STREAM = 0x676C6F62  # the global generators' seed: apart from epoch 17's data order (seed, 17, 0)


def _build(config: RunConfig, run_dir: Path, state: dict | None, *, resumed: bool = False) -> _Run:
    """Device, data, model, batches, objective, optimiser and fast step of a run, and its
    counters from ``state`` (a checkpoint) when it resumes (``resumed``: also a resume
    without a checkpoint, which starts again with the saved config)."""
    rank, local_rank, world = _dist_info()
    tc = config.train
    if resumed and tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {tc.device!r} in the saved config of {run_dir}, but no CUDA device is "
                         f"available: a resumed run keeps its device (--resume takes no --device); resume it on a "
                         f"machine with CUDA")
    device = resolve_device(tc.device)
    if tc.amp == "tf32" and device.type != "cuda":  # the metrics would name an arithmetic not used
        raise ValueError(f"train.amp='tf32' is CUDA's arithmetic (TF32 tensor cores); on {device.type} the steps "
                         f"would run in float32: use amp='none' there, or 'bf16'")
    # said once the run's checks have passed: a refused run says its refusal alone
    slow = slow_bf16_note(device, "train.amp='bf16'") if tc.amp == "bf16" and rank == 0 else None
    if world == 1:
        run = _wire(config, run_dir, state, device, rank, world)
        _say_notes(run, slow)
        return run
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run, failed = _wire(config, run_dir, state, device, rank, world), None
    except Exception as e:  # told to every rank below: the others would wait for this one in DDP's first collective
        run, failed = None, e
    _agree(run, state, failed, rank, world)
    _say_notes(run, slow)
    from torch.nn.parallel import DistributedDataParallel as DDP

    # after the restore: DDP gives every rank rank 0's weights, which _agree found the same
    run.objective = DDP(run.objective, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def _wire(config: RunConfig, run_dir: Path, state: dict | None, device: torch.device, rank: int,
          world: int) -> _Run:
    """The run on ``device`` (the objective not yet wrapped in DDP under torchrun)."""
    tc, oc = config.train, config.objective
    data = load_dataset(config.data)
    _check_training_data(data, config.model.likelihood)
    grey = (rank == 0 and config.model.likelihood == "bernoulli" and config.data.binarize == "none"
            and not _holds_for_all(data.train, lambda b: (b == 0) | (b == 1)))
    if config.data.dataset in FILE_DATASETS:
        # the run records where its data are, whatever directory it is evaluated from later
        where = Path(config.data.data_dir or Path("data") / config.data.dataset).expanduser().resolve()
        config.data = dataclasses.replace(config.data, data_dir=str(where))
    if tc.early_stopping and data.val.shape[0] == 0:
        raise ValueError(f"train.early_stopping={tc.early_stopping} needs validation examples, and "
                         f"data.val_size={config.data.val_size!r} leaves none")
    config.model = dataclasses.replace(config.model, input_shape=tuple(data.train.shape[1:]))
    torch.manual_seed(tc.seed)
    model = VAE(config.model).to(device)
    model._data_parallel = world > 1  # every rank takes the same training forwards (decoder_mse's all_reduce)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    elif device.type == "cpu" and _work_per_step(model, tc.batch_size) < _SMALL_STEP:
        # A tiny step is slower on several threads: they spin on the OpenMP barrier and
        # fight other processes for the cores (measured: see docs/benchmarks.md).
        torch.set_num_threads(1)
    # A batch of one has no total correlation to estimate with the stratified estimator.
    least = 2 if oc.name == "beta_tcvae" and oc.tc_estimator == "stratified" else 1
    if tc.batch_size < least:
        raise ValueError(f"train.batch_size must be at least 2 for objective.tc_estimator='stratified', "
                         f"got {tc.batch_size}; use objective.tc_estimator='mws' for batches of one")
    batches = BatchIterator(
        # A last combined batch too small to give each rank `least` examples is skipped
        # (fewer than `least * world` examples an epoch).
        data.train, tc.batch_size, shuffle=True,
        drop_last=0 < data.train.shape[0] % (tc.batch_size * world) < least * world,
        dynamic_binarize=config.data.binarize == "dynamic", seed=tc.seed, device=device,
        rank=rank, world_size=world,
    )
    objective = _Objective(model, oc, data.train.shape[0], batches, tc.seed, device)
    static = _use_static(tc, oc, model, device, world > 1)
    opt = _adam(model, tc, captured_on=device if static and device.type == "cuda" else None)
    if tc.adam_kernel:
        why = ("this run takes the eager step (data-parallel, fast='auto' off CUDA, or an objective the static "
               "step does not serve)") if not static else adam_tail_unsupported(opt, model.parameters())
        if why:
            raise ValueError(f"train.adam_kernel=True (the static step's tail as Triton kernels) cannot serve this "
                             f"run: {why}; use adam_kernel=False")
    steps_per_epoch = len(batches)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps) if tc.epochs else tc.max_steps
    val_x = data.val.to(device) if fits_on_device(data.val, device) else data.val  # else a batch at a time
    run = _Run(config, run_dir, device, rank, world, data, val_x, model, batches, objective, opt, total_steps,
               epochs=tc.epochs if tc.epochs else math.ceil(total_steps / steps_per_epoch),
               sums=torch.zeros(4, dtype=torch.float64, device=device), data_seen=data_record(data.train, data.val, data.test))

    # Only draws outside the step- and epoch-keyed streams come from here (none in vaekit itself).
    torch.manual_seed(mix_seed(tc.seed, _GLOBAL_STREAM, rank))
    if state is not None:
        for key, value in restore(state, run.ckpt_path, model=model, optimizer=opt, batches=batches, device=device,
                                  rank=rank, world=world, data_dir=config.data.data_dir,
                                  record=run.data_seen).items():
            setattr(run, key, value)
    if static:  # after the restore: the step's backups copy the optimiser's state
        run.static = StaticStep(model, opt, batch_size=tc.batch_size, grad_clip=tc.grad_clip, amp=tc.amp == "bf16",
                                compile=tc.fast == "compile", adam_kernel=tc.adam_kernel)
    run.lr, run.beta = lr_at(run.step, total_steps, tc), oc.beta
    if grey:
        run.notes.append(f"the Bernoulli likelihood on grey levels (data.binarize 'none', {data.name}) is no "
                         f"normalised density: the ELBO it reports bounds no log-likelihood. Binarize them ('static' "
                         f"or 'dynamic') or use likelihood 'continuous_bernoulli'")
    return run


def _say_notes(run: _Run, *more: str | None) -> None:
    """The run's notes on stderr (rank 0's), once its checks have passed."""
    for note in (*more, *run.notes):
        if note:
            print(f"vaekit: {note}", file=sys.stderr, flush=True)
