r"""Evaluation: the ELBO, the importance-weighted log-likelihood, and latent-space metrics.

Every function here evaluates: it runs under ``torch.no_grad`` with the model in eval
mode, and puts each submodule's training flag back afterwards. Data ``x`` is
``[N, *event]``; examples are processed in batches of ``batch_size`` moved to the
model's device, and per-example results ``[N]`` come back on that device.

The importance-weighted estimate (Burda et al., 2015) is

.. math::
    \log \hat p_k(x) = \operatorname{logsumexp}_{i=1}^{k} \log w_i - \log k, \qquad
    \log w_i = \log p(x \mid z_i) + \log p(z_i) - \log q(z_i \mid x), \quad z_i \sim q(z \mid x),

a lower bound on ``log p(x)`` in expectation that rises to it as ``k`` grows. It is
vectorised over examples and samples, and chunked over ``k`` so that memory stays near
``chunk_size * batch_size * D`` whatever ``k`` is.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .checks import _LOG_2PI, check_int, check_number, validate_args_enabled, value_checks
from .losses import gaussian_kl
from .iw import MEMORY_BUDGET_BYTES, iw_from_params, randn_like_on
from .iw import decode_nll

__all__ = [
    "PRECISIONS",
    "elbo_terms",
    "iw_log_likelihood",
    "iw_nll",
    "bits_per_dim",
    "continuous_to_discrete_nll",
    "active_units",
    "kl_per_dimension",
    "mutual_information",
    "evaluate_model",
]

# The arithmetic an evaluation may run in (see iw_log_likelihood).
PRECISIONS = ("fp32", "tf32", "bf16")


# ---------------------------------------------------------------------------------------
# Checks and plumbing


def _check_positive_int(name: str, value, *, optional: bool = False) -> None:
    if not (optional and value is None):
        check_int(name, value, low=1)


def _check_precision(precision, model) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    params = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if precision != "fp32" and params is not None and params.dtype == torch.float64:
        # autocast and TF32 leave float64 alone: the result would claim an arithmetic not used
        raise ValueError(f"precision={precision!r} reduces float32 arithmetic, and this model is float64; "
                         f"use precision='fp32' (its own float64)")


def _check_x(model, x) -> None:
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
    if validate_args_enabled():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite, but it holds NaN or infinite values")
        kind = getattr(getattr(model, "config", None), "likelihood", None)
        if kind in ("bernoulli", "continuous_bernoulli") and not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"x must lie in [0, 1] for a {kind} likelihood, got values in "
                             f"[{float(x.min()):g}, {float(x.max()):g}]")


def _device_of(model, fallback: torch.device) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return fallback


@contextlib.contextmanager
def _evaluating(model, precision: str = "fp32"):
    """no_grad + eval mode + the losses' value checks off (the entry points check ``x``
    once, not every chunk) + the arithmetic of ``precision`` (:data:`PRECISIONS`): float32
    matrix products and convolutions on CUDA in full precision for ``"fp32"`` (PyTorch's
    own default lets cuDNN convolutions use TF32), TF32 for ``"tf32"``, and bfloat16
    autocast for ``"bf16"``; each submodule's training flag, the checks and the precision
    flags are restored."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    flags = [m.training for m in modules]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    device = _device_of(model, torch.device("cpu"))
    if modules:
        model.eval()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        with torch.no_grad(), value_checks(False), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                   enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        for m, flag in zip(modules, flags):
            m.training = flag


def _batches(n: int, batch_size: int | None) -> list[slice]:
    step = n if batch_size is None else batch_size
    return [slice(start, start + step) for start in range(0, n, step)]


