"""Likelihoods with their own parameterisation, beyond those of :mod:`vaekit.losses`.

The calibrated Gaussian decoder (sigma-VAE), whose variance is set to its maximum-likelihood
value instead of being learned or fixed, the discretized logistic for data on an 8-bit
(or ``n_bits``) grid, and the Bernoulli term of many latent samples per example (what the
importance-weighted estimates score). Conventions as in :mod:`vaekit.losses`: per-example
values in nats, summed over the event dims; half precision is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    _LOG_2PI, check_finite, check_int, check_number, check_same_shape, check_tensor,
    check_unit_interval, read_value, sum_event, upcast, validating,
)
from .losses import _MAX_LOGVAR

__all__ = ["optimal_sigma_nll", "discretized_logistic_nll", "bernoulli_nll_samples"]


def optimal_sigma_nll(mean: Tensor, x: Tensor, *, per: str = "example", min_logvar: float = -9.0,
                      validate_args: bool | None = None) -> Tensor:
    r"""Gaussian NLL with the decoder variance at its maximum-likelihood value (sigma-VAE).

    ``sigma^2 = max(MSE, e^min_logvar)`` where MSE is the mean squared error over the ``D``
    data dims of each example (``per="example"``) or over the whole batch (``per="batch"``,
    one shared variance as in Rybkin et al., 2021). Then, with ``SSE_i = sum (x_i - mean_i)^2``,

    .. math::
        \mathrm{NLL}_i = \tfrac12 \big( D(\log 2\pi + \log\sigma^2) + SSE_i / \sigma^2 \big),

    which is ``D/2 (log 2 pi + log MSE + 1)`` where the clamp is inactive. ``sigma^2`` is *not*
    detached: it is a stationary point of the (batch-summed) NLL in ``sigma``, so by the
    envelope theorem the gradient in ``mean`` is the same as with a detached ``sigma``, and
    keeping it makes the returned value's own gradient the one back-propagated. The clamp is
    applied to the MSE before the log, so a perfect reconstruction has finite gradients;
    ``min_logvar`` lies in [-80, 80], so that ``1 / sigma^2`` is finite in float32 too.

    Shape: ``mean``, ``x`` are ``[B, *event]``; returns ``[B]``.
    """
    check_tensor("mean", mean)
    check_tensor("x", x)
    check_same_shape("x", x, "mean", mean)
    if per not in ("example", "batch"):
        raise ValueError(f"per must be 'example' or 'batch', got {per!r}")
    if x.dim() > 1 and math.prod(x.shape[1:]) == 0:  # a variance fitted to no values: NaN
        raise ValueError(f"x must hold at least one value per example, got shape {tuple(x.shape)}")
    # its exp is the variance's floor, and e^-min_logvar must stay finite in float32 (else a
    # perfect fit's SSE / sigma^2 is 0 * inf): the range of ModelConfig.fixed_logvar
    min_logvar = check_number("min_logvar", min_logvar, low=-_MAX_LOGVAR, high=_MAX_LOGVAR)
    if validating(validate_args):
        check_finite("x", x)
        check_finite("mean", mean)
    mean, x = upcast(mean, x)
    sq = (x - mean).square().reshape(x.shape[0], math.prod(x.shape[1:]))  # no -1: B may be 0
    dims = sq.shape[1]
    sse = sq.sum(1)
    mse = sse / dims if per == "example" else (sse.sum() / sq.numel()).expand_as(sse)
    logvar = torch.clamp(mse, min=math.exp(min_logvar)).log()
    return 0.5 * (dims * (_LOG_2PI + logvar) + sse * torch.exp(-logvar))


# Below this log bin-width-over-scale, log(1 - e^-delta) uses its series (error ~ delta^4 / 2880).
_SERIES_BELOW = -7.0
# exp(-log_scale) must stay finite in float32; e^-80 is far below any bin width.
_MIN_LOG_SCALE = -80.0


def discretized_logistic_nll(mean: Tensor, log_scale: Tensor, x: Tensor, *, n_bits: int = 8,
                             validate_args: bool | None = None) -> Tensor:
    r"""-log P(x) for x on the grid ``k / (2^n_bits - 1)`` under one logistic per subpixel.

    Each value owns the bin ``[x - h, x + h]``, ``h = 1 / (2 (2^n_bits - 1))``; the first bin
    extends to ``-inf`` and the last to ``+inf``, so the masses of all values sum to 1 (the
    edges are computed from the level ``v = round(x (2^n_bits - 1))``, so that neighbouring
    bins share each edge exactly, whatever the scale). With
    ``a = (x + h - mean) / s`` and ``b = (x - h - mean) / s``, ``s = e^log_scale``,

    .. math::
        P = \sigma(a) - \sigma(b) = \sigma(a)\,\sigma(-b)\,(1 - e^{-(a - b)}),

    computed in logs (``logsigmoid`` twice, ``log(-expm1(-delta))`` with ``delta = 2h / s``
    formed in log space) so it is finite for log scales far from 0 and means outside [0, 1].
    The first bin is ``sigma(a)``, the last ``sigma(-b)``. ``log_scale`` is clamped below at
    -80 (so ``1/s`` cannot overflow float32); half precision is computed in float32.

    Shape: ``mean``, ``log_scale``, ``x`` are ``[B, *event]``; returns ``[B]`` in nats.
    """
    for name, t in (("mean", mean), ("log_scale", log_scale), ("x", x)):
        check_tensor(name, t)
    check_same_shape("x", x, "mean", mean)
    check_same_shape("x", x, "log_scale", log_scale)
    # 16 bits at most: finer grids are not told apart in float32 (and 2**n_bits overflows a float)
    levels = 2 ** check_int("n_bits", n_bits, low=1, high=16) - 1
    if validating(validate_args) and x.numel():  # (an empty batch has no values to check)
        check_finite("mean", mean)
        check_finite("log_scale", log_scale)
        check_unit_interval("x", x)
        off_grid = read_value((x * levels - (x * levels).round()).abs().max(), "x", float)
        if off_grid > 1e-3:
            raise ValueError(f"x must hold multiples of 1/{levels} (n_bits={n_bits}); a value is "
                             f"{off_grid:.3g} of a level away from the grid")
    mean, log_scale, x = upcast(mean, log_scale, x)
    log_scale = log_scale.clamp(min=_MIN_LOG_SCALE)
    # The bins' edges from the level's index: the edge two neighbouring bins share is one
    # float, (v + 0.5) / levels, so their masses meet exactly. Formed as x + h and x' - h
    # instead, it rounded two ways, and under a sharp logistic (the error grows as 1/s) the
    # masses overlapped or left a gap: they summed to 0.9988 at log_scale -12 in float32.
    v = (x * levels).round()
    upper, lower = (v + 0.5) / levels, (v - 0.5) / levels
    inv_scale = torch.exp(-log_scale)
    log_cdf_upper = F.logsigmoid((upper - mean) * inv_scale)
    log_sf_lower = F.logsigmoid((mean - lower) * inv_scale)
    log_delta = math.log(1.0 / levels) - log_scale
    small = log_delta < _SERIES_BELOW
    delta = torch.exp(log_delta.clamp(max=30.0))  # beyond, 1 - e^-delta is 1 in every dtype
    d_small = torch.where(small, delta, torch.zeros_like(delta))
    series = log_delta - d_small / 2 + d_small.square() / 24
    exact = torch.log(-torch.expm1(-torch.where(small, torch.ones_like(delta), delta)))
    interior = log_cdf_upper + log_sf_lower + torch.where(small, series, exact)
    log_p = torch.where(v < 0.5, log_cdf_upper, torch.where(v > levels - 0.5, log_sf_lower, interior))
    return -sum_event(log_p)


def bernoulli_nll_samples(logits: Tensor, x: Tensor, *, validate_args: bool | None = None) -> Tensor:
    r""":func:`vaekit.losses.bernoulli_nll` of ``k`` decoded samples of each example, without
    repeating ``x`` ``k`` times.

    ``logits`` holds the decoder's output for ``k`` latent samples of each of the ``B``
    examples, sample-major (``[k, B, *event]``, or ``[k * B, *event]`` as one decoder call
    returns it); ``x`` is ``[B, *event]``. Each element is ``softplus(l) - x l``, the
    softplus as ``logaddexp(l, 0)``: that is ``max(l, 0) - l x + log(1 + e^{-|l|})``, the
    binary cross-entropy from logits, with ``x`` broadcast over the samples. Without gradients the product is subtracted in place:
    about six passes over the ``k * B * D`` logits where the binary cross-entropy of a
    repeated ``x`` takes about twice as many (the importance-weighted estimate's largest
    cost after the decoder's matrix products). When validating, ``x`` must lie in [0, 1] and
    the logits be finite (the evaluation turns the checks off and checks ``x`` once). Half
    precision is computed in float32.

    Shape: returns ``[k, B]``.
    """
    check_tensor("logits", logits)
    check_tensor("x", x)
    b, event = x.shape[0], tuple(x.shape[1:])
    if b >= 1 and tuple(logits.shape[1:]) == event and logits.shape[0] % b == 0:
        k = logits.shape[0] // b
    elif logits.dim() == x.dim() + 1 and logits.shape[1] == b and tuple(logits.shape[2:]) == event:
        k = logits.shape[0]
    else:
        raise ValueError(f"logits must be [k, B, *event] or [k * B, *event] for x of shape {tuple(x.shape)} "
                         f"(B >= 1), got {tuple(logits.shape)}")
    if validating(validate_args):
        check_unit_interval("x", x)
        check_finite("logits", logits)
    dims = math.prod(event)
    logits, x = upcast(logits.reshape(k, b, dims), x.reshape(b, dims))
    # softplus(l) = log(e^0 + e^l), exactly (F.softplus returns l itself above l = 20)
    zero = logits.new_zeros(())
    if torch.is_grad_enabled() and (logits.requires_grad or x.requires_grad):
        return (torch.logaddexp(logits, zero) - logits * x).sum(-1)
    terms = torch.logaddexp(logits, zero)
    terms.addcmul_(logits, x, value=-1.0)
    return terms.sum(-1)
