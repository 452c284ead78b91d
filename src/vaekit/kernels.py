"""A fused GPU loss: reconstruction + beta * KL, forward and backward, in Triton; the
posterior's sample (:func:`fused_posterior_sample`), fused the same way; and a linear
layer with its ReLU whose backward takes the bias gradient and the ReLU's mask in one
pass (:func:`fused_linear`).

:func:`fused_vae_loss` computes what ``vaekit.losses.VAELoss`` computes (that module is the
reference and the fallback), the same values and gradients within float32 rounding (not
bit for bit: the operations differ in order, and near ``logvar = 0`` the eager KL's
gradient in ``logvar``, ``(e^v - 1) / 2`` formed by autograd, cancels where the kernel's
series does not: 4.77e-7 against 5.0e-7 at ``v = 1e-6`` in float32), for the two
likelihoods whose gradient is a cheap elementwise function of the inputs:

* ``"bernoulli"``: per element ``max(l, 0) - l x + log1p(e^{-|l|})``, gradient
  ``sigmoid(l) - x``;
* ``"gaussian"`` with a fixed scalar log-variance ``s``: per element
  ``(log 2pi + s + (x - m)^2 e^{-s}) / 2``, gradient ``(m - x) e^{-s}``;
* the Gaussian KL against N(0, I): per latent ``(expm1(v) - v + mu^2) / 2``, gradients
  ``mu`` and ``expm1(v) / 2``.

Design (why it is shaped this way):

* **One program per data row, looping over its columns**, not a 2D grid with atomic adds.
  At B=4096, D=3*64*64=12288 the rows alone are 4096 programs (~30 per SM of an H100),
  each streaming 2 x 48 KB contiguously: the device is full with no atomics, no zeroing
  launch for an accumulator, and deterministic row sums. At B=128, D=784 the whole
  problem is ~1.2 MB, under a microsecond of bandwidth: launch latency dominates, a row
  fits one block, and only the number of launches matters (two forward, one backward).
  Only when B cannot fill the device (B=8, D=196608, say) are a row's columns split into
  chunks whose partial sums ``[B, split]`` the finalize kernel adds in a fixed order.
* **The gradient is written by the forward**, in the logits' dtype, already times the 1/B
  of ``"mean"``. The backward multiplies it in place by the incoming ``g_loss + g_rec``
  (per example for ``"none"``), and a program *skips its row when that factor is exactly
  1*, decided on the device: no host sync, so a CUDA-graph-captured step still works.
* **Bandwidth**, counted in passes over B*D elements (the [B, d] latent part is noise):
  the minimum for forward+backward is 3 (read logits, read x, write the gradient). This
  design does exactly 3 for ``loss.backward()`` or any incoming gradient of 1; another
  incoming gradient (fp16 GradScaler, weighted losses) adds an in-place read+write: 5,
  with no new [B, D] allocation. A forward without autograd on the logits does 2.
  (Eager PyTorch chains elementwise kernels that each read and write [B, D].)
* ``beta`` given as a tensor is read by the kernels from memory, forward and backward: a
  captured step follows in-place updates. Change it between steps, not between a forward
  and its backward (the eager graph would raise there; this one would use the new value).

fp16/bf16 inputs are read as they are and accumulated in fp32; gradients are stored in
the inputs' dtypes, but for fp16 under autograd, whose gradients stay float32 until the
backward has multiplied them by the incoming gradient (a GradScaler's factor) and
autograd casts them. Non-contiguous inputs are made contiguous first.

Interpreter mode: with ``TRITON_INTERPRET=1`` set *before this module is imported*
(Triton decides at decoration time whether a kernel is compiled or interpreted), the same
kernels run on CPU tensors; :func:`fused_available` tells. The tests use a subprocess.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import Tensor

from .checks import check_beta, check_finite, check_number, check_tensor, check_unit_interval, validating
from .losses import _MAX_LOGVAR, REDUCTIONS, LossResult, VAELoss

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager VAELoss serves every call
    triton = None

__all__ = ["fused_vae_loss", "fused_vae_loss_grads", "fused_available", "fused_posterior_sample",
           "posterior_sample", "fused_linear", "fused_bias_grad", "bias_grad", "weight_grads_aside"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK = 2048
# Launches pass enable_fp_fusion=True: FMA contraction is harmless in these formulas, and
# saying so keeps Triton 3.9 from warning about its coming change of default.

if triton is not None:

    @triton.jit
    def _log1p_small(u):
        # log(1 + u) for u in [0, 1]: log(w) * u / (w - 1) cancels the rounding of w = 1 + u
        # (Goldberg's trick), so tiny u keep their digits; no libdevice (the interpreter has none).
        w = 1.0 + u
        exact = w == 1.0
        return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))

    @triton.jit
    def _expm1_terms(v):
        # (expm1(v) - v, expm1(v)). Near 0, exp(v) - 1 - v cancels to nothing, so a Taylor
        # polynomial takes over below |v| = 0.5 (truncation < 1e-11 relative there).
        q = 1.0 / 2 + v * (1.0 / 6 + v * (1.0 / 24 + v * (1.0 / 120 + v * (
            1.0 / 720 + v * (1.0 / 5040 + v * (1.0 / 40320 + v * (1.0 / 362880)))))))
        small = tl.abs(v) < 0.5
        em1 = tl.exp(v) - 1.0
        return tl.where(small, v * v * q, em1 - v), tl.where(small, v + v * v * q, em1)

    @triton.jit
    def _beta(beta_ptr, beta_value, BETA_PTR: tl.constexpr):
        if BETA_PTR:
            return tl.load(beta_ptr).to(tl.float32)
        return beta_value

    @triton.jit
    def _fwd_kernel(
        dec_ptr, x_ptr, grad_ptr, part_ptr, mu_ptr, lv_ptr, gmu_ptr, glv_ptr, kl_ptr,
        D, d, chunk, split, gauss_logvar, inv_n, beta_ptr, beta_value,
        GAUSSIAN: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_KL_GRAD: tl.constexpr,
        KL_BETA: tl.constexpr, BETA_PTR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # KL_BETA: the KL's gradients are written times beta, the loss's own (what
        # fused_vae_loss_grads returns); otherwise the backward multiplies them.
        row = tl.program_id(0)
        part = tl.program_id(1)
        base = row.to(tl.int64) * D
        lo = part * chunk
        hi = tl.minimum(lo + chunk, D)
        cols = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(lo, hi, BLOCK):
            offs = start + cols
            mask = offs < hi
            out = tl.load(dec_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            if GAUSSIAN:
                inv_var = tl.exp(-gauss_logvar)
                diff = out - x
                elem = 0.5 * (1.8378770664093453 + gauss_logvar + diff * diff * inv_var)  # log(2 pi)
                grad = diff * inv_var
            else:
                e = tl.exp(-tl.abs(out))  # in (0, 1]: no overflow for any finite logit
                elem = tl.maximum(out, 0.0) - out * x + _log1p_small(e)
                grad = tl.where(out >= 0, 1.0, e) / (1.0 + e) - x
            acc += tl.where(mask, elem, 0.0)
            if WRITE_GRAD:
                tl.store(grad_ptr + base + offs, (grad * inv_n).to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + row * split + part, tl.sum(acc, 0))
        if part == 0:  # the KL row rides along with the first chunk of its data row
            kl_scale = inv_n
            if KL_BETA:
                kl_scale = inv_n * _beta(beta_ptr, beta_value, BETA_PTR)
            kbase = row.to(tl.int64) * d
            kcols = tl.arange(0, BLOCK_D)
            kacc = tl.zeros([BLOCK_D], tl.float32)
            for start in range(0, d, BLOCK_D):
                offs = start + kcols
                mask = offs < d
                mu = tl.load(mu_ptr + kbase + offs, mask=mask, other=0.0).to(tl.float32)
                lv = tl.load(lv_ptr + kbase + offs, mask=mask, other=0.0).to(tl.float32)
                em1_minus_v, em1 = _expm1_terms(lv)
                kacc += tl.where(mask, 0.5 * (em1_minus_v + mu * mu), 0.0)
                if WRITE_KL_GRAD:
                    tl.store(gmu_ptr + kbase + offs, (mu * kl_scale).to(gmu_ptr.dtype.element_ty), mask=mask)
                    tl.store(glv_ptr + kbase + offs, (0.5 * em1 * kl_scale).to(glv_ptr.dtype.element_ty),
                             mask=mask)
            tl.store(kl_ptr + row, tl.sum(kacc, 0))

    @triton.jit
    def _row_terms(part_ptr, kl_ptr, rows, B, split, BLOCK_S: tl.constexpr):
        """Per-example reconstruction (its chunks added in order) and KL for ``rows``."""
        s = tl.arange(0, BLOCK_S)
        m = rows < B
        parts = tl.load(part_ptr + rows[:, None] * split + s[None, :],
                        mask=m[:, None] & (s[None, :] < split), other=0.0)
        return tl.sum(parts, 1), tl.load(kl_ptr + rows, mask=m, other=0.0), m

    @triton.jit
    def _finalize_kernel(
        part_ptr, kl_ptr, beta_ptr, beta_value, loss_ptr, rec_ptr, kl_out_ptr, B, split, denom,
        REDUCE: tl.constexpr, BETA_PTR: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        beta = _beta(beta_ptr, beta_value, BETA_PTR)
        if REDUCE:  # one program: a fixed summation order over the batch
            rec_acc = tl.zeros([BLOCK_B], tl.float32)
            kl_acc = tl.zeros([BLOCK_B], tl.float32)
            for start in range(0, B, BLOCK_B):
                rec_rows, kl_rows, _ = _row_terms(part_ptr, kl_ptr, start + tl.arange(0, BLOCK_B), B, split, BLOCK_S)
                rec_acc += rec_rows
                kl_acc += kl_rows
            rec = tl.sum(rec_acc, 0) / denom
            kl = tl.sum(kl_acc, 0) / denom
            tl.store(rec_ptr, rec)
            tl.store(kl_out_ptr, kl)
            tl.store(loss_ptr, (rec + beta * kl).to(loss_ptr.dtype.element_ty))
        else:
            rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
            rec, kl, m = _row_terms(part_ptr, kl_ptr, rows, B, split, BLOCK_S)
            tl.store(rec_ptr + rows, rec, mask=m)
            tl.store(kl_out_ptr + rows, kl, mask=m)
            tl.store(loss_ptr + rows, rec + beta * kl, mask=m)

    @triton.jit
    def _scale_in_place(ptr, base, lo, hi, factor, BLOCK: tl.constexpr):
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hi
            val = tl.load(ptr + base + offs, mask=mask).to(tl.float32)
            tl.store(ptr + base + offs, (val * factor).to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(
        grad_ptr, gmu_ptr, glv_ptr, gl_ptr, gr_ptr, gk_ptr, gl_stride, gr_stride, gk_stride,
        beta_ptr, beta_value, D, d, chunk,
        HAS_GL: tl.constexpr, HAS_GR: tl.constexpr, HAS_GK: tl.constexpr, BETA_PTR: tl.constexpr,
        SCALE_REC: tl.constexpr, SCALE_KL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # d loss/d rec = 1 and d loss/d kl = beta, so the saved gradients are multiplied by
        # m_rec = g_loss + g_rec and m_kl = beta * g_loss + g_kl (per row; stride 0 = scalar).
        row = tl.program_id(0)
        part = tl.program_id(1)
        beta = _beta(beta_ptr, beta_value, BETA_PTR)
        m_rec = 0.0
        m_kl = 0.0
        if HAS_GL:
            gl = tl.load(gl_ptr + row * gl_stride).to(tl.float32)
            m_rec = m_rec + gl
            m_kl = m_kl + beta * gl
        if HAS_GR:
            m_rec = m_rec + tl.load(gr_ptr + row * gr_stride).to(tl.float32)
        if HAS_GK:
            m_kl = m_kl + tl.load(gk_ptr + row * gk_stride).to(tl.float32)
        if SCALE_REC:
            if m_rec != 1.0:  # the common loss.backward(): no pass over the [B, D] gradient
                lo = part * chunk
                _scale_in_place(grad_ptr, row.to(tl.int64) * D, lo, tl.minimum(lo + chunk, D), m_rec, BLOCK)
        if SCALE_KL:
            if (part == 0) & (m_kl != 1.0):
                _scale_in_place(gmu_ptr, row.to(tl.int64) * d, 0, d, m_kl, BLOCK_D)
                _scale_in_place(glv_ptr, row.to(tl.int64) * d, 0, d, m_kl, BLOCK_D)

    _INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)
else:
    _INTERPRETED = False

if triton is not None:

    @triton.jit
    def _tanh_of(u):
        # tanh(u) = -expm1(-2|u|) / (2 + expm1(-2|u|)), signed: no cancellation near 0 (the
        # Taylor branch of _expm1_terms), no overflow for large |u|; no libdevice.
        _, em1 = _expm1_terms(-2.0 * tl.abs(u))
        t = -em1 / (2.0 + em1)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _sample_fwd_kernel(head_ptr, eps_ptr, mu_ptr, lv_ptr, z_ptr, n, d, limit, BLOCK: tl.constexpr):
        # One element (row b, latent j) of [B, d] per lane: head row b holds mu | raw.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        at = (offs // d) * (2 * d) + offs % d
        m = tl.load(head_ptr + at, mask=mask, other=0.0).to(tl.float32)
        raw = tl.load(head_ptr + at + d, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lv = limit * _tanh_of(raw / limit)
        z = m + tl.exp(0.5 * lv) * e
        tl.store(mu_ptr + offs, m.to(mu_ptr.dtype.element_ty), mask=mask)
        tl.store(lv_ptr + offs, lv.to(lv_ptr.dtype.element_ty), mask=mask)
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sample_bwd_kernel(head_ptr, eps_ptr, gz_ptr, gmu_ptr, glv_ptr, ghead_ptr, n, d, limit,
                           GZ: tl.constexpr, GMU: tl.constexpr, GLV: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        at = (offs // d) * (2 * d) + offs % d
        raw = tl.load(head_ptr + at + d, mask=mask, other=0.0).to(tl.float32)
        t = _tanh_of(raw / limit)
        g_mu = tl.zeros([BLOCK], tl.float32)
        g_lv = tl.zeros([BLOCK], tl.float32)
        if GMU:
            g_mu += tl.load(gmu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GLV:
            g_lv += tl.load(glv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GZ:  # z = mu + exp(lv / 2) eps: dz/dmu = 1, dz/dlv = exp(lv / 2) eps / 2
            gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g_mu += gz
            g_lv += gz * (0.5 * tl.exp(0.5 * limit * t) * e)
        # lv = limit tanh(raw / limit): dlv/draw = 1 - tanh^2
        tl.store(ghead_ptr + at, g_mu.to(ghead_ptr.dtype.element_ty), mask=mask)
        tl.store(ghead_ptr + at + d, (g_lv * (1.0 - t * t)).to(ghead_ptr.dtype.element_ty), mask=mask)


# Splitting a row's columns pays only when the rows alone cannot fill the device; a chunk
# is at least _MIN_CHUNK elements. The interpreter uses tiny values so that small test
# shapes exercise the split path too.
_MIN_CHUNK = 64 if _INTERPRETED else 4096

# How the [B, D] work is cut into programs: "rows" (above: one program per row, looping
# over its columns, split only to fill the device) or "tiles" (one program per block of
# TILE columns of a row, no loop: many more, shorter programs with no loop-carried wait
# between a load and the next). NUM_WARPS: warps per program (None: 16 for the rows
# plan's largest BLOCK, else BLOCK / 256, 1 to 8; one shape's sweep, B=4096, D=12288,
# timed that 2048-wide block at 0.220 / 0.228 / 0.225 ms with 16 / 8 / 4 warps on an
# H100 and 0.159 / 0.168 / 0.174 ms on an H200, 2026-11-27: docs/benchmarks.md).
# Knobs for benchmarks/loss_bench.py, which times them (--sweep); every setting computes
# the same values up to float rounding (the tests run both plans).
PLAN = "rows"
TILE = 32 if _INTERPRETED else 1024
NUM_WARPS: int | None = None


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan(B: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(split, chunk, BLOCK, num_warps) for a [B, D] problem."""
    if PLAN not in ("rows", "tiles"):
        raise ValueError(f"vaekit.kernels.PLAN must be 'rows' or 'tiles', got {PLAN!r}")
    if not (isinstance(TILE, int) and TILE >= 16 and TILE & (TILE - 1) == 0):
        raise ValueError(f"vaekit.kernels.TILE must be a power of 2 >= 16, got {TILE!r}")
    if NUM_WARPS is not None and NUM_WARPS not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"vaekit.kernels.NUM_WARPS must be None or a power of 2 up to 32, got {NUM_WARPS!r}")
    if PLAN == "tiles":
        split = min(_cdiv(D, TILE), 512)
        chunk = _cdiv(_cdiv(D, split), 16) * 16
        block = min(TILE, max(16, _next_pow2(chunk)))
    else:
        split = max(1, min(_cdiv(_target_programs(device), B), _cdiv(D, _MIN_CHUNK), 512))
        chunk = _cdiv(_cdiv(D, split), 16) * 16  # 16-element aligned chunks keep vector loads
        block = min(_MAX_BLOCK, max(16, _next_pow2(chunk)))
    warps = 16 if PLAN == "rows" and block == _MAX_BLOCK else max(1, min(8, block // 256))
    return _cdiv(D, chunk), chunk, block, NUM_WARPS or warps


def fused_available(device) -> bool:
    """Whether the Triton path can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return _INTERPRETED and device.type == "cpu"


def _stride0(t: Tensor | None) -> int:
    return 0 if t is None or t.dim() == 0 else t.stride(0)  # 0: one value for every row


def _forward_launch(dec, x, mu, logvar, beta_t, beta_value, gaussian, gauss_logvar, reduction, loss_dtype,
                    want_grad, want_kl_grad, kl_beta=False, scaled_later=False):
    """The forward's two launches: ``(loss, rec, kl)``, the gradient buffers ``(grad, gmu,
    glv)`` (None where not wanted; the KL's times beta with ``kl_beta``) and the geometry
    the backward needs. ``scaled_later``: the backward multiplies the buffers by the
    incoming gradient (and the KL's by beta), so half-precision ones are kept in float32
    until then: a GradScaler's factor must reach a gradient before fp16's range cuts it
    (stored in fp16, times 1/B, the small ones were flushed to 0), and a gradient is
    rounded to its half dtype once, at the end (bfloat16 ones stored, then scaled, were
    rounded twice: 1-2 bfloat16 ulps off where the eager loss is 0.5-0.7)."""
    B, D = dec.shape
    d = mu.shape[1]
    split, chunk, block, warps = _plan(B, D, dec.device)
    block_d = min(1024, max(16, _next_pow2(d)))
    inv_n = 1.0 / B if reduction == "mean" else 1.0

    def buffer(t):
        half = t.dtype in (torch.float16, torch.bfloat16)
        return torch.empty_like(t, dtype=torch.float32 if scaled_later and half else t.dtype)

    grad = buffer(dec) if want_grad else None
    gmu = buffer(mu) if want_kl_grad else None
    glv = buffer(logvar) if want_kl_grad else None
    f32 = dict(dtype=torch.float32, device=dec.device)
    parts = torch.empty(B, split, **f32)
    kl_rows = torch.empty(B, **f32)
    _fwd_kernel[(B, split)](
        dec, x, dec if grad is None else grad, parts, mu, logvar,
        mu if gmu is None else gmu, logvar if glv is None else glv, kl_rows,
        D, d, chunk, split, float(gauss_logvar), inv_n, kl_rows if beta_t is None else beta_t, beta_value,
        GAUSSIAN=gaussian, WRITE_GRAD=want_grad, WRITE_KL_GRAD=want_kl_grad, KL_BETA=kl_beta,
        BETA_PTR=beta_t is not None, BLOCK=block, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=True,
    )
    reduce = reduction != "none"
    shape = () if reduce else (B,)
    loss = torch.empty(shape, dtype=loss_dtype, device=dec.device)
    rec, kl = torch.empty(shape, **f32), torch.empty(shape, **f32)
    block_s = _next_pow2(split)
    block_b = max(1, min(_next_pow2(B), 4096 // block_s))
    _finalize_kernel[(1 if reduce else _cdiv(B, block_b),)](
        parts, kl_rows, kl_rows if beta_t is None else beta_t, beta_value, loss, rec, kl,
        B, split, float(B) if reduction == "mean" else 1.0,
        REDUCE=reduce, BETA_PTR=beta_t is not None, BLOCK_B=block_b, BLOCK_S=block_s,
        enable_fp_fusion=True,
    )
    return (loss, rec, kl), (grad, gmu, glv), (B, D, d, split, chunk, block, block_d, warps)


def _first_order(name: str, instead: str):
    """``once_differentiable`` for a backward whose gradient cannot itself be differentiated,
    refusing ``create_graph=True`` in words. (``once_differentiable`` alone refuses only
    when the incoming gradient requires grad: ``torch.autograd.grad(out.sum(), x,
    create_graph=True)`` returned a gradient cut from the graph, and second derivatives
    through it came out None or 0.)"""
    def wrap(backward):
        once = torch.autograd.function.once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # the engine runs a backward in grad mode only for create_graph
                raise RuntimeError(f"{name} can be differentiated once: its gradient has no graph "
                                   f"(create_graph=True); for second derivatives use {instead}")
            return once(ctx, *grads)
        return checked
    return wrap


class _FusedVAELoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dec, x, mu, logvar, beta_t, beta_value, gaussian, gauss_logvar, reduction,
                loss_dtype, want_grad, want_kl_grad):
        (loss, rec, kl), (grad, gmu, glv), geometry = _forward_launch(
            dec, x, mu, logvar, beta_t, beta_value, gaussian, gauss_logvar, reduction, loss_dtype, want_grad,
            want_kl_grad, scaled_later=True)
        # Plain attributes, not save_for_backward: the buffers are the gradients to return,
        # scaled in place, and are dropped on the first backward.
        ctx.bufs = (grad, gmu, glv)
        ctx.beta_t, ctx.beta_value = beta_t, beta_value
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)
        return loss, rec, kl

    @staticmethod
    @_first_order("fused_vae_loss", "vaekit.losses.VAELoss")
    def backward(ctx, g_loss, g_rec, g_kl):
        if ctx.bufs is None:
            raise RuntimeError(
                "fused_vae_loss scales its saved gradients in place, so its graph can be "
                "back-propagated once; for retain_graph=True use vaekit.losses.VAELoss"
            )
        grad, gmu, glv = ctx.bufs
        ctx.bufs = None
        if g_loss is None and g_rec is None:
            grad = None
        if g_loss is None and g_kl is None:
            gmu = glv = None
        if grad is not None or gmu is not None:
            B, D, d, split, chunk, block, block_d, warps = ctx.geometry
            anchor = grad if grad is not None else gmu  # stands in for absent pointers
            ptrs = [anchor if t is None else t for t in (grad, gmu, glv, g_loss, g_rec, g_kl, ctx.beta_t)]
            _bwd_kernel[(B, split)](
                *ptrs[:6], _stride0(g_loss), _stride0(g_rec), _stride0(g_kl), ptrs[6], ctx.beta_value,
                D, d, chunk,
                HAS_GL=g_loss is not None, HAS_GR=g_rec is not None, HAS_GK=g_kl is not None,
                BETA_PTR=ctx.beta_t is not None, SCALE_REC=grad is not None, SCALE_KL=gmu is not None,
                BLOCK=block, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=True,
            )
        return grad, None, gmu, glv, None, None, None, None, None, None, None, None


def _fusable(x, out, mu, logvar, beta, reconstruction, reduction, gaussian_logvar) -> bool:
    """Whether the Triton path applies; anything else goes to the eager VAELoss, which also
    raises the errors (shape mismatches included) with the reference messages."""
    if triton is None or reconstruction not in ("bernoulli", "gaussian") or reduction not in REDUCTIONS:
        return False
    tensors = (x, out, mu, logvar)
    if not all(isinstance(t, Tensor) for t in tensors) or type(gaussian_logvar) not in (int, float):
        return False
    if not -_MAX_LOGVAR <= gaussian_logvar <= _MAX_LOGVAR:  # (NaN too) the eager loss refuses it, in its words
        return False
    device, grad_mode = x.device, torch.is_grad_enabled()
    if any(t.device != device or t.dtype not in _DTYPES for t in tensors) or not fused_available(device):
        return False
    if x.dim() < 1 or mu.dim() != 2 or x.shape != out.shape or mu.shape != logvar.shape:
        return False
    if x.shape[0] != mu.shape[0] or x.numel() == 0 or mu.numel() == 0:
        return False
    if isinstance(beta, Tensor) and (beta.dim() != 0 or not beta.is_floating_point() or (grad_mode and beta.requires_grad)
                                     or beta.device not in (device, torch.device("cpu"))):
        return False
    return not (grad_mode and x.requires_grad)


def fused_vae_loss(
    x: Tensor,
    decoder_out: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    beta=1.0,
    reconstruction: str = "bernoulli",
    reduction: str = "mean",
    gaussian_logvar: float = 0.0,
    validate_args: bool | None = None,
) -> LossResult:
    r"""``VAELoss(beta, reconstruction, reduction, logvar=gaussian_logvar)(x, decoder_out, mu, logvar)``,
    in two Triton launches forward and one backward where possible.

    ``loss = reduce(nll(x | decoder_out)) + beta * reduce(KL(N(mu, e^logvar) || N(0, I)))``

    Args:
        x: data ``[B, *event]``; decoder_out: Bernoulli logits or the Gaussian mean, same
            shape; mu, logvar: ``[B, d]``. Each fp32, fp16 or bf16.
        beta: KL weight: a number, or a 0-dim tensor the kernels read from memory.
        reconstruction: ``"bernoulli"`` or ``"gaussian"`` (fixed ``gaussian_logvar``, a
            number) run fused; the other :data:`vaekit.losses.RECONSTRUCTIONS` run eager.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        validate_args: value checks (they synchronise); ``None`` follows
            :func:`vaekit.losses.set_validate_args`.

    Returns:
        ``LossResult(loss, reconstruction, kl)``: fp32 (``loss`` too, whatever the dtype
        of a tensor ``beta``, as :class:`vaekit.losses.VAELoss`), ``[B]`` each for ``"none"``;
        where the eager reference runs instead, its dtype: float64 for float64 inputs.

    The eager reference runs instead when Triton is missing, the tensors are not on a
    device :func:`fused_available` accepts, a dtype is not fp32/fp16/bf16, ``x`` or
    ``beta`` needs a gradient, or the shapes do not fit ``[B, *event]`` / ``[B, d]``.
    """
    if not _fusable(x, decoder_out, mu, logvar, beta, reconstruction, reduction, gaussian_logvar):
        loss_fn = VAELoss(beta, reconstruction, reduction, logvar=gaussian_logvar, validate_args=validate_args)
        return loss_fn(x, decoder_out, mu, logvar)
    grad_mode = torch.is_grad_enabled()
    loss, rec, kl = _FusedVAELoss.apply(
        *_launch_args(x, decoder_out, mu, logvar, beta, reconstruction, reduction, gaussian_logvar, validate_args),
        grad_mode and decoder_out.requires_grad, grad_mode and (mu.requires_grad or logvar.requires_grad),
    )
    return LossResult(loss, rec, kl)


def _launch_args(x, decoder_out, mu, logvar, beta, reconstruction, reduction, gaussian_logvar, validate_args):
    """The value checks (as the eager loss makes them), then the forward launch's arguments
    up to its two gradient flags."""
    gaussian = reconstruction == "gaussian"
    if validating(validate_args):  # the eager checks, in the eager order
        check_beta(beta)
        (check_finite if gaussian else check_unit_interval)("x", x)
        check_finite("mean" if gaussian else "logits", decoder_out)
        check_finite("mu", mu)
        check_finite("logvar", logvar)
    elif not isinstance(beta, Tensor):
        check_beta(beta)  # a number: no sync
    B = x.shape[0]
    beta_t, beta_value = None, 0.0
    if isinstance(beta, Tensor) and beta.device == x.device:
        beta_t = beta
    else:
        beta_value = float(beta)  # a number or a CPU scalar: no device sync
    loss_dtype = torch.float32  # as VAELoss: the loss has its terms' dtype, whatever beta's
    return (decoder_out.reshape(B, -1).contiguous(), x.reshape(B, -1).contiguous(), mu.contiguous(),
            logvar.contiguous(), beta_t, beta_value, gaussian, float(gaussian_logvar), reduction, loss_dtype)


def fused_vae_loss_grads(
    x: Tensor,
    decoder_out: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    beta=1.0,
    reconstruction: str = "bernoulli",
    reduction: str = "mean",
    gaussian_logvar: float = 0.0,
    validate_args: bool | None = None,
) -> tuple[LossResult, tuple[Tensor, Tensor, Tensor]]:
    """:func:`fused_vae_loss`'s values (detached) and the loss's gradients with respect to
    ``decoder_out``, ``mu`` and ``logvar``, from the forward's two launches alone (the
    KL's gradients written times ``beta`` there). ``torch.autograd.backward((decoder_out,
    mu, logvar), grads)`` then does what ``loss.backward()`` does, without its seed and the
    loss's backward kernel (two kernels of a captured training step:
    :class:`vaekit.fast.StaticStep` runs it this way). ``reduction``: ``"mean"`` or
    ``"sum"``. Where the fused path does not apply, the eager reference and
    ``torch.autograd.grad`` with respect to detached copies of the three (so nothing
    upstream of them is run or freed)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (a scalar loss to differentiate), got {reduction!r}")
    if not isinstance(decoder_out, Tensor):  # the gradients are of one tensor: no (mean, logvar) pair
        raise TypeError(f"decoder_out must be a torch.Tensor (a learned decoder variance is not taken here; "
                        f"gaussian_logvar fixes it), got {type(decoder_out).__name__}")
    for name, t in (("x", x), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t)
    if not _fusable(x, decoder_out, mu, logvar, beta, reconstruction, reduction, gaussian_logvar):
        with torch.enable_grad():  # leaves of their own: the caller's graph above them is left alone
            leaves = [t.detach().requires_grad_() for t in (decoder_out, mu, logvar)]
            res = VAELoss(beta, reconstruction, reduction, logvar=gaussian_logvar, validate_args=validate_args)(
                x, *leaves)
            grads = torch.autograd.grad(res.loss, leaves)
        return LossResult(res.loss.detach(), res.reconstruction.detach(), res.kl.detach()), grads
    args = _launch_args(x, decoder_out, mu, logvar, beta, reconstruction, reduction, gaussian_logvar, validate_args)
    (loss, rec, kl), (grad, gmu, glv), _ = _forward_launch(*args, True, True, kl_beta=True)
    return LossResult(loss, rec, kl), (grad.view(decoder_out.shape), gmu, glv)


