r"""The latent space: what a model's encoder makes of a dataset.

Three diagnostics, each read off one encoder pass over ``x`` with no decoder call:

* :func:`active_units`: how many latent dimensions have a posterior mean that moves with
  ``x`` (Burda et al., 2015);
* :func:`kl_per_dimension`: the mean ``KL(q(z_j|x) || N(0, 1))`` of each dimension, near
  zero where a dimension has collapsed to the prior;
* :func:`mutual_information`: ``I(x; z)`` under ``p_data(x) q(z|x)``, with the aggregate
  posterior taken over the examples in ``x``.

Also here, because every evaluation starts with it: the encoder pass itself (examples in
batches of ``batch_size`` on the model's device, results on that device), the context it
runs in (``torch.no_grad``, eval mode, each submodule's training flag put back after) and
the checks on ``x``. :mod:`vaekit.evaluate` builds the likelihoods on the same pass, and
the three diagnostics are importable from there too.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .checks import (
    _LOG_2PI, _value_range, check_generator, check_int, check_number, validate_args_enabled, value_checks,
)
from .iw import MEMORY_BUDGET_BYTES, _check_model, _check_samples, randn_like_on
from .losses import gaussian_kl

__all__ = ["active_units", "kl_per_dimension", "mutual_information", "tf32_flags"]


# ---------------------------------------------------------------------------------------
# Checks and the encoder pass (shared with vaekit.evaluate)


def _check_positive_int(name: str, value, *, optional: bool = False) -> None:
    if not (optional and value is None):
        check_int(name, value, low=1)


def _check_x(model, x) -> None:
    _check_model(model)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape [N, *event] with N >= 1, got shape {tuple(x.shape)}")
    weights = next((p for p in getattr(model, "parameters", list)() if p.is_floating_point()), None)
    if weights is not None and weights.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's weights are {weights.dtype}: pass "
                        f"x.to({weights.dtype}) (or convert the model)")
    expected = getattr(getattr(model, "config", None), "input_shape", None)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(
            f"x has event shape {tuple(x.shape[1:])} but model.config.input_shape is {tuple(expected)}"
        )
    if validate_args_enabled() and x.numel():
        lo, hi = _value_range(x)  # one pass, no masks of x's size (NaN and infinities show in it)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("x must be finite, but it holds NaN or infinite values")
        kind = getattr(getattr(model, "config", None), "likelihood", None)
        if kind in ("bernoulli", "continuous_bernoulli") and not (lo >= 0 and hi <= 1):
            raise ValueError(f"x must lie in [0, 1] for a {kind} likelihood, got values in [{lo:g}, {hi:g}]")


def _device_of(model, fallback: torch.device) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return fallback


@contextlib.contextmanager
def tf32_flags(on: bool):
    """CUDA's float32 matrix products and convolutions on TF32 tensor cores (``on``) or in
    full float32 (not ``on``) within the block; PyTorch's two flags are restored after."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {type(on).__name__}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _evaluating(model, precision: str = "fp32"):
    """no_grad + eval mode + the losses' value checks off (the entry points check ``x``
    once, not every chunk) + the arithmetic of ``precision``
    (:data:`vaekit.evaluate.PRECISIONS`): float32 matrix products and convolutions on CUDA
    in full precision for ``"fp32"`` (PyTorch's own default lets cuDNN convolutions use
    TF32), TF32 for ``"tf32"``, and bfloat16 autocast for ``"bf16"``; each submodule's
    training flag, the checks and the precision flags are restored."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    flags = [m.training for m in modules]
    device = _device_of(model, torch.device("cpu"))
    if modules:
        model.eval()
    try:
        with tf32_flags(precision == "tf32"), torch.no_grad(), value_checks(False), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def _batches(n: int, batch_size: int | None) -> list[slice]:
    step = n if batch_size is None else batch_size
    return [slice(start, start + step) for start in range(0, n, step)]


def _encode_all(model, x: Tensor, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Posterior parameters of every example: ``(mu, logvar)``, each ``[N, d]``.

    An encoder of wider weights that ran in half precision (bf16 autocast) hands back
    tensors of its values in the weights' dtype: the latent side of every estimate (the
    noise, ``z``, ``log q(z|x)``, ``log p(z)``, their sums over ``d``) is then computed as in
    full precision, and a reduced ``precision`` rounds only the networks' arithmetic, which
    is what it is for. A model whose weights are half precision keeps its dtype throughout.
    """
    device = _device_of(model, x.device)
    params = [model.encode_params(x[sl].to(device)) for sl in _batches(x.shape[0], batch_size)]
    mu, logvar = torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])
    weights = _weights_dtype(model)
    if mu.dtype in _HALF and weights is not None and weights not in _HALF:
        mu, logvar = mu.to(weights), logvar.to(weights)
    return mu, logvar


