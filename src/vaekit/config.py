"""Config is data: one dataclass per concern, gathered in :class:`RunConfig`.

``ModelConfig`` (:mod:`vaekit.model_config`, re-exported by :mod:`vaekit.models`),
``DataConfig`` (:mod:`vaekit.data`) and ``ObjectiveConfig`` (:mod:`vaekit.objectives`) live
beside the code they configure; ``TrainConfig`` and the run as a whole live here. Each
validates itself in ``__post_init__`` with errors that name the field; a run's resolved
configuration is saved as JSON, and the command line's flags are a view of these fields
(:mod:`vaekit.flags`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .checks import MAX_SEED, in_section
from .data import DataConfig
from .models import ModelConfig
from .objectives import ObjectiveConfig

__all__ = ["TrainConfig", "RunConfig", "section_from_dict", "GROUPS", "LR_SCHEDULES", "AMP_MODES", "FAST_MODES",
           "MAX_THREADS", "MAX_COUNT"]

LR_SCHEDULES = ("constant", "cosine")
AMP_MODES = ("none", "bf16", "tf32")
FAST_MODES = ("auto", "static", "compile", "off")
MAX_THREADS = 1024  # more CPU threads than any machine vaekit runs on has; OpenMP fails on far more
MAX_COUNT = 2**31 - 1  # the most epochs, steps or examples a batch a setting may count


def _need(cond: bool, name: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"{name} must be {expected}, got {got!r}")  # TrainConfig.: in_section


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (0: no limit).
        batch_size: examples per step (per process under torchrun).
        lr: Adam learning rate.
        lr_schedule: ``constant`` or ``cosine`` (decay to 0 over the run).
        weight_decay: Adam weight decay.
        grad_clip: clip the global gradient norm to this (0: off).
        seed: seeds the weights, the data order and the sampling noise.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        early_stopping: stop after this many epochs without a better validation ELBO
            (0: off).
        checkpoint_every: also checkpoint every this many steps (0: at epoch ends only).
        max_bad_steps: stop after this many non-finite steps in a row (a non-finite step
            is skipped: it changes no weight). The static step on CUDA counts them on the
            device and is read every 50 steps, so it may stop up to 49 steps later.
        amp: the training steps' arithmetic: ``none`` (float32 as PyTorch's flags have it:
            by default strict float32 matrix products, TF32 cuDNN convolutions), ``bf16``
            (bfloat16 autocast for the forward pass) or ``tf32`` (CUDA only: matrix
            products and convolutions on TF32 tensor cores; validation stays in float32).
        num_threads: CPU threads for PyTorch (0: automatic: one thread for small
            models, whose steps run faster single-threaded, else PyTorch's default).
        fast: ``auto`` (the static step on CUDA, captured in a CUDA graph, where the
            objective allows it), ``static`` (that step everywhere; uncaptured off CUDA),
            ``compile`` (that step with its forward pass and loss compiled by
            ``torch.compile``: the fastest CPU step, after a compilation of some seconds,
            needs a C++ compiler; on CUDA the compiled step is captured as well, which
            leaves fewer, fused kernels in the graph) or ``off`` (the eager step). See
            :mod:`vaekit.fast`. Under ``auto`` a step that cannot be captured is said on
            stderr and the run goes on with the eager step; under ``static`` or
            ``compile`` (or ``graph_steps`` > 1) a step that cannot be compiled or
            captured raises ``vaekit.fast.FastPathError`` naming the setting that runs it
            without, and ``static`` or ``compile`` for a run that the static step cannot
            serve (another objective, free bits, capacity, data-parallel) is refused with
            a ``ValueError``, as is ``graph_steps`` > 1 for such a run.
        graph_steps: steps per call of the static step (``vaekit.fast.StaticStep.run_block``):
            on CUDA that many steps are captured in one graph, and the host issues one
            replay for them instead of one per step (for small models, whose steps take
            the GPU less time than the host's work for a step); elsewhere the same steps
            run uncaptured. The same run either way; 1: a step at a time.
        adam_kernel: the static step's tail (gradient norm, clipping, the non-finite
            rule, Adam, the loss sums) as three Triton kernels (:mod:`vaekit.adam_tail`)
            instead of about 20 PyTorch kernels, for CUDA with Triton; the same values up to
            float rounding (tested). With ``amp="bf16"`` the tail also keeps bfloat16
            copies of the weights (those of linear and convolution layers, when they are
            all the model has), which the forward pass reads instead of casting each
            weight in each step. Not measured on a GPU yet, so off by default.
        progress: show a tqdm progress bar.
    """

    epochs: int = 20
    max_steps: int = 0
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    early_stopping: int = 0
    checkpoint_every: int = 0
    max_bad_steps: int = 10
    amp: str = "none"
    num_threads: int = 0
    fast: str = "auto"
    graph_steps: int = 1
    adam_kernel: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        with in_section("TrainConfig"):
            self._check()

    def _check(self) -> None:
        for name in ("epochs", "max_steps", "early_stopping", "checkpoint_every", "num_threads", "seed"):
            v = getattr(self, name)
            _need(_is_int(v) and v >= 0, name, "an integer >= 0", v)
        for name in ("epochs", "max_steps", "early_stopping", "checkpoint_every"):  # counts, bounded as batch_size
            v = getattr(self, name)
            _need(v <= MAX_COUNT, name, f"an integer in [0, {MAX_COUNT}]", v)
        _need(self.seed <= MAX_SEED, "seed", f"an integer in [0, {MAX_SEED}]", self.seed)
        _need(self.num_threads <= MAX_THREADS, "num_threads", f"an integer in [0, {MAX_THREADS}]", self.num_threads)
        _need(self.epochs > 0 or self.max_steps > 0, "epochs", "> 0 (or max_steps > 0)", self.epochs)
        _need(_is_int(self.batch_size) and 0 < self.batch_size <= MAX_COUNT, "batch_size",
              f"an integer in [1, {MAX_COUNT}]", self.batch_size)
        _need(_is_int(self.max_bad_steps) and self.max_bad_steps > 0, "max_bad_steps", "a positive integer", self.max_bad_steps)
        _need(_is_num(self.lr) and self.lr > 0, "lr", "a finite number > 0", self.lr)
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            _need(_is_num(v) and v >= 0, name, "a finite number >= 0", v)
        _need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        _need(self.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}", self.amp)
        _need(self.fast in FAST_MODES, "fast", f"one of {', '.join(FAST_MODES)}", self.fast)
        _need(_is_int(self.graph_steps) and 1 <= self.graph_steps <= 1024, "graph_steps", "an integer in [1, 1024]",
              self.graph_steps)
        _need(self.graph_steps == 1 or self.fast != "off", "graph_steps",
              "1 with fast 'off' (blocks of steps are the static step's)", self.graph_steps)
        _need(isinstance(self.progress, bool), "progress", "true or false", self.progress)
        _need(isinstance(self.adam_kernel, bool), "adam_kernel", "true or false", self.adam_kernel)
        _need(not self.adam_kernel or self.fast != "off", "adam_kernel",
              "false with fast 'off' (the Triton tail is the static step's)", self.adam_kernel)
        _need(
            isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                              or re.fullmatch(r"cuda:[0-9]+", self.device) is not None),
            "device", "auto, cpu, cuda or cuda:N", self.device,
        )