# ---------------------------------------------------------------------------------------
# The posterior's sample: the encoder head's output to (mu, logvar, z), fused

_SAMPLE_BLOCK = 64 if _INTERPRETED else 1024


def _check_sample_args(head, eps, limit) -> None:
    """Metadata only (a step calls it): ``head [..., 2d]``, ``eps [..., d]`` with leading
    dims that broadcast (the eager formulas broadcast), ``limit > 0``."""
    check_tensor("head", head)
    check_tensor("eps", eps)
    try:
        fits = not head.shape[-1] % 2 and eps.shape[-1] == head.shape[-1] // 2
        fits = fits and torch.broadcast_shapes(head.shape[:-1], eps.shape[:-1]) is not None
    except RuntimeError:  # leading dims that do not broadcast
        fits = False
    if not fits:
        raise ValueError(f"head must be [B, 2d] (mu, then the raw log-variance) and eps [B, d], got head of shape "
                         f"{tuple(head.shape)} and eps of shape {tuple(eps.shape)}")
    check_number("limit", limit, open_low=True)


def posterior_sample(head: Tensor, eps: Tensor, limit: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(mu, logvar, z)`` from an encoder head's output ``[B, 2d]`` (``mu``, then the
    unbounded log-variance ``raw``): ``logvar = limit * tanh(raw / limit)`` (what
    :meth:`vaekit.models.VAE.encode_params` returns) and the reparameterised sample
    ``z = mu + exp(logvar / 2) * eps``. The eager reference of
    :func:`fused_posterior_sample`."""
    _check_sample_args(head, eps, limit)
    mu, raw = head.chunk(2, dim=-1)
    logvar = limit * torch.tanh(raw / limit)
    return mu, logvar, mu + torch.exp(0.5 * logvar) * eps


class _FusedPosteriorSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head, eps, limit):
        B, two_d = head.shape
        d = two_d // 2
        mu = head.new_empty(B, d)
        logvar = head.new_empty(B, d)
        z = torch.empty(B, d, dtype=torch.promote_types(head.dtype, eps.dtype), device=head.device)
        n = B * d
        _sample_fwd_kernel[(_cdiv(n, _SAMPLE_BLOCK),)](head, eps, mu, logvar, z, n, d, float(limit),
                                                       BLOCK=_SAMPLE_BLOCK, num_warps=4, enable_fp_fusion=True)
        ctx.save_for_backward(head, eps)
        ctx.limit = float(limit)
        return mu, logvar, z

    @staticmethod
    @_first_order("fused_posterior_sample", "vaekit.kernels.posterior_sample")
    def backward(ctx, g_mu, g_logvar, g_z):
        head, eps = ctx.saved_tensors
        B, two_d = head.shape
        d, n = two_d // 2, head.shape[0] * (two_d // 2)
        g_head = torch.empty_like(head)
        dummy = head  # a pointer for an absent gradient (not read)
        _sample_bwd_kernel[(_cdiv(n, _SAMPLE_BLOCK),)](
            head, eps, dummy if g_z is None else g_z.contiguous(), dummy if g_mu is None else g_mu.contiguous(),
            dummy if g_logvar is None else g_logvar.contiguous(), g_head, n, d, ctx.limit,
            GZ=g_z is not None, GMU=g_mu is not None, GLV=g_logvar is not None, BLOCK=_SAMPLE_BLOCK,
            num_warps=4, enable_fp_fusion=True)
        return g_head, None, None


def fused_posterior_sample(head: Tensor, eps: Tensor, limit: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`posterior_sample` in one Triton kernel forward and one backward (about 20
    elementwise kernels eagerly: the chunk, the limit, the sample and their gradients,
    with the cat of the two halves' gradients). Elementwise in float32 from the inputs'
    dtypes; ``mu`` and ``logvar`` come out in ``head``'s dtype, ``z`` in the promoted
    dtype of ``head`` and ``eps`` (as the eager formulas give them); the gradient of
    ``eps`` is not computed (the noise needs none). ``StaticStep(fused_sample=True)``
    uses it (off by default until timed on a GPU). The eager reference runs where
    :func:`fused_available` says no, or for shapes other than ``head [B, 2d]``, ``eps [B, d]``.
    """
    _check_sample_args(head, eps, limit)
    if (not fused_available(head.device) or head.dim() != 2 or eps.shape != (head.shape[0], head.shape[1] // 2)
            or eps.device != head.device or head.dtype not in _DTYPES or eps.dtype not in _DTYPES
            or eps.requires_grad):
        return posterior_sample(head, eps, limit)
    return _FusedPosteriorSample.apply(head.contiguous(), eps.contiguous(), float(limit))


# ---------------------------------------------------------------------------------------
# A linear layer (with its ReLU): the bias gradient fused with ReLU's backward

if triton is not None:

    @triton.jit
    def _bias_grad_kernel(gy_ptr, y_ptr, g_ptr, gb_ptr, B, N, RELU: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_N: tl.constexpr):
        # One program per block of BLOCK_N columns, over every row: the bias gradient is the
        # column sums of the output's gradient (zeroed where the ReLU's output is 0), added
        # in a fixed order (no atomics); with RELU the masked gradient is also written.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, B, BLOCK_B):
            rows = start + tl.arange(0, BLOCK_B)
            mask = (rows[:, None] < B) & live[None, :]
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:  # as ReLU's own backward: zero where y <= 0 (a NaN output passes its gradient)
                # compared as float32: Triton's interpreter compares bfloat16 by its bits,
                # which let negative outputs (and -0.0) pass their gradient
                g = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) <= 0, 0.0, g)
                tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
            acc += tl.sum(g, 0)
        tl.store(gb_ptr + cols, acc.to(gb_ptr.dtype.element_ty), mask=live)