_HALF = (torch.float16, torch.bfloat16)


def _weights_dtype(model) -> torch.dtype | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


# ---------------------------------------------------------------------------------------
# Diagnostics


def _active_units_from_mu(mu: Tensor, threshold: float) -> tuple[int, Tensor]:
    if mu.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 examples to measure active units, got {mu.shape[0]}")
    variances = mu.double().var(dim=0).to(torch.promote_types(mu.dtype, torch.float32))  # not rounded to bf16
    return int((variances > threshold).sum()), variances


def active_units(
    model, x: Tensor, *, threshold: float = 0.01, batch_size: int | None = 256
) -> tuple[int, Tensor]:
    r"""Active latent units (Burda et al., 2015): ``A_j = Cov_x(E_{q(z|x)}[z_j]) > threshold``.

    The variance over the examples of the posterior mean of each latent dimension (the
    sample variance, ``N - 1`` in the denominator). A unit whose posterior mean does not
    move with ``x`` carries no information about it.

    Returns:
        ``(count, variances)``: the number of active units and the variances ``[d]``.
    """
    _check_x(model, x)
    _check_positive_int("batch_size", batch_size, optional=True)
    check_number("threshold", threshold)
    with _evaluating(model):
        mu, _ = _encode_all(model, x, batch_size)
    return _active_units_from_mu(mu, float(threshold))


def _kl_per_dim_from_params(mu: Tensor, logvar: Tensor) -> Tensor:
    # gaussian_kl sums the last dim; a trailing singleton keeps each latent dim apart.
    return gaussian_kl(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)


def kl_per_dimension(model, x: Tensor, *, batch_size: int | None = 256) -> Tensor:
    r"""Mean over examples of the analytic ``KL(q(z_j|x) || N(0, 1))`` of each latent dim.

    Sums to the mean of :func:`vaekit.losses.gaussian_kl`. Dimensions near zero have
    collapsed to the prior.

    Shape: returns ``[d]``.
    """
    _check_x(model, x)
    _check_positive_int("batch_size", batch_size, optional=True)
    with _evaluating(model):
        mu, logvar = _encode_all(model, x, batch_size)
    return _kl_per_dim_from_params(mu, logvar)


