"""Batches of a tensor kept on the training device (or in host memory when it is too big
there): reproducible, resumable, sharded.

No DataLoader and no per-sample collation: the batches of a *block* of up to
``MAX_BLOCK_STEPS`` consecutive steps are one indexing of the data tensor by a slice of the
epoch's permutation (and, with dynamic binarization, one draw), and each step takes a
view of its block. Per step that leaves almost nothing for the host to do, which is what a
CUDA-graph-replayed step needs (a GPU step of a small model takes less time than a few
kernel launches from Python). Every random choice (the order, dynamic binarization, the
training noise in :mod:`vaekit.train`) comes from a generator seeded by :func:`mix_seed`
from the run seed and the position (epoch and block), so a resumed run and a run split
over data-parallel processes draw exactly what one uninterrupted process draws.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from .checks import check_int
from .data import check_images

__all__ = ["BatchIterator", "mix_seed", "bernoulli_draw", "block_steps", "fits_on_device", "MAX_BLOCK_STEPS",
           "BLOCK_ELEMENTS", "DEVICE_DATA_FRACTION"]

MAX_BLOCK_STEPS = 32
# Elements of one block of batches at most (64 MB in float32): big images get fewer steps a block.
BLOCK_ELEMENTS = 1 << 24


# The training data are kept on a GPU when they take at most this share of its free memory.
DEVICE_DATA_FRACTION = 0.5


def fits_on_device(x: Tensor, device) -> bool:
    """Whether ``x`` should be kept whole on ``device``: always on a CPU; on CUDA when it
    takes at most ``DEVICE_DATA_FRACTION`` of the memory free there (the rest is the
    model's, the optimiser's and the activations')."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    if device.index is None:  # "cuda": the current device, as tensors name it ("cuda:0")
        device = torch.device("cuda", torch.cuda.current_device())
    if x.device == device:  # already there: nothing to fit
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return x.numel() * x.element_size() <= DEVICE_DATA_FRACTION * free


def block_steps(step_elements: int) -> int:
    """Steps per block for steps of ``step_elements`` elements each: a function of the
    shapes only, so that every rank and every resume cuts the same blocks."""
    return max(1, min(MAX_BLOCK_STEPS, BLOCK_ELEMENTS // max(1, step_elements)))


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of non-negative ints, e.g. (seed, epoch).

    NumPy's ``SeedSequence`` pads its entropy with zeros, so tuples that differ only by
    trailing zeros give the same seed (``(s, 3)`` and ``(s, 3, 0)``): streams that must not
    meet start with a tag of their own (``steps._NOISE_STREAM``, ``train._VAL_STREAM``,
    ``wiring._GLOBAL_STREAM``). The data order's ``(seed, epoch)`` and the binarization's
    ``(seed, epoch, 0)`` share a seed, but feed different generators (PyTorch's CPU
    generator; NumPy's PCG64 or a CUDA generator)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0]) >> 1


def bernoulli_draw(p: Tensor, generator: torch.Generator | np.random.Generator | None = None) -> Tensor:
    """One Bernoulli draw per element, ``1[u < p]`` with ``u`` uniform on [0, 1) (float32,
    or float64 for float64 ``p``), in ``p``'s dtype: ``P(1) = p`` to within the uniform's
    2^-24 grid, and exactly 0 / 1 where ``p`` is 0 / 1. No value checks (the iterator
    checks its data once).

    ``u`` comes from ``generator``: a ``torch.Generator`` on ``p``'s device
    (``torch.rand``), or, for ``p`` on the CPU, a NumPy generator (PCG64 draws floats about
    twice as fast as PyTorch's CPU generator). What the iterator's dynamic binarization
    draws: ``torch.bernoulli`` gives the same distribution but its CPU kernel is about 4x
    slower than ``torch.rand`` and a comparison (docs/benchmarks.md).
    """
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    if isinstance(generator, np.random.Generator):
        if p.device.type != "cpu":
            raise ValueError(f"a NumPy generator draws for CPU tensors, got p on {p.device}")
        u = torch.from_numpy(generator.random(tuple(p.shape), dtype=np.float64 if dtype == torch.float64 else np.float32))
    else:
        u = torch.rand(p.shape, generator=generator, device=p.device, dtype=dtype)
    return u.lt_(p).to(p.dtype)


class BatchIterator:
    """Batches of a tensor kept whole on ``device``, reproducible and resumable.

    Epoch ``e`` uses the permutation ``randperm(N)`` drawn by a CPU generator seeded from
    ``(seed, e)`` (identity if ``shuffle=False``), so it is recomputed, not stored, on
    resume. With ``world_size = W`` ranks, *combined* batch ``j`` is
    ``perm[j*W*b : (j+1)*W*b]`` and rank ``r`` takes part ``r`` of its ``W``-way
    ``tensor_split`` (``[r*b:(r+1)*b]`` for a full batch): concatenating the ranks'
    batches ``j`` gives exactly batch ``j`` of one process with batch size ``W*b``.
    The combined batches are taken ``K = block_steps(W * b * event size)`` at a time: block
    ``i`` of epoch ``e`` holds combined batches ``i*K`` to ``i*K + K - 1`` (the last block
    fewer) and is gathered at once; ``dynamic_binarize`` replaces it by
    :func:`bernoulli_draw` ``(block, g)``, ``g`` seeded from ``(seed, e, i)`` (a
    ``torch.Generator`` on a GPU, NumPy's PCG64 on a CPU), before the split, so the draws
    too agree with one process. A batch is a view of its block.

    ``device``: where the batches go. The data are moved there whole when they fit
    (``keep_on_device=None``: :func:`fits_on_device`); otherwise they stay in host memory
    and each block is gathered there and copied over (then binarized on ``device``, so the
    batches are the same either way).

    Iterating runs the rest of the current epoch; ``position`` is the index of the next
    batch, ``state_dict()`` / ``load_state_dict()`` resume at exactly that batch.
    ``last_span = (offset, size, combined)`` says where the last batch yielded sits in its
    combined batch.
    """

    def __init__(self, x: Tensor, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 dynamic_binarize: bool = False, seed: int = 0, device=None, rank: int = 0,
                 world_size: int = 1, keep_on_device: bool | None = None) -> None:
        check_images(x, "x", support="unit" if dynamic_binarize else "real")
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed)
        check_int("world_size", world_size, low=1)
        check_int("rank", rank)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.device = x.device if device is None else torch.device(device)
        if keep_on_device is None:
            keep_on_device = fits_on_device(x, self.device)
        self.on_device = bool(keep_on_device) or x.device == self.device
        self.x = x.to(self.device) if self.on_device else x
        self.batch_size, self.shuffle, self.drop_last = batch_size, bool(shuffle), bool(drop_last)
        self.dynamic_binarize, self.seed = bool(dynamic_binarize), seed
        self.rank, self.world_size = rank, world_size
        n, combined = len(x), batch_size * world_size
        self._combined = combined
        self._len = n // combined if drop_last else -(-n // combined)
        if self._len == 0:
            raise ValueError(f"x has {n} examples, fewer than one batch of {combined} with drop_last=True")
        if not drop_last and 0 < n % combined < world_size:
            raise ValueError(f"the last batch of {n % combined} examples cannot give each of the "
                             f"world_size={world_size} ranks one example; use drop_last=True")
        self.epoch = self.position = 0
        self.last_span = (0, 0, 0)  # (offset, size, combined size) of the last batch

    def __len__(self) -> int:
        return self._len

    @property
    def full_batches(self) -> int:
        """Batches of exactly ``batch_size`` examples an epoch (all but a short last one)."""
        return len(self.x) // self._combined

    @property
    def steps_per_block(self) -> int:
        """Combined batches gathered (and binarized) at once: :func:`block_steps` of a
        combined batch's elements."""
        return block_steps(self._combined * (self.x[0].numel() if len(self.x) else 1))

    def _own(self, a: int, b: int) -> tuple[int, int]:
        """(start, count) of this rank's part of the combined batch ``[a, b)`` of the permutation."""
        base, extra = divmod(b - a, self.world_size)
        r = self.rank
        return a + r * base + min(r, extra), base + (r < extra)

    def set_epoch(self, epoch: int) -> None:
        check_int("epoch", epoch)
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "position", "seed"}:
            raise ValueError(f"state must be a dict with keys epoch, position, seed, got {state!r}")
        for key in ("epoch", "position", "seed"):
            check_int(f"state[{key!r}]", state[key])
        if state["position"] > len(self):
            raise ValueError(f"state['position'] must be <= {len(self)} batches, got {state['position']}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]

    def permutation(self, epoch: int) -> Tensor:
        """The example order of ``epoch`` on the data's device (same on every rank)."""
        if not self.shuffle:
            return torch.arange(len(self.x), device=self.x.device)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(len(self.x), generator=g, device="cpu").to(self.x.device)

    def __iter__(self):
        if self.position >= len(self):  # resumed right after an epoch's last batch
            self.epoch, self.position = self.epoch + 1, 0
        epoch, perm = self.epoch, self.permutation(self.epoch)
        n, c, k = len(self.x), self._combined, self.steps_per_block
        current, block, starts = -1, None, []
        while self.position < len(self):
            j = self.position
            if j // k != current:  # a new block: one gather (and one draw) for its k steps
                current = j // k
                steps = range(current * k, min((current + 1) * k, len(self)))
                own = [self._own(i * c, min((i + 1) * c, n)) for i in steps]  # this rank's rows
                counts = [m for _, m in own]
                if self.dynamic_binarize:  # the whole combined block, drawn as one process draws it
                    first, last = current * k * c, min(steps[-1] * c + c, n)
                    key = mix_seed(self.seed, epoch, current)
                    g = (np.random.Generator(np.random.PCG64(key)) if self.device.type == "cpu"
                         else torch.Generator(device=self.device).manual_seed(key))
                    block = bernoulli_draw(self.x.index_select(0, perm[first:last]).to(self.device), g)
                    starts = [s - first for s, _ in own]
                else:  # only this rank's rows are gathered
                    if self.world_size == 1:  # one slice of the permutation
                        rows = slice(own[0][0], own[-1][0] + own[-1][1])
                    else:  # positions made on the device: a copy from the host would wait for the GPU
                        rows = torch.cat([torch.arange(s, s + m, device=perm.device) for s, m in own])
                    block = self.x.index_select(0, perm[rows]).to(self.device)
                    starts = list(itertools.accumulate(counts, initial=0))
            lo, size = starts[j - current * k], counts[j - current * k]
            # Where this rank's examples sit in the combined batch (tensor_split's layout),
            # so per-example randomness can be drawn for the combined batch and sliced.
            combined = min(c, n - j * c)
            self.last_span = (self._own(0, combined)[0], size, combined)
            self.position = j + 1
            yield block[lo: lo + size]
        self.epoch, self.position = epoch + 1, 0