_BIAS_BLOCK_N = 16 if _INTERPRETED else 32
_BIAS_BLOCK_B = 16 if _INTERPRETED else 128


def bias_grad(gy: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(g, gb)`` for a linear layer's output gradient ``gy`` ``[B, N]``: ``g`` is ``gy``
    zeroed where the layer's ReLU output ``y`` is 0 or less, as ReLU's backward does
    (``gy`` itself without ``y``), ``gb``
    its column sums (the bias gradient). The eager reference of :func:`fused_bias_grad`."""
    g = gy if y is None else torch.where(y <= 0, 0.0, gy)  # ReLU's backward: a NaN output passes
    return g, g.sum(0)


def fused_bias_grad(gy: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`bias_grad` in one Triton kernel where :func:`fused_available` says yes (two
    kernels eagerly with a ReLU, whose column sums over few rows spread over few blocks).
    The column sums are taken in float32 in a fixed order, so they agree with PyTorch's
    ``sum`` to float rounding."""
    if (not fused_available(gy.device) or gy.dim() != 2 or gy.dtype not in _DTYPES or gy.numel() == 0
            or (y is not None and (y.shape != gy.shape or y.device != gy.device or y.dtype not in _DTYPES))):
        return bias_grad(gy, y)
    gy = gy.contiguous()
    B, N = gy.shape
    g = gy if y is None else torch.empty_like(gy)
    gb = torch.empty(N, dtype=gy.dtype, device=gy.device)
    _bias_grad_kernel[(_cdiv(N, _BIAS_BLOCK_N),)](gy, gy if y is None else y.contiguous(), g, gb, B, N,
                                                   RELU=y is not None, BLOCK_B=_BIAS_BLOCK_B, BLOCK_N=_BIAS_BLOCK_N,
                                                   num_warps=4)
    return g, gb


class _Aside:
    """Where :func:`weight_grads_aside` sends the weights' gradient products."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.open = True  # until the streams have joined
        self.keep: list[Tensor] = []  # what the stream reads, alive until it has joined


# The context of the thread that runs the forward pass; each layer made inside it keeps it
# for its backward pass (which on CUDA runs on autograd's own thread).
_local = threading.local()


@contextlib.contextmanager
def weight_grads_aside(stream):
    """Around a forward and backward pass: each :func:`fused_linear` layer on CUDA made in
    this context (by this thread) computes, in its backward pass, its weight's gradient
    (``g.t() @ x``, which nothing else in the backward pass waits for) on ``stream``, and
    writes it into ``weight.grad`` itself (added to it when there is one) instead of
    returning it; the input's gradient goes on at once, so the products overlap. So the
    weight's gradient hooks do not see it, and a weight used by another operation too
    must not be one of these (the static step's MLP shares none). On leaving, the current
    stream waits for ``stream``: the gradients are then complete (a CUDA graph captures
    the fork and the join). A ``None`` stream changes nothing."""
    if stream is None:
        yield
        return
    if getattr(_local, "aside", None) is not None:
        raise RuntimeError("weight_grads_aside: already inside one")
    aside = _local.aside = _Aside(stream)

    def join():
        aside.open = False
        _current_stream(stream.device).wait_stream(stream)
        aside.keep.clear()  # freed after the join: their memory is reused only after the stream's reads

    try:
        yield
    except BaseException:
        _local.aside = None
        try:  # the work already queued must not outlive its tensors; a failed capture may refuse the wait
            join()
        except Exception:  # noqa: BLE001  (the error that brought us here is the one to raise)
            pass
        raise
    _local.aside = None
    join()


def _current_stream(device):
    return torch.cuda.current_stream(device)


def _on_stream(stream):
    return torch.cuda.stream(stream)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        # bias + ReLU in the matrix product's epilogue where the backend has one (cuBLASLt)
        y = torch._addmm_activation(bias, x, weight.t()) if relu else torch.addmm(bias, x, weight.t())
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.aside = getattr(_local, "aside", None)
        return y

    @staticmethod
    @_first_order("fused_linear", "torch.nn.functional.linear")
    def backward(ctx, gy):
        x, weight, y = ctx.saved_tensors
        g, gb = fused_bias_grad(gy, y)
        gw = None
        aside = ctx.aside
        if (ctx.needs_input_grad[1] and aside is not None and aside.open and weight.is_leaf
                and g.device.type == aside.stream.device.type):  # a leaf: its .grad is the parameter's
            _weight_grad_aside(aside, weight, g, x)
        elif ctx.needs_input_grad[1]:
            gw = g.t() @ x
        gx = g @ weight if ctx.needs_input_grad[0] else None
        return gx, gw, gb if ctx.needs_input_grad[2] else None, None


def _weight_grad_aside(aside: _Aside, weight: Tensor, g: Tensor, x: Tensor) -> None:
    """``weight.grad (+)= g.t() @ x`` on the aside stream, after what the current stream has
    queued (``g``, ``x``); the tensors it touches are kept until the streams join."""
    stream = aside.stream
    stream.wait_stream(_current_stream(g.device))
    grad = weight.grad
    if grad is None:
        grad = torch.empty_like(weight)  # allocated on the current stream, freed (if ever) after the join
        with _on_stream(stream):
            torch.mm(g.t(), x, out=grad)
        weight.grad = grad
    else:
        with _on_stream(stream):
            grad.addmm_(g.t(), x)
    aside.keep += [g, x, grad]


def _autocast_dtype(device_type: str):
    """The dtype autocast runs a linear layer in on ``device_type`` (None: autocast off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, then ``relu`` when asked, for ``x`` ``[B, in]``: the
    bias and the ReLU in the product's epilogue forward (``torch._addmm_activation``), and
    backward the bias gradient and ReLU's mask in one pass (:func:`fused_bias_grad`)
    beside the two products: per layer with a ReLU two kernels fewer than
    ``nn.Linear`` + ``nn.ReLU``, one fewer without. ``StaticStep(fused_linear=True)``
    runs an MLP's layers through it. Under autocast it computes what autocast would: the
    three tensors cast to autocast's dtype (a differentiable cast, none for a weight
    already in it, such as the static step's bfloat16 copies), the layer in that dtype.
    Anything but a 2-D float ``x`` with a 1-D bias goes to ``F.linear`` (+ ``relu``).

    One difference from ``nn.ReLU``: a fused epilogue may turn a NaN before the ReLU into 0
    (``torch.relu`` keeps NaN). A NaN from the layer's input still reaches the weight's
    gradient (0 times NaN is NaN), so a training step with one is still skipped as
    non-finite; the backward pass masks as ReLU's own (zero where the output is 0 or
    less, a NaN output passing its gradient)."""
    if x.dim() != 2 or bias is None or bias.dim() != 1 or not x.is_floating_point():
        y = torch.nn.functional.linear(x, weight, bias)
        return torch.relu(y) if relu else y
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None and all(t.dtype in _DTYPES for t in (x, weight, bias)):  # what autocast casts
        with torch.autocast(x.device.type, enabled=False):
            return _FusedLinear.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), bool(relu))
    if dtype is not None or x.dtype != weight.dtype or bias.dtype != weight.dtype:
        y = torch.nn.functional.linear(x, weight, bias)  # autocast's own way, or its own error
        return torch.relu(y) if relu else y
    return _FusedLinear.apply(x, weight, bias, bool(relu))