def _encode_all(model, x: Tensor, batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Posterior parameters of every example: ``(mu, logvar)``, each ``[N, d]``."""
    device = _device_of(model, x.device)
    params = [model.encode_params(x[sl].to(device)) for sl in _batches(x.shape[0], batch_size)]
    return torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])


# ---------------------------------------------------------------------------------------
# ELBO and the importance-weighted likelihood


def _elbo_from_params(model, x, mu, logvar, n_samples, generator) -> dict[str, Tensor]:
    z = mu + torch.exp(0.5 * logvar) * randn_like_on((n_samples, *mu.shape), generator, mu)
    reconstruction = decode_nll(model, x, z).mean(0)
    kl = gaussian_kl(mu, logvar)
    return {"elbo": -(reconstruction + kl), "reconstruction": reconstruction, "kl": kl}


def elbo_terms(
    model, x: Tensor, *, n_samples: int = 1, batch_size: int | None = None, generator=None
) -> dict[str, Tensor]:
    r"""Per-example ELBO, reconstruction NLL and analytic KL.

    .. math::
        \mathrm{ELBO}(x) = -\tfrac1S \textstyle\sum_s -\log p(x \mid z_s)
        - \mathrm{KL}(q(z \mid x) \,\|\, N(0, I)), \quad z_s = \mu + \sigma \epsilon_s,

    with ``S = n_samples`` reparameterised draws for the reconstruction term and the
    exact KL. ``batch_size``: examples per pass (``None``: all at once); ``generator``:
    a ``torch.Generator`` for the noise (``None``: the global one).

    Returns:
        ``{"elbo", "reconstruction", "kl"}``, each ``[N]`` in nats.
    """
    _check_x(model, x)
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("batch_size", batch_size, optional=True)
    with _evaluating(model):
        mu, logvar = _encode_all(model, x, batch_size)
        parts = [
            _elbo_from_params(model, x[sl].to(mu.device), mu[sl], logvar[sl], n_samples, generator)
            for sl in _batches(x.shape[0], batch_size)
        ]
    return {key: torch.cat([p[key] for p in parts]) for key in ("elbo", "reconstruction", "kl")}


def iw_log_likelihood(
    model,
    x: Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    generator=None,
    precision: str = "fp32",
) -> Tensor:
    r"""Importance-weighted estimate of ``log p(x)`` with ``k`` samples per example.

    ``logsumexp_i log w_i - log k`` (see the module docstring). For ``k = 1`` it is a
    one-sample ELBO with a Monte Carlo KL; its expectation rises monotonically with ``k``
    towards ``log p(x)``.

    Reproducibility: with a seeded ``generator``, the result does not depend on
    ``chunk_size`` (up to floating-point summation order): the noise for each batch is
    drawn as consecutive ``torch.randn(min(64, left), B, d, generator=generator)``
    blocks, independent of the chunking. It does depend on ``batch_size``.

    Args:
        model: the vaekit model interface.
        x: data ``[N, *event]``.
        k: importance samples per example.
        chunk_size: samples decoded at once; ``None`` picks it so that one chunk's
            decoder output is about 256 MB on a GPU, 8 MB on a CPU (where cache-sized
            chunks are faster; ``vaekit.iw``). Memory is about
            ``chunk_size * batch_size * D`` elements.
        batch_size: examples per pass (``None``: all at once).
        generator: a ``torch.Generator`` for the noise (``None``: the global one).
        precision: ``"fp32"`` (default: full float32, whatever PyTorch's global flags
            say), ``"tf32"`` (CUDA's float32 matrix products and convolutions in TF32) or
            ``"bf16"`` (bfloat16 autocast). The reduced ones are faster;
            ``benchmarks/iw_bench.py --reduced`` measures how far they move the estimate
            (one 784-512-512-50 model on the CPU, k = 1000, 500 images: bf16 moved the mean
            by -0.002 nats).

    Shape: returns ``[N]``, in nats.
    """
    _check_x(model, x)
    _check_positive_int("k", k)
    _check_positive_int("chunk_size", chunk_size, optional=True)
    _check_positive_int("batch_size", batch_size, optional=True)
    _check_precision(precision, model)
    with _evaluating(model, precision):
        mu, logvar = _encode_all(model, x, batch_size)
        parts = [
            iw_from_params(model, x[sl].to(mu.device), mu[sl], logvar[sl], k, chunk_size, generator)
            for sl in _batches(x.shape[0], batch_size)
        ]
    return torch.cat(parts)


def iw_nll(model, x: Tensor, k: int, **kwargs) -> Tensor:
    """``-iw_log_likelihood(model, x, k, **kwargs)``: the estimated NLL ``[N]`` in nats."""
    return -iw_log_likelihood(model, x, k, **kwargs)


# ---------------------------------------------------------------------------------------
# Units


def bits_per_dim(nll, num_dims: int):
    r"""Convert an NLL in nats (per example) to bits per dimension: ``nll / (D ln 2)``.

    This is a code length only when ``nll`` is the negative log of a *probability* over
    discrete data (a Bernoulli likelihood of binary data, a discretised or categorical
    likelihood of 8-bit data). For a *density* over data scaled to [0, 1] (Gaussian,
    continuous Bernoulli), first convert with :func:`continuous_to_discrete_nll`.

    Args:
        nll: a float or tensor of NLLs in nats, each over ``num_dims`` dimensions.
        num_dims: ``D``, the number of data dimensions per example (e.g. 784).
    """
    _check_positive_int("num_dims", num_dims)
    return nll / (num_dims * math.log(2.0))


def continuous_to_discrete_nll(nll, num_dims: int, n_bits: int = 8):
    r"""Turn the NLL of a density on [0, 1]^D into an NLL of the ``n_bits``-bit data, in nats.

    Let the data be integers ``v`` in ``{0, ..., 2^n - 1}^D``, dequantised and scaled as
    ``y = (v + u) / 2^n`` with ``u ~ U[0, 1)^D``, and let the model have density ``p``
    over ``y``. The density of ``v + u`` is ``p(y) / 2^{nD}`` (change of variables), and
    by Jensen's inequality

    .. math::
        -\log P(v) = -\log \int_{[0,1)^D} p\big(\tfrac{v + u}{2^n}\big)\, 2^{-nD}\, du
        \;\le\; \mathbb{E}_u\big[-\log p(y)\big] + D\, n \log 2 .

    So this returns ``nll + D * n_bits * ln 2``: an upper bound on the discrete NLL when
    ``nll`` is measured on uniformly dequantised data scaled by ``1 / 2^n``, and equal
    to it when ``p`` is constant on each bin. Two cases where it does not apply as is:
    data scaled by ``1 / (2^n - 1)`` (``v / 255``) have the Jacobian ``(2^n - 1)^D``
    instead, and a density evaluated at the bin corners without dequantisation can put
    arbitrarily high density there, so the bound is not a bound any more. Bits per
    dimension are then ``bits_per_dim(result, D) = nll / (D ln 2) + n_bits``.

    Args:
        nll: a float or tensor of NLLs in nats of a density over ``[0, 1]^D``.
        num_dims: ``D``.
        n_bits: bit depth of the original data (8 for ordinary images).
    """
    _check_positive_int("num_dims", num_dims)
    _check_positive_int("n_bits", n_bits)
    return nll + num_dims * n_bits * math.log(2.0)


# ---------------------------------------------------------------------------------------
# Latent-space diagnostics


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


def _mutual_information_from_params(mu, logvar, n_samples, generator) -> Tensor:
    # a bf16 encoder's parameters (precision="bf16") are summarised in float32 at least
    mu, logvar = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (mu, logvar))
    n, d = mu.shape
    z = mu + torch.exp(0.5 * logvar) * randn_like_on((n_samples, n, d), generator, mu)  # [S, N, d]
    # log q(z_i | x_n) for all pairs as two matrix products: -0.5 sum_j (z_j - m_j)^2 / v_j
    # = -0.5 z^2 . (1/v) + z . (m/v) - 0.5 m^2 . (1/v). In float64 and centred on the mean
    # of mu, the cancellation between the terms costs nothing measurable; the direct
    # broadcast over [N, N, d] is the same number and ~50 times slower on a CPU.
    center = mu.double().mean(0)
    m, inv_var = mu.double() - center, torch.exp(-logvar.double())  # [N, d]
    const = -0.5 * (logvar.double().sum(-1) + d * _LOG_2PI + (m.square() * inv_var).sum(-1))
    m_over_v = m * inv_var
    rows = max(1, MEMORY_BUDGET_BYTES // (2 * 8 * n_samples * n))
    total = mu.new_zeros((), dtype=torch.float64)
    for start in range(0, n, rows):
        zc = z[:, start : start + rows].double() - center  # [S, b, d]
        log_q = const - 0.5 * zc.square() @ inv_var.T + zc @ m_over_v.T  # [S, b, N]
        index = torch.arange(start, start + zc.shape[1], device=mu.device)
        # The own term from the same matrix, so that an x-independent encoder gives 0.
        own = log_q.gather(-1, index.expand(n_samples, -1).unsqueeze(-1)).squeeze(-1)
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
    ``torch.randn(n_samples, N, d, generator=generator)`` draw.

    Returns:
        a 0-dim tensor, in nats.
    """
    _check_x(model, x)
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("batch_size", batch_size, optional=True)
    with _evaluating(model):
        mu, logvar = _encode_all(model, x, batch_size)
        return _mutual_information_from_params(mu, logvar, n_samples, generator)


# ---------------------------------------------------------------------------------------
# Everything at once


def evaluate_model(
    model,
    x: Tensor,
    *,
    iw_samples: int = 0,
    batch_size: int = 256,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    n_samples: int = 1,
    threshold: float = 0.01,
    n_bits: int | None = None,
    precision: str = "fp32",
) -> dict:
    """Evaluate a model on ``x`` with one encoder pass; deterministic given ``seed``.

    Returns a dict of Python numbers: ``num_examples``; the means over examples of
    ``elbo``, ``reconstruction`` and ``kl`` (nats, ``n_samples`` draws); with
    ``iw_samples = k > 0``, ``iw_nll`` and ``iw_samples``; ``active_units`` (None for one
    example: a variance needs two),
    ``mutual_information`` (nats) and ``kl_per_dim`` (a list of ``d`` floats); and
    ``bits_per_dim`` of the best NLL at hand (``iw_nll``, else ``-elbo``) where it is a
    code length: a discretized logistic, a Bernoulli likelihood of binary data, or a Gaussian /
    continuous-Bernoulli density when ``n_bits`` says that ``x`` holds dequantised
    ``n_bits``-bit values scaled by ``2^-n_bits`` (see :func:`continuous_to_discrete_nll`).
    ``progress=True`` shows a tqdm bar over the batches. ``precision``: as in
    :func:`iw_log_likelihood` (full float32 by default); the result says which
    (``"precision"``).
    """
    _check_x(model, x)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("chunk_size", chunk_size, optional=True)
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("n_bits", n_bits, optional=True)
    check_number("threshold", threshold)
    _check_precision(precision, model)
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, int) or iw_samples < 0:
        raise ValueError(f"iw_samples must be an int >= 0, got {iw_samples!r}")
    from tqdm.auto import tqdm

    n = x.shape[0]
    with _evaluating(model, precision):
        mu, logvar = _encode_all(model, x, batch_size)
        # One generator per quantity, so that e.g. n_samples does not change the iw draws.
        g_elbo, g_iw, g_mi = (torch.Generator(mu.device).manual_seed(seed + i) for i in range(3))
        sums = dict.fromkeys(("elbo", "reconstruction", "kl", "iw"), 0.0)
        for sl in tqdm(_batches(n, batch_size), desc="evaluate", disable=not progress):
            xb = x[sl].to(mu.device)
            terms = _elbo_from_params(model, xb, mu[sl], logvar[sl], n_samples, g_elbo)
            for key, value in terms.items():
                sums[key] = sums[key] + value.double().sum()  # stays on the device: no sync
            if iw_samples:
                iw = iw_from_params(model, xb, mu[sl], logvar[sl], iw_samples, chunk_size, g_iw)
                sums["iw"] = sums["iw"] + iw.double().sum()
        means = {key: float(value) / n for key, value in sums.items()}
        result = {
            "num_examples": n,
            "elbo": means["elbo"],
            "reconstruction": means["reconstruction"],
            "kl": means["kl"],
            "active_units": _active_units_from_mu(mu, threshold)[0] if n > 1 else None,  # no variance of 1
            "mutual_information": float(_mutual_information_from_params(mu, logvar, 1, g_mi)),
            "kl_per_dim": _kl_per_dim_from_params(mu, logvar).tolist(),
            "precision": precision,
        }
    if iw_samples:
        result["iw_nll"] = -means["iw"]
        result["iw_samples"] = iw_samples
    nll = result.get("iw_nll", -result["elbo"])
    num_dims = x[0].numel()
    likelihood = getattr(getattr(model, "config", None), "likelihood", None)
    if likelihood == "discretized_logistic" or (likelihood == "bernoulli" and bool(((x == 0) | (x == 1)).all())):
        result["bits_per_dim"] = bits_per_dim(nll, num_dims)
    elif likelihood in ("gaussian", "mse", "continuous_bernoulli") and n_bits is not None:
        discrete_nll = continuous_to_discrete_nll(nll, num_dims, n_bits)
        result["bits_per_dim"] = bits_per_dim(discrete_nll, num_dims)
    return result
