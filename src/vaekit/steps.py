"""One training step of :func:`vaekit.train.fit`, three ways, and what they share.

* the eager step (:func:`_eager_step`): any objective, any batch, data-parallel; the
  objective is the module :class:`_Objective`, so that DistributedDataParallel sees
  every forward pass, and it draws the reparameterisation noise;
* the static step (:func:`_static_step`, :class:`vaekit.fast.StaticStep`): the plain
  ELBO on full batches, captured in a CUDA graph or compiled, no host sync in the epoch;
* a block of static steps (:func:`_static_block`, ``TrainConfig(graph_steps=K)``): K
  steps a call, one CUDA graph of K steps.

Each takes the run (``vaekit.wiring._Run``) and updates its counters. The learning rate
is a pure function of the step (:func:`lr_at`), as are the KL weight and the noise.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from .batching import BatchIterator, block_steps, mix_seed
from .config import TrainConfig
from .fast import FastPathError, grad_norm, set_lr, static_step_supported
from .models import VAE
from .objectives import ObjectiveConfig, objective_loss

if TYPE_CHECKING:
    from .train import _Stop
    from .wiring import _Run

# The rest is fit's inside: its names may change between versions.
__all__ = ["lr_at"]  # also vaekit.train.lr_at


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
    """Whether the run takes the static step. Asked for by name (``fast`` static or
    compile, or blocks of ``graph_steps`` > 1) where it cannot serve, it is refused rather
    than quietly not taken."""
    if tc.fast == "off":
        return False
    if distributed:
        why = "a data-parallel run (torchrun) takes the eager step"
    elif not static_step_supported(model, oc):
        # what this run was given, where it is not what the static step serves
        given = [f"objective {oc.name!r}"]
        given += [f"{name} {getattr(oc, name)!r}" for name in ("free_bits", "capacity_max") if getattr(oc, name)]
        given.append(f"likelihood {model.config.likelihood!r}")
        if model.config.decoder_variance not in ("fixed", "learned"):
            given.append(f"decoder_variance {model.config.decoder_variance!r}")
        why = (f"it serves the plain ELBO / beta-VAE (no free bits, no capacity) with a bernoulli, gaussian, "
               f"continuous_bernoulli or mse likelihood of fixed or learned variance, and this run's "
               f"{', '.join(given)} takes the eager step")
    else:  # graph_steps > 1 asks for the static step's blocks, on any device
        return tc.fast in ("static", "compile") or tc.graph_steps > 1 or device.type == "cuda"
    if tc.fast in ("static", "compile"):
        raise ValueError(f"train.fast={tc.fast!r} cannot serve this run: {why}; use fast='auto' or 'off'")
    if tc.graph_steps > 1:
        raise ValueError(f"train.graph_steps={tc.graph_steps} (blocks of static steps) cannot serve this run: {why}; "
                         f"use graph_steps=1")
    return False


# Steps between reads of the device counters (progress bar, non-finite streaks).
_FOLD_EVERY = 50


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate at ``step``: a pure function of the step."""
    if config.lr_schedule == "cosine" and total_steps > 0:
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


