"""The tail of a training step in three Triton kernels: the gradient norm, clipping, the
non-finite rule, Adam, and the step's bookkeeping.

After the backward pass, :class:`vaekit.fast.StaticStep` does with PyTorch operations:
the global gradient norm (clipping when asked), ``ok = loss and norm finite``, a fused
Adam that skips the step when not ``ok``, and counters on the device (the sums of the
epoch's losses, the skipped steps, the non-finite steps in a row). Captured in a CUDA
graph that is about 20 kernels for the 784-400-20 MLP VAE. Profiled on an H200
(docs/benchmarks.md, "Where a step's GPU time goes"), PyTorch's fused Adam alone took
29-32 us of the step's 238 us for 650,000 parameters: one multi-tensor launch whose
65,536-element chunks make about ten blocks, so a few SMs stream 18 MB while the rest
wait. :class:`AdamTail` does the same work in three launches:

1. ``_sumsq_kernel``: one program per block of ``block`` elements of one gradient; each
   writes the sum of its squares to its own slot (no atomics: the norm is deterministic);
2. ``_adam_kernel``: every program adds up the partial sums itself (a few hundred floats),
   decides ``ok`` and the clip factor, and updates its block of parameters and moments
   when ``ok``;
3. ``_finish_kernel``: one program: each step count ``+= ok``, the sums, the skip counters.

The tensors are reached through tables of their addresses, so parameters of any shapes
and number share one launch of as many programs as the device can use. Parameters,
moments and step counts are the optimiser's own (``optimizer.state``): an eager step of
the same :class:`torch.optim.Adam` in between (a short last batch off CUDA) and a checkpoint see
one state. Gradients are new tensors after each uncaptured backward: their table is
rewritten when their addresses change; inside a CUDA-graph capture nothing can be copied
from the host, so each captured call gets its own table, which the caller fills once the
capture has fixed the addresses (:meth:`AdamTail.bind`; ``StaticStep`` does). A table
hides the tensors' alignment from the compiler: where every size is a multiple of 8 and
every buffer starts on a 16-byte boundary (the 784-400-20 model, PyTorch's allocator), the
kernels are told so and move 16 bytes an instruction (``ld.global.v4`` in the PTX, a test
reads it); elsewhere one element at a time.

It computes what the reference computes: ``torch.nn.utils.clip_grad_norm_`` (its
``max_norm / (norm + 1e-6)`` factor, capped at 1), then ``torch.optim.Adam`` (L2 weight
decay, or decoupled as AdamW), in float32 with the same formulas (the moment's lerp as
torch computes it, IEEE square roots and divisions; the bias corrections from
``log(beta)`` taken in float64, more exact than float32 powers); the sum of squares is
taken in another order, so the norm and what follows from it agree to float rounding.
The tests compare it with a ``StaticStep`` on PyTorch's Adam over many steps, clipped,
with a non-finite step, under Triton's interpreter on the CPU and natively on a GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import _INTERPRETED, _next_pow2, fused_available, triton

if triton is not None:
    import triton.language as tl

__all__ = ["AdamTail", "adam_tail_unsupported"]

# Elements per program. 2048 makes ~330 programs for 650,000 parameters (an H200 has 132
# SMs); the interpreter's tests use small blocks so that a tensor spans several.
BLOCK = 256 if _INTERPRETED else 2048
# Every program of the Adam kernel adds up all the partial sums of squares, so for big
# models the block grows (up to _MAX_BLOCK) to keep the programs at most _MAX_PROGRAMS.
_MAX_PROGRAMS = 1024
_MAX_BLOCK = 16384

if triton is not None:

    @triton.jit
    def _entry(table, row, n_tensors, t, ALIGNED: tl.constexpr):
        # Address of tensor t's buffer of kind row (0 params, 1 grads, 2 exp_avg,
        # 3 exp_avg_sq, 4 step counts, 5 bfloat16 copies), as a float32 pointer. ALIGNED:
        # every buffer starts on a 16-byte boundary (checked on the host), which a table
        # hides from the compiler (the hint holds on the pointer, not on the integer).
        p = tl.load(table + row * n_tensors + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def _entry16(table, row, n_tensors, t, ALIGNED: tl.constexpr):
        # The same as a pointer to 16-bit words: the bfloat16 copies, and with them the
        # gradients, handled as their bits (exact either way, and the same in Triton's
        # interpreter, whose conversion to bfloat16 truncates).
        return _entry(table, row, n_tensors, t, ALIGNED).to(tl.pointer_type(tl.uint16))

    @triton.jit
    def _span(starts, numels, pid, t, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        # Program pid's element offsets in tensor t, and that tensor's size. ALIGNED: the
        # sizes are multiples of 8 (checked on the host), so that with aligned buffers the
        # loads and stores are 16-byte vectors (8 bytes for the bfloat16 words) instead
        # of one element per instruction.
        start = tl.load(starts + pid).to(tl.int64)
        n = tl.load(numels + t).to(tl.int64)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
            n = tl.multiple_of(n, 8)
        return start + tl.arange(0, BLOCK), n

    @triton.jit
    def _from_bf16(bits):
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _to_bf16(x):
        # Round to nearest, ties to even, as torch's .to(torch.bfloat16); NaN stays NaN.
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(x != x, 0x7FC0, up).to(tl.uint16)

    @triton.jit
    def _grads(table, n_tensors, t, offs, mask, SHADOW: tl.constexpr, ALIGNED: tl.constexpr):
        if SHADOW:  # the copies' gradients, bfloat16
            g = _from_bf16(tl.load(_entry16(table, 1, n_tensors, t, ALIGNED) + offs, mask=mask, other=0))
        else:
            g = tl.load(_entry(table, 1, n_tensors, t, ALIGNED) + offs, mask=mask, other=0.0)
        return g

    @triton.jit
    def _ok_and_scale(partials, n_partials, loss_ptr, clip, NP: tl.constexpr):
        # ok: loss and gradient norm finite (NaN fails both comparisons); the clip factor of
        # clip_grad_norm_, 1 when clip is inf.
        i = tl.arange(0, NP)
        norm = tl.sqrt_rn(tl.sum(tl.load(partials + i, mask=i < n_partials, other=0.0), 0))
        loss = tl.load(loss_ptr).to(tl.float32)
        ok = (tl.abs(loss) <= 3.4028234663852886e38) & (norm <= 3.4028234663852886e38)
        return ok, tl.minimum(tl.div_rn(clip, norm + 1e-6), 1.0)

    @triton.jit
    def _one_minus_power(log_beta, step):
        # 1 - beta**step = -expm1(step * log(beta)), log(beta) taken in float64 on the host:
        # 1 - beta2**1 with beta2 = 0.999 rounded to float32 would lose 4 digits. Below
        # |u| = 0.5 a Taylor polynomial (truncation < 1e-11 relative); no libdevice, which
        # the interpreter lacks.
        u = step * log_beta
        q = 1.0 / 2 + u * (1.0 / 6 + u * (1.0 / 24 + u * (1.0 / 120 + u * (
            1.0 / 720 + u * (1.0 / 5040 + u * (1.0 / 40320 + u * (1.0 / 362880)))))))
        return -tl.where(tl.abs(u) < 0.5, u + u * u * q, tl.exp(u) - 1.0)

    @triton.jit
    def _sumsq_kernel(table, tids, starts, numels, partials, n_tensors, BLOCK: tl.constexpr, SHADOW: tl.constexpr,
                      ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(tids + pid)
        offs, n = _span(starts, numels, pid, t, BLOCK, ALIGNED)
        g = _grads(table, n_tensors, t, offs, offs < n, SHADOW, ALIGNED)
        tl.store(partials + pid, tl.sum(g * g, 0))

    @triton.jit
    def _adam_kernel(table, tids, starts, numels, partials, n_partials, n_tensors, loss_ptr, lr_ptr,
                     beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, clip,
                     DECAY: tl.constexpr, DECOUPLED: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
                     SHADOW: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        ok, scale = _ok_and_scale(partials, n_partials, loss_ptr, clip, NP)
        t = tl.load(tids + pid)
        offs, n = _span(starts, numels, pid, t, BLOCK, ALIGNED)
        mask = offs < tl.where(ok, n, 0)  # nothing to update when not ok
        p_ptr = _entry(table, 0, n_tensors, t, ALIGNED) + offs
        m_ptr = _entry(table, 2, n_tensors, t, ALIGNED) + offs
        v_ptr = _entry(table, 3, n_tensors, t, ALIGNED) + offs
        p = tl.load(p_ptr, mask=mask, other=0.0)
        g = _grads(table, n_tensors, t, offs, mask, SHADOW, ALIGNED) * scale
        m = tl.load(m_ptr, mask=mask, other=0.0)
        v = tl.load(v_ptr, mask=mask, other=0.0)
        lr = tl.load(lr_ptr).to(tl.float32)
        step = tl.load(_entry(table, 4, n_tensors, t, False)) + 1.0
        if DECAY:
            if DECOUPLED:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        # exp_avg.lerp_(grad, w = 1 - beta1), as torch's lerp computes it on either side of 1/2
        m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (g - m), g - (g - m) * (1.0 - one_minus_beta1))
        v = v * beta2 + one_minus_beta2 * g * g
        bias1 = _one_minus_power(log_beta1, step)
        bias2 = _one_minus_power(log_beta2, step)
        # IEEE square roots and divisions (Triton's defaults are approximate), as PyTorch's
        denom = tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bias2)) + eps
        p = p - tl.div_rn(lr, bias1) * tl.div_rn(m, denom)
        tl.store(p_ptr, p, mask=mask)
        tl.store(m_ptr, m, mask=mask)
        tl.store(v_ptr, v, mask=mask)
        if SHADOW:  # the bfloat16 copy the next forward pass reads
            tl.store(_entry16(table, 5, n_tensors, t, ALIGNED) + offs, _to_bf16(p), mask=mask)

    @triton.jit
    def _finish_kernel(table, n_tensors, partials, n_partials, loss_ptr, rec_ptr, kl_ptr, sums_ptr,
                       skipped_ptr, bad_run_ptr, b, clip, NP: tl.constexpr, NT: tl.constexpr):
        ok, _ = _ok_and_scale(partials, n_partials, loss_ptr, clip, NP)
        i = tl.arange(0, NT)
        live = i < n_tensors
        steps = tl.load(table + 4 * n_tensors + i, mask=live, other=0).to(tl.pointer_type(tl.float32))
        tl.store(steps, tl.load(steps, mask=live) + ok.to(tl.float32), mask=live)
        j = tl.arange(0, 4)
        loss = tl.load(loss_ptr).to(tl.float64)
        rec = tl.load(rec_ptr).to(tl.float64)
        kl = tl.load(kl_ptr).to(tl.float64)
        parts = tl.where(j == 0, loss, tl.where(j == 1, rec, tl.where(j == 2, kl, 1.0)))
        sums = tl.load(sums_ptr + j)
        tl.store(sums_ptr + j, sums + tl.where(ok, parts * b, 0.0))
        bad = 1 - ok.to(tl.int64)
        tl.store(skipped_ptr, tl.load(skipped_ptr) + bad)
        tl.store(bad_run_ptr, tl.load(bad_run_ptr) * bad + bad)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def adam_tail_unsupported(optimizer, params) -> str:
    """Why :class:`AdamTail` cannot serve ``optimizer`` over ``params`` ("" when it can)."""
    params = list(params)
    if not params:
        return "there are no parameters"
    device = params[0].device
    if not fused_available(device):
        return f"the Triton kernels cannot run on {device} (CUDA with Triton, or Triton's interpreter on a CPU)"
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
        return f"the optimiser is a {type(optimizer).__name__}, not a torch.optim.Adam or AdamW"
    if len(optimizer.param_groups) != 1:
        return f"the optimiser has {len(optimizer.param_groups)} parameter groups, not one"
    group = optimizer.param_groups[0]
    for key in ("amsgrad", "maximize", "differentiable"):
        if group.get(key):
            return f"the optimiser has {key}=True"
    lr = group["lr"]
    if isinstance(lr, Tensor) and (lr.device != device or lr.numel() != 1):
        return (f"the optimiser's learning rate must be a number or a one-element tensor on {device}, "
                f"got one on {lr.device}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in (*group["betas"], group["eps"], group["weight_decay"])):
        return "the optimiser's betas, eps and weight_decay must be numbers"
    if {id(p) for p in group["params"]} != {id(p) for p in params} or len(group["params"]) != len(params):
        return "the optimiser's parameters are not the step's"
    for p in params:
        if p.dtype != torch.float32 or p.device != device or p.is_sparse or not p.is_contiguous():
            return (f"every parameter must be a dense contiguous float32 tensor on {device}, "
                    f"one is {p.dtype} on {p.device}")
        if p.numel() >= 2**31:
            return "a parameter has 2**31 elements or more"
        step = optimizer.state.get(p, {}).get("step")
        if step is not None and (not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device != device):
            return (f"the optimiser's step counts must be float32 tensors on {device} (capturable=True or "
                    f"fused=True on CUDA)")
    if device.type == "cuda" and not (group.get("capturable") or group.get("fused")):
        return "on CUDA the optimiser must be built with capturable=True or fused=True (step counts on the device)"
    return ""


class AdamTail:
    """The step after ``loss.backward()``: norm, clip, non-finite rule, Adam, bookkeeping.

    Args:
        optimizer: the :class:`torch.optim.Adam` (or AdamW) of ``params``, one parameter
            group; its state is created here if it has none yet, as its first step would.
        params: the parameters, in the optimiser's order.
        grad_clip: clip the global gradient norm to this (0 or inf: no clipping).
        block: elements per program (default :data:`BLOCK`).
        shadows: bfloat16 copies of ``params`` (same shapes, contiguous, requiring grad) that
            the forward pass uses in their place (bf16 autocast without a cast of each
            weight a step: ``StaticStep(amp=True, adam_kernel=True)`` for a model made of
            linear and convolution layers). The gradients are
            then theirs, read as float32 (what autocast's cast back would give), and each
            update writes the new float32 parameter and its bfloat16 copy (rounded to
            nearest even, as ``.to(torch.bfloat16)``).

    Call ``tail(loss, rec, kl, sums, skipped, bad_run, batch_size)`` once the gradients
    are in ``p.grad``: when ``loss`` and the gradient norm are finite the parameters,
    moments and step counts are updated and ``sums += [loss, rec, kl, 1] * batch_size``
    (float64), ``bad_run`` is zeroed; otherwise nothing changes but ``skipped += 1`` and
    ``bad_run += 1``. No host synchronisation: it can be captured in a CUDA graph.
    """

    def __init__(self, optimizer, params, *, grad_clip: float = 0.0, block: int | None = None,
                 shadows=None) -> None:
        params = list(params)
        why = adam_tail_unsupported(optimizer, params)
        if why:
            raise ValueError(f"AdamTail cannot serve this optimiser: {why}")
        if shadows is not None:
            shadows = list(shadows)
            if len(shadows) != len(params) or not all(
                    c.dtype == torch.bfloat16 and c.shape == q.shape and c.device == q.device and c.is_contiguous()
                    and c.requires_grad for c, q in zip(shadows, params)):
                raise ValueError(f"shadows must be one contiguous bfloat16 tensor requiring grad per parameter, of "
                                 f"its shape and device: got {len(shadows)} for {len(params)} parameters")
        self.shadows = shadows
        if block is None:  # every program re-adds all partial sums: keep them few for big models
            block = BLOCK
            while sum(-(-p.numel() // block) for p in params) > _MAX_PROGRAMS and block < _MAX_BLOCK:
                block *= 2
        if not (isinstance(block, int) and block >= 16 and block & (block - 1) == 0):
            raise ValueError(f"block must be a power of 2 >= 16, got {block!r}")
        self.opt, self.params, self.block = optimizer, params, block
        self._warps = min(16, max(4, block // 512))
        self.device = device = params[0].device
        self.clip = float(grad_clip) if grad_clip and math.isfinite(grad_clip) else math.inf
        for p in params:  # what Adam's first step would create (capturable / fused: counts on the device)
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        tids, starts = [], []
        for i, p in enumerate(params):
            for s in range(0, p.numel(), block):
                tids.append(i)
                starts.append(s)
        self._tids = torch.tensor(tids, dtype=torch.int32, device=device)
        self._starts = torch.tensor(starts, dtype=torch.int32, device=device)
        self._numels = torch.tensor([p.numel() for p in params], dtype=torch.int32, device=device)
        self._sizes_by_8 = all(p.numel() % 8 == 0 for p in params)
        self._partials = torch.zeros(len(tids), dtype=torch.float32, device=device)
        self._table = torch.zeros((5 if shadows is None else 6) * len(params), dtype=torch.int64, device=device)
        self._bound: list[int] | None = None
        # Calls inside a CUDA-graph capture: each reads its own table (a block of K captured
        # steps may put each step's gradients elsewhere), filled by bind() after the capture.
        self._pending: list[tuple[Tensor, list[int]]] = []
        self._captured: list[Tensor] = []  # kept alive with the graphs that read them
        self._lr = torch.zeros((), dtype=torch.float32, device=device)  # for a number lr, uncaptured

    def _addresses(self) -> list[int]:
        shadows = self.shadows or [None] * len(self.params)
        rows: list[list[int]] = [[] for _ in range(5 if self.shadows is None else 6)]
        dtype = torch.float32 if self.shadows is None else torch.bfloat16
        for p, c in zip(self.params, shadows):
            g, state = (p if c is None else c).grad, self.opt.state[p]
            if g is None:
                raise RuntimeError("AdamTail: a parameter has no gradient (every parameter must take part in the loss)")
            if g.dtype != dtype or g.device != self.device or g.is_sparse or not g.is_contiguous():
                raise RuntimeError(f"AdamTail: a gradient is not a dense contiguous {str(dtype).removeprefix('torch.')} "
                                   f"tensor on {self.device}")
            kept = (p, g, state["exp_avg"], state["exp_avg_sq"], state["step"]) + (() if c is None else (c,))
            for row, t in enumerate(kept):
                rows[row].append(t.data_ptr())
        return [a for row in rows for a in row]

    def _aligned(self, addresses: list[int]) -> bool:
        """Whether the kernels may move 16 bytes an instruction: every size a multiple of 8
        elements and every buffer but the step counts on a 16-byte boundary (PyTorch's
        allocator gives 512; a view into a larger tensor may not be)."""
        nt = len(self.params)
        return self._sizes_by_8 and all(a % 16 == 0 for i, a in enumerate(addresses) if i // nt != 4)

    def bind(self) -> None:
        """After a CUDA-graph capture: fill the address tables that the captured calls read
        (the addresses of the gradients the capture allocated). Nothing can be copied from
        the host during a capture."""
        for table, addresses in self._pending:
            table.copy_(torch.tensor(addresses, dtype=torch.int64, device="cpu"))
            self._captured.append(table)
        self._pending.clear()

    def discard_pending(self) -> None:
        """Forget the tables of a capture that failed."""
        self._pending.clear()

    def __call__(self, loss: Tensor, rec: Tensor, kl: Tensor, sums: Tensor, skipped: Tensor, bad_run: Tensor,
                 batch_size: int) -> None:
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        addresses = self._addresses()
        aligned = self._aligned(addresses)
        if capturing:
            table = torch.empty(len(addresses), dtype=torch.int64, device=self.device)
            self._pending.append((table, addresses))
        else:
            table = self._table
            if addresses != self._bound:  # new gradients (or state): one copy from the host
                table.copy_(torch.tensor(addresses, dtype=torch.int64, device="cpu"))
                self._bound = addresses
        group = self.opt.param_groups[0]
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            if capturing:
                raise RuntimeError("AdamTail: a captured step reads the learning rate from a tensor: build the "
                                   "Adam with lr=torch.tensor(...) on the device and capturable=True")
            self._lr.fill_(lr)
            lr = self._lr
        n, nt = self._tids.numel(), len(self.params)
        np2 = _next_pow2(n)
        beta1, beta2 = group["betas"]
        wd = float(group["weight_decay"])
        _sumsq_kernel[(n,)](table, self._tids, self._starts, self._numels, self._partials, nt,
                            BLOCK=self.block, SHADOW=self.shadows is not None, ALIGNED=aligned, num_warps=self._warps,
                            enable_fp_fusion=True)
        _adam_kernel[(n,)](table, self._tids, self._starts, self._numels, self._partials, n, nt, loss, lr,
                           float(beta2), 1.0 - beta1, 1.0 - beta2, _log(beta1), _log(beta2),
                           float(group["eps"]), wd,
                           self.clip, DECAY=wd != 0,
                           DECOUPLED=bool(group.get("decoupled_weight_decay")), BLOCK=self.block, NP=np2,
                           SHADOW=self.shadows is not None, ALIGNED=aligned, num_warps=self._warps,
                           enable_fp_fusion=True)
        _finish_kernel[(1,)](table, nt, self._partials, n, loss, rec, kl, sums, skipped, bad_run,
                             float(batch_size), self.clip, NP=np2, NT=_next_pow2(nt), num_warps=self._warps,
                             enable_fp_fusion=True)  # the Adam kernel's warps: its very sum, so its very ok