GROUPS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "objective": ObjectiveConfig}


@dataclass
class RunConfig:
    """Everything a run needs: one dataclass per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        for name, klass in GROUPS.items():
            section = getattr(self, name)
            if not isinstance(section, klass):  # RunConfig(model={...}) failed only deep inside fit
                raise TypeError(f"RunConfig.{name} must be a {klass.__name__} (RunConfig.from_dict takes plain "
                                f"mappings), got {type(section).__name__}")

    def check(self) -> "RunConfig":
        """Check every section again, as its constructor did, and return the config: a field
        assigned after the config was made (``config.train.lr = -1.0``) is refused by name
        here, where it would otherwise fail deep inside a run or change its results."""
        self.__post_init__()
        for name in GROUPS:
            getattr(self, name).__post_init__()
        return self

    def to_dict(self) -> dict:
        out = {}
        for name in GROUPS:
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a run config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(GROUPS) - {"vaekit_version"})
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(GROUPS)}")
        return cls(**{name: section_from_dict(klass, d.get(name, {}), name) for name, klass in GROUPS.items()})


def section_from_dict(klass, d, name: str):
    """Build config dataclass ``klass`` from a mapping, refusing unknown keys by name."""
    if not isinstance(d, dict):
        raise TypeError(f"config section {name!r} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(klass)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown key(s) in config section {name!r}: {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return klass(**d)