class _Objective(nn.Module):
    """The objective as a module, so that DistributedDataParallel sees every forward.

    The reparameterisation noise is drawn for ``K`` steps at once (one kernel instead of one
    per step, as the batches are; ``K = vaekit.batching.block_steps`` of one step's combined
    draw, 32 but for big draws): steps ``i*K`` to ``i*K + K - 1`` take their noise from one
    draw for full combined batches by a generator seeded by ``(seed, i)``; step ``s`` takes
    its part ``s - i*K``, sliced to this process's examples (a short last batch: to the
    first rows). A run on W processes then draws
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
        lead, d = tuple(shape[:-2]), shape[-1]
        k = block_steps(math.prod(lead) * full * d)
        i, j = divmod(step, k)
        key = (i, k, lead, d)
        if key != self._block_key:
            self._gen.manual_seed(mix_seed(self._seed, _NOISE_STREAM, i))
            self._block = torch.randn(k, *lead, full, d, generator=self._gen, device=self._gen.device).unbind(0)
            self._block_key = key
        eps = self._block[j]  # a tuple's item: no indexing op a step
        return eps if size == full else eps[..., offset : offset + size, :]

    def forward(self, x, step: int):
        return objective_loss(self.model, x, self.config, step, dataset_size=self.dataset_size,
                              noise=lambda shape: self.noise(step, shape))


_NOISE_STREAM = 0x6E6F6973  # keeps the noise seeds apart from the data-order seeds


def _fold(run: _Run) -> None:
    """Move the static step's device counters into the loop's (one sync). The count of
    non-finite steps in a row has one home while a static step serves: the device's
    (``StaticStep.bad_run``), which the eager steps in between (a short last batch) read
    and write back (:func:`_eager_step`)."""
    static = run.static
    run.sums += static.sums
    static.sums.zero_()
    n_bad, run.bad_run = torch.stack([static.skipped, static.bad_run]).tolist()  # one sync
    static.skipped.zero_()
    run.skipped += n_bad


def _after_static(run: _Run, first: int, k: int) -> None:
    """After static steps ``first`` .. ``first + k - 1``: the fold every ``_FOLD_EVERY``
    steps; off CUDA, where reading a counter waits for nothing, the count of non-finite
    steps in a row at every step, so that ``max_bad_steps`` stops the run at once (on CUDA
    at the next fold: the skipped steps change nothing meanwhile)."""
    if first // _FOLD_EVERY != (first + k) // _FOLD_EVERY:
        _fold(run)
    elif run.device.type != "cuda":
        run.bad_run = int(run.static.bad_run)


def _static_step(run: _Run, x: torch.Tensor) -> bool:
    """One step of the static (captured or compiled) path, never data-parallel: no host
    sync but every ``_FOLD_EVERY`` steps. False when the step could not be built (a CUDA
    graph that cannot be captured, a compilation that fails) in a run that did not ask for
    it by name (``fast="auto"``, one step a call): the run says so on stderr and goes on
    with the eager step, which then takes this batch. Asked for by name, the error stops
    the run (it names the setting that avoids it). A batch of another size (an epoch's
    short last batch, which a capturing step serves in a graph of its own) that cannot be
    captured goes back to the eager step alone, said once on stderr, whatever ``fast``."""
    run.beta = run.config.objective.beta_at(run.step)
    try:
        run.static.run(x, run.objective.noise(run.step, (x.shape[0], run.config.model.latent_dim)), run.lr, run.beta)
    except FastPathError as e:
        if x.shape[0] != run.static.batch_size:  # a short batch: that size alone goes back to the eager step
            if run.is_main:
                print(f"vaekit: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            return False
        if run.tc.fast != "auto" or run.tc.graph_steps != 1:
            raise
        # The step was not taken (capture records without running); the steps before it were.
        _fold(run)
        run.static = None
        if run.is_main:
            print(f"vaekit: {str(e).splitlines()[0]}; this run goes on with the eager step", file=sys.stderr,
                  flush=True)
        return False
    _after_static(run, run.step, 1)
    return True


def _block_fits(run: _Run, k: int) -> bool:
    """Whether the ``k`` steps from the batch just drawn can run as one block: all of them
    full batches, within the run's steps, with no step-count checkpoint inside."""
    first = run.batches.position - 1  # the batch just yielded
    ce = run.tc.checkpoint_every
    return (first + k <= run.batches.full_batches and run.step + k <= run.total_steps
            and (not ce or run.step // ce == (run.step + k - 1) // ce))


def _static_block(run: _Run, xs: list) -> None:
    """``len(xs)`` steps of the static path in one call (``StaticStep.run_block``): the
    same learning rates, KL weights and noise as one step at a time."""
    k = len(xs)
    steps = range(run.step, run.step + k)
    lrs = [lr_at(s, run.total_steps, run.tc) for s in steps]
    betas = [run.config.objective.beta_at(s) for s in steps]
    shape = (xs[0].shape[0], run.config.model.latent_dim)
    eps = torch.stack([run.objective.noise(s, shape) for s in steps])
    run.static.run_block(torch.stack(xs), eps, lrs, betas)
    run.lr, run.beta = lrs[-1], betas[-1]
    _after_static(run, run.step, k)


def _eager_step(run: _Run, x: torch.Tensor, stop: _Stop, amp) -> None:
    """One eager step: any objective, any batch size, data-parallel. A non-finite loss or
    gradient norm skips it (all ranks alike)."""
    if run.static is not None:  # the static steps' count of non-finite steps in a row goes on here
        _fold(run)
    opt = run.opt
    set_lr(opt, run.lr)
    with amp:
        out = run.objective(x, run.step)
    opt.zero_grad(set_to_none=True)
    loss = out.loss
    if run.distributed:
        # DDP averages the ranks' gradients: scaled by its share of the combined batch,
        # each rank's mean makes that average the combined batch's mean (ranks get
        # unequal slices of a partial last batch).
        _, size, combined = run.batches.last_span
        loss = loss * (size * run.world / combined)
    loss.backward()
    gnorm = grad_norm(run.model.parameters(), run.tc.grad_clip)
    run.beta = out.beta
    ok = torch.isfinite(out.loss) & torch.isfinite(gnorm)
    if run.distributed:  # every rank must take the same decisions: step, and stop
        flags = torch.stack([ok.to(torch.int32), torch.tensor(int(not stop.signum), device=run.device,
                                                              dtype=torch.int32)])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        ok, run.stop_all = flags[0], not bool(flags[1])
    if bool(ok):
        opt.step()
        run.bad_run = 0
        b = x.shape[0]
        run.sums[:3] += torch.stack([out.loss.detach(), out.reconstruction.detach(), out.kl.detach()]) * b
        run.sums[3] += b
    else:
        run.skipped += 1
        run.bad_run += 1
    if run.static is not None:
        run.static.bad_run.fill_(run.bad_run)
        run.static.resync()
