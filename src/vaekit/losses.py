"""The VAE objective: likelihoods, the Gaussian KL, and ``VAELoss``.

Conventions (see ``docs/objective.md``):

* data ``x`` is ``[B, *event]``; latent parameters ``mu`` and ``logvar`` are ``[B, d]``;
* every function returns **per-example** values ``[B]``: the sum over the event (data or
  latent) dimensions, in nats;
* the batch is reduced once, at the top, by ``VAELoss(reduction=...)``;
* decoders hand over likelihood *parameters* (Bernoulli logits, Gaussian mean and
  log-variance), never probabilities;
* ``logvar`` is always the log-variance ``log sigma^2``.

Half-precision inputs (e.g. under bf16 autocast) are computed in float32: the
reductions over hundreds of pixels and the exponentials would otherwise lose the
numbers this module exists to get right. Inputs of mixed dtypes are computed in the
common one (float32 logits with float64 data: float64), never rounded to the lower.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    _LOG_2PI,
    check_beta,
    check_finite,
    check_number,
    check_same_shape,
    check_tensor,
    check_unit_interval,
    set_validate_args,
    sum_event,
    upcast,
    validate_args_enabled,
    validating,
)

__all__ = [
    "gaussian_kl",
    "bernoulli_nll",
    "gaussian_nll",
    "mse",
    "continuous_bernoulli_nll",
    "reconstruction_nll",
    "VAELoss",
    "LossResult",
    "RECONSTRUCTIONS",
    "REDUCTIONS",
    "set_validate_args",
    "validate_args_enabled",
]

RECONSTRUCTIONS = ("bernoulli", "gaussian", "mse", "continuous_bernoulli")
REDUCTIONS = ("mean", "sum", "none")
# |logvar| at most for a fixed Gaussian log-variance given as a number: ModelConfig's
# MAX_LOGVAR (vaekit.model_config imports this module, so it cannot be imported from there).
_MAX_LOGVAR = 80.0


# ---------------------------------------------------------------------------------------
# KL divergence


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Union[float, Tensor] = 0.0,
    prior_logvar: Union[float, Tensor] = 0.0,
    *,
    validate_args: bool | None = None,
) -> Tensor:
    r"""KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)), summed over the latent dims.

    .. math::
        \mathrm{KL} = -\tfrac12 \sum_j \big(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2\big)

    for the standard-normal prior; in general, with ``m = prior_mu``, ``s = prior_logvar``
    and ``r = logvar - s``,

    .. math::
        \mathrm{KL} = \tfrac12 \sum_j \big( (e^{r_j} - 1 - r_j) + (\mu_j - m_j)^2 e^{-s_j} \big).

    The first bracket is written with ``expm1`` so that it is exactly zero at the prior
    and never negative through rounding.

    Args:
        mu: posterior means, ``[B, d]`` (at least 2 dims: a 1-D ``mu`` could be one
            example or ``B`` examples of one latent, so it is refused).
        logvar: posterior log-variances ``log sigma^2`` (not variances), ``[B, d]``.
        prior_mu, prior_logvar: prior mean and log-variance: numbers, or floating tensors
            whose shape broadcasts to ``mu``'s without changing it (``[d]``, ``[B, d]``, ...).
            Finite, when validating.
        validate_args: value checks (finiteness); ``None`` follows :func:`set_validate_args`.

    Shape:
        returns ``[B]`` (the last dimension is summed; leading dims are kept, so
        ``[k, B, d]`` gives ``[k, B]``).

    Example:
        >>> gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor([0., 0.])
    """
    check_tensor("mu", mu)
    if mu.dim() < 2:
        raise ValueError(
            f"mu must have shape [B, d] (at least 2 dims), got shape {tuple(mu.shape)}: for one example "
            f"of d latents pass mu[None], for B examples of one latent mu[:, None]"
        )
    _checked("mu", mu, "logvar", logvar, validate_args)
    prior_mu = _checked_prior("prior_mu", prior_mu, mu, validate_args)
    prior_logvar = _checked_prior("prior_logvar", prior_logvar, mu, validate_args)
    mu, logvar, prior_mu, prior_logvar = upcast(mu, logvar, prior_mu, prior_logvar)
    r = logvar - prior_logvar
    diff = mu - prior_mu if not (isinstance(prior_mu, float) and prior_mu == 0.0) else mu
    if isinstance(prior_logvar, float) and prior_logvar == 0.0:
        quad = diff.square()
    else:
        # the residual scaled before it is squared: diff^2 * e^-s is 0 * inf (NaN) at diff = 0
        # once e^-s overflows (s < -88.7 in float32), where the KL is finite
        quad = (diff * torch.exp(-0.5 * torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device))).square()
    return 0.5 * (torch.expm1(r) - r + quad).sum(-1)


def _checked_prior(name: str, prior, mu: Tensor, validate_args):
    """A prior parameter of :func:`gaussian_kl`: a real number (returned as a float) or a
    floating tensor that broadcasts to ``mu``'s shape without changing it (a larger shape
    would turn the ``[B]`` result into ``[B, B]``); finite when validating."""
    if isinstance(prior, numbers.Real) and not isinstance(prior, bool):
        prior = float(prior)
        if validating(validate_args) and not math.isfinite(prior):
            raise ValueError(f"{name} must be finite, got {prior}")
        return prior
    if not isinstance(prior, Tensor):
        raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(prior).__name__}")
    if not prior.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {prior.dtype}")
    try:
        fits = torch.broadcast_shapes(prior.shape, mu.shape) == mu.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} has shape {tuple(prior.shape)}, which does not broadcast to mu's shape "
            f"{tuple(mu.shape)} without changing it: give a number, one value per latent dimension, "
            f"or one per element"
        )
    if validating(validate_args):
        check_finite(name, prior)
    return prior


# ---------------------------------------------------------------------------------------
# Reconstruction likelihoods


def _checked(first_name: str, first, second_name: str, second, validate_args, *, unit_first: bool = False):
    """The common checks of a two-tensor loss: both floating tensors of one shape and, when
    validating, finite (``first`` in [0, 1] when ``unit_first``). Returns both upcast to
    their common dtype (:func:`vaekit.checks.upcast`)."""
    check_tensor(second_name, second)
    check_tensor(first_name, first)
    check_same_shape(first_name, first, second_name, second)
    if validating(validate_args):
        (check_unit_interval if unit_first else check_finite)(first_name, first)
        check_finite(second_name, second)
    return upcast(first, second)


def bernoulli_nll(logits: Tensor, x: Tensor, *, validate_args: bool | None = None) -> Tensor:
    r"""-log Bernoulli(x | sigmoid(logits)), summed over the event dims.

    .. math::
        -\sum_i \big[x_i \log \hat x_i + (1 - x_i)\log(1 - \hat x_i)\big],
        \quad \hat x = \sigma(\ell),

    computed from the logits as ``max(l, 0) - l x + log(1 + e^{-|l|})``, which is finite
    for any finite logit (no ``log(0)``). Targets may be grey levels in [0, 1]; then this
    is the binary cross-entropy, which is *not* a normalised likelihood for continuous
    data (see :func:`continuous_bernoulli_nll`).

    Shape: ``logits`` and ``x`` are ``[B, *event]``; returns ``[B]``.
    """
    x, logits = _checked("x", x, "logits", logits, validate_args, unit_first=True)
    return sum_event(F.binary_cross_entropy_with_logits(logits, x, reduction="none"))


def _as_logvar(logvar, like: Tensor) -> Tensor:
    if isinstance(logvar, (int, float)) and not isinstance(logvar, bool):
        # a fixed variance whose exp (and that of its negative) is a normal float32, as ModelConfig.fixed_logvar
        logvar = check_number("logvar", logvar, low=-_MAX_LOGVAR, high=_MAX_LOGVAR)
        # A fill on the device, not a copy from the host (which a CUDA graph cannot capture);
        # at least float32, as half inputs are computed (not rounded to their precision).
        return torch.full((), float(logvar), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    if not isinstance(logvar, Tensor):
        raise TypeError(f"logvar must be a float or a torch.Tensor, got {type(logvar).__name__}")
    if not logvar.is_floating_point():
        raise TypeError(f"logvar must be a floating-point tensor, got dtype {logvar.dtype}")
    try:
        torch.broadcast_shapes(logvar.shape, like.shape)
    except RuntimeError:
        raise ValueError(
            f"logvar has shape {tuple(logvar.shape)}, which does not broadcast to x's shape "
            f"{tuple(like.shape)}: give a scalar, one value per data dimension, or one per element"
        ) from None
    if torch.broadcast_shapes(logvar.shape, like.shape) != like.shape:
        raise ValueError(f"logvar has shape {tuple(logvar.shape)} but x has shape {tuple(like.shape)}")
    return logvar


def gaussian_nll(
    mean: Tensor, x: Tensor, logvar: Union[float, Tensor] = 0.0, *, validate_args: bool | None = None
) -> Tensor:
    r"""-log N(x | mean, e^logvar), summed over the event dims, constant included.

    .. math::
        \tfrac12 \sum_i \big(\log 2\pi + \log\sigma_i^2 + (x_i - \mu_i)^2 / \sigma_i^2\big)

    Args:
        mean: decoder means, ``[B, *event]``.
        x: data, ``[B, *event]``.
        logvar: the decoder log-variance: a scalar (a number in [-80, 80], or a 0-dim
            tensor), one value per data dimension (shape ``event``), or one per element
            (shape ``[B, *event]``).
        validate_args: value checks (finiteness); ``None`` follows :func:`set_validate_args`.

    Shape: returns ``[B]``.
    """
    check_tensor("mean", mean)
    check_tensor("x", x)
    check_same_shape("x", x, "mean", mean)
    logvar = _as_logvar(logvar, x)
    if validating(validate_args):
        check_finite("x", x)
        check_finite("mean", mean)
        check_finite("logvar", logvar)
    mean, x, logvar = upcast(mean, x, logvar)
    # scaled, then squared: (x - mean)^2 * e^-logvar is 0 * inf (NaN) at x = mean, and inf for
    # a small residual, once e^-logvar overflows (logvar < -88.7 in float32)
    elem = 0.5 * (_LOG_2PI + logvar + ((x - mean) * torch.exp(-0.5 * logvar)).square())
    return sum_event(elem.expand_as(x) if elem.shape != x.shape else elem)


def mse(x_hat: Tensor, x: Tensor, *, validate_args: bool | None = None) -> Tensor:
    r"""Squared error summed over the event dims: ``sum_i (x_hat_i - x_i)^2``.

    This is the tutorial's reconstruction term. It is a Gaussian likelihood with a
    *fixed* variance in disguise: with ``sigma^2`` fixed,
    ``gaussian_nll = mse / (2 sigma^2) + (D/2) log(2 pi sigma^2)``. So
    ``mse + beta*KL = gaussian_nll(sigma^2 = 1/2) + beta*KL - (D/2) log(pi)``: using MSE
    silently fixes the decoder variance at 1/2, and its value is not a likelihood in nats.

    Shape: ``[B, *event]`` each; returns ``[B]``.
    """
    x, x_hat = _checked("x", x, "x_hat", x_hat, validate_args)
    return sum_event((x_hat - x).square())


# log C(eta) = log(eta / tanh(eta/2)) = log 2 + eta^2/12 - 7 eta^4/1440 + 31 eta^6/90720
#   - 127 eta^8/4838400 + ...; below these |eta| the series (to eta^8) is exact to the
# dtype's rounding and avoids 0/0. In float64 the switch at 0.05 also keeps the exact
# form's gradient (1/a - 1/sinh a) from cancelling: within 3e-13 of it relatively on both
# sides (at 1e-3, 8e-10).
_CB_TAYLOR = 0.05
_CB_TAYLOR_F32 = 0.5


def continuous_bernoulli_log_norm(logits: Tensor) -> Tensor:
    r"""Log normalising constant of the continuous Bernoulli, from the logits.

    With ``lambda = sigmoid(eta)``, ``C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda)``,
    which in terms of the logit is ``eta / tanh(eta / 2)`` (and 2 at ``eta = 0``). Written
    as ``log|eta| - log(-expm1(-|eta|)) + log1p(e^{-|eta|})`` it is stable for every
    finite logit; near 0 the Taylor series is used.
    """
    a = logits.abs()
    # Below the switch the exact form's gradient (1/a - 1/sinh a) cancels badly in float32.
    small = a < (_CB_TAYLOR if a.dtype == torch.float64 else _CB_TAYLOR_F32)
    # Each branch sees only inputs where it is used, so neither can overflow into a NaN
    # gradient through torch.where.
    safe = torch.where(small, torch.ones_like(a), a)
    exact = torch.log(safe) - torch.log(-torch.expm1(-safe)) + torch.log1p(torch.exp(-safe))
    a2 = torch.where(small, a, torch.zeros_like(a)).square()
    series = math.log(2.0) + a2 * (1.0 / 12 + a2 * (-7.0 / 1440 + a2 * (31.0 / 90720 - a2 * 127.0 / 4838400)))
    return torch.where(small, series, exact)


def continuous_bernoulli_nll(
    logits: Tensor, x: Tensor, *, validate_args: bool | None = None
) -> Tensor:
    r"""-log ContinuousBernoulli(x | sigmoid(logits)), summed over the event dims.

    The continuous Bernoulli (Loaiza-Ganem and Cunningham, 2019) is the normalised
    density on [0, 1] whose unnormalised form is the Bernoulli cross-entropy:

    .. math::
        -\log p(x) = \mathrm{BCE}(\ell, x) - \log C(\sigma(\ell)).

    Stable at and near ``lambda = 0.5`` (``logits = 0``) and for logits of any size.

    Shape: ``[B, *event]`` each; returns ``[B]``.
    """
    x, logits = _checked("x", x, "logits", logits, validate_args, unit_first=True)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return sum_event(bce - continuous_bernoulli_log_norm(logits))


def reconstruction_nll(
    kind: str,
    decoder_out,
    x: Tensor,
    *,
    logvar: Union[float, Tensor] = 0.0,
    validate_args: bool | None = None,
) -> Tensor:
    """Per-example reconstruction term for a likelihood named by ``kind``.

    ``decoder_out`` is the decoder's output: logits for ``"bernoulli"`` and
    ``"continuous_bernoulli"``; the mean, or a ``(mean, logvar)`` pair for a learned
    decoder variance, for ``"gaussian"``; the reconstruction for ``"mse"``. ``logvar`` is
    the fixed Gaussian log-variance used when ``decoder_out`` carries none.
    """
    if kind == "gaussian":
        if isinstance(decoder_out, (tuple, list)):
            if len(decoder_out) != 2:
                raise ValueError(
                    f"decoder_out for 'gaussian' must be a mean tensor or a (mean, logvar) pair, "
                    f"got a sequence of length {len(decoder_out)}"
                )
            mean, logvar = decoder_out
        else:
            mean = decoder_out
        return gaussian_nll(mean, x, logvar, validate_args=validate_args)
    if isinstance(decoder_out, (tuple, list)):
        raise TypeError(f"decoder_out for {kind!r} must be a tensor, got a {type(decoder_out).__name__}")
    if kind == "bernoulli":
        return bernoulli_nll(decoder_out, x, validate_args=validate_args)
    if kind == "continuous_bernoulli":
        return continuous_bernoulli_nll(decoder_out, x, validate_args=validate_args)
    if kind == "mse":
        return mse(decoder_out, x, validate_args=validate_args)
    raise ValueError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got {kind!r}")


# ---------------------------------------------------------------------------------------
# The objective


class LossResult(NamedTuple):
    """``loss = reconstruction + beta * kl``, each reduced the same way."""

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor


def _reduce(t: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        if t.shape[0] == 0:  # torch's mean of nothing is NaN, which would go on to train a model
            raise ValueError(
                "reduction='mean' needs a batch of at least one example, got an empty batch (x has "
                "batch size 0); use reduction='sum' (0 for no examples) or 'none'"
            )
        return t.mean()
    if reduction == "sum":
        return t.sum()
    return t


class VAELoss(torch.nn.Module):
    r"""The negative ELBO with a KL weight: ``reconstruction + beta * KL(q(z|x) || N(0, I))``.

    ``beta`` multiplies the KL only. ``beta = 1`` is the ELBO; ``beta > 1`` is the
    beta-VAE; schedules change ``beta`` between steps (see :mod:`vaekit.objectives`).

    Args:
        beta: KL weight >= 0: a number (Python or numpy, not a bool) or a 0-dim
            floating-point tensor. May be reassigned between steps; a 0-dim tensor can be
            updated in place by a graph-captured step. The loss keeps the dtype of its
            terms whatever the dtype of a tensor ``beta``.
        reconstruction: ``"bernoulli"`` (logits), ``"gaussian"`` (mean, or
            ``(mean, logvar)``), ``"mse"`` or ``"continuous_bernoulli"`` (logits).
        reduction: ``"mean"`` (nats per example, the scale of published numbers),
            ``"sum"`` (the whole batch; 0 for an empty batch) or ``"none"`` (``[B]``).
            ``"mean"`` refuses an empty batch rather than return NaN.
        logvar: fixed decoder log-variance for ``"gaussian"`` when the decoder gives only
            a mean: a number in [-80, 80] (as ``ModelConfig.fixed_logvar``), or a
            floating-point tensor (shapes as for :func:`gaussian_nll`; finite, when validating).
        validate_args: value checks; ``None`` follows :func:`set_validate_args`.

    Call:
        ``loss_fn(x, decoder_out, mu, logvar) -> LossResult(loss, reconstruction, kl)``

    Example:
        >>> import torch
        >>> from vaekit.losses import VAELoss
        >>> loss_fn = VAELoss(beta=4.0)
        >>> x = torch.rand(8, 784).bernoulli()                 # binary data, [B, *event]
        >>> logits = torch.randn(8, 784, requires_grad=True)   # the decoder's output
        >>> mu, logvar = torch.zeros(8, 16), torch.zeros(8, 16)  # the encoder's, [B, d]
        >>> out = loss_fn(x, logits, mu, logvar)
        >>> out.kl  # the posterior is the prior
        tensor(0.)
        >>> out.loss.backward()
        >>> logits.grad.shape
        torch.Size([8, 784])
    """

    def __init__(
        self,
        beta: Union[float, Tensor] = 1.0,
        reconstruction: str = "bernoulli",
        reduction: str = "mean",
        *,
        logvar: Union[float, Tensor] = 0.0,
        validate_args: bool | None = None,
    ) -> None:
        super().__init__()
        if validate_args is not None and not isinstance(validate_args, bool):
            raise TypeError(f"validate_args must be a bool or None, got {type(validate_args).__name__}")
        if isinstance(logvar, Tensor):
            if not logvar.is_floating_point():
                raise TypeError(f"logvar must be a floating-point tensor, got dtype {logvar.dtype}")
            if validating(validate_args):
                check_finite("logvar", logvar)
        else:
            logvar = check_number("logvar", logvar, low=-_MAX_LOGVAR, high=_MAX_LOGVAR)
        self.beta = check_beta(beta)
        self.reconstruction = reconstruction
        self.reduction = reduction
        self._check_choices()
        self.logvar = logvar
        self.validate_args = validate_args

    def _check_choices(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got {self.reconstruction!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")

    def forward(self, x: Tensor, decoder_out, mu: Tensor, logvar: Tensor) -> LossResult:
        # The settings "may be reassigned between steps": checked here as the constructor
        # checks them (a negative beta, or reduction="avg" read as "none", gave wrong losses
        # silently). A tensor beta's value is read only when validating (a device sync).
        beta = self.beta
        if not isinstance(beta, Tensor) or beta.dim() or not beta.is_floating_point() or validating(self.validate_args):
            check_beta(beta)
        self._check_choices()
        # (a 1-D mu is left to gaussian_kl, which says why: its length is not a batch size)
        if isinstance(x, Tensor) and isinstance(mu, Tensor) and x.dim() >= 1 and mu.dim() >= 2:
            if x.shape[0] != mu.shape[0]:
                raise ValueError(
                    f"x has batch size {x.shape[0]} but mu has batch size {mu.shape[0]}"
                )
        rec = reconstruction_nll(
            self.reconstruction, decoder_out, x, logvar=self.logvar, validate_args=self.validate_args
        )
        kl = gaussian_kl(mu, logvar, validate_args=self.validate_args)
        rec = _reduce(rec, self.reduction)
        kl = _reduce(kl, self.reduction)
        # A float64 0-dim beta would promote a float32 loss; the loss keeps its terms' dtype.
        beta = self.beta.to(kl.dtype) if isinstance(self.beta, Tensor) else self.beta
        return LossResult(rec + beta * kl, rec, kl)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reconstruction={self.reconstruction!r}, reduction={self.reduction!r}"