def _mi_blocks(n: int, d: int, n_samples: int, itemsize: int):
    """How :func:`_mutual_information_from_params` splits its work so that what it
    allocates stays within :data:`vaekit.iw.MEMORY_BUDGET_BYTES`: ``(chunk, rows_for)``,
    the samples drawn at once and, for a draw of ``s`` samples, the rows of ``log q`` made
    at once. What it holds: the float64 ``[N, d]`` terms of the means and variances (three,
    and two temporaries while they are made) and ``[N]`` constants; the draw ``z``
    ``[s, N, d]`` in the parameters' dtype; and per block of ``b`` rows two float64
    ``[s, b, N]`` matrices at a time (``log q`` and the term added to it, or logsumexp's
    shifted copy) and three ``[s, b, d]`` ones. The draw gets half of what the fixed terms
    leave, the blocks the other half. Usually that is all the samples, in one randn: a
    CPU randn in pieces is not the same numbers as one randn of them all."""
    fixed = (5 * d + 2) * n * 8
    half = max(0, MEMORY_BUDGET_BYTES - fixed) // 2
    chunk = max(1, min(n_samples, half // (n * d * itemsize)))

    def rows_for(s: int) -> int:
        return max(1, half // (8 * s * (2 * n + 3 * d)))

    return chunk, rows_for


def _mutual_information_from_params(mu, logvar, n_samples, generator) -> Tensor:
    # a bf16 encoder's parameters (precision="bf16") are summarised in float32 at least
    mu, logvar = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (mu, logvar))
    n, d = mu.shape
    # log q(z_i | x_n) for all pairs as two matrix products: -0.5 sum_j (z_j - m_j)^2 / v_j
    # = -0.5 z^2 . (1/v) + z . (m/v) - 0.5 m^2 . (1/v). In float64 and centred on the mean
    # of mu, the cancellation between the terms costs nothing measurable; the direct
    # broadcast over [N, N, d] is the same number and ~50 times slower on a CPU.
    center = mu.double().mean(0)
    m, inv_var = mu.double() - center, torch.exp(-logvar.double())  # [N, d]
    const = -0.5 * (logvar.double().sum(-1) + d * _LOG_2PI + (m.square() * inv_var).sum(-1))
    m_over_v = m * inv_var
    chunk, rows_for = _mi_blocks(n, d, n_samples, mu.element_size())
    total = mu.new_zeros((), dtype=torch.float64)
    for first in range(0, n_samples, chunk):
        s = min(chunk, n_samples - first)
        # mu + sigma * noise, computed in the noise's own memory (the same numbers: the
        # product and the sum commute exactly)
        z = randn_like_on((s, n, d), generator, mu).mul_(torch.exp(0.5 * logvar)).add_(mu)  # [s, N, d]
        rows = rows_for(s)
        for start in range(0, n, rows):
            zc = z[:, start : start + rows].double() - center  # [s, b, d]
            # const - 0.5 z^2 . (1/v) + z . (m/v), in log_q's own memory: -(a) + c is c - a exactly
            log_q = (0.5 * zc.square() @ inv_var.T).neg_().add_(const)  # [s, b, N]
            log_q += zc @ m_over_v.T
            index = torch.arange(start, start + zc.shape[1], device=mu.device)
            # The own term from the same matrix, so that an x-independent encoder gives 0.
            own = log_q.gather(-1, index.expand(s, -1).unsqueeze(-1)).squeeze(-1)
            log_aggregate = torch.logsumexp(log_q, dim=-1) - math.log(n)
            total = total + (own - log_aggregate).sum()
    return (total / (n_samples * n)).to(mu.dtype)


def mutual_information(
    model, x: Tensor, *, n_samples: int = 1, batch_size: int | None = 256, generator=None
) -> Tensor:
    r"""Estimate of ``I(x; z)`` under the encoder's joint ``p_data(x) q(z|x)``.

    .. math::
        I = \mathbb{E}_{x}\,\mathbb{E}_{q(z|x)}\big[\log q(z \mid x) - \log q(z)\big],
        \qquad \log q(z) \approx \operatorname{logsumexp}_{n=1}^{N} \log q(z \mid x_n) - \log N,

    with the aggregate posterior ``q(z)`` taken over the ``N`` examples in ``x`` and
    ``n_samples`` draws of ``z`` per example. This is the mutual information of the
    *empirical* distribution of ``x``: since the mixture contains ``q(z|x_i)/N``, every
    term is at most ``log N``, so the estimate never exceeds ``log N`` and is biased low
    for the population value whenever that value is not small next to ``log N``. Use
    as many examples as you can afford (the cost is ``N^2 d``). The noise is one
    ``torch.randn(n_samples, N, d, generator=generator)`` draw when it fits in half of
    :data:`vaekit.iw.MEMORY_BUDGET_BYTES` (less the float64 ``[N, d]`` terms of the
    estimate), else one draw per chunk of as many samples as fit; the estimate's own
    allocations stay within the budget.

    Returns:
        a 0-dim tensor, in nats.
    """
    _check_x(model, x)
    _check_samples("n_samples", n_samples)
    _check_positive_int("batch_size", batch_size, optional=True)
    check_generator(generator)
    with _evaluating(model):
        mu, logvar = _encode_all(model, x, batch_size)
        return _mutual_information_from_params(mu, logvar, n_samples, generator)
