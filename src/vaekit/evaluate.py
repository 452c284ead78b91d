r"""Evaluation: the ELBO, the importance-weighted log-likelihood, bits per dimension, and
:func:`evaluate_model`, which reports them together with the latent-space diagnostics.

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

The diagnostics that need only the encoder (active units, KL per dimension, mutual
information) live in :mod:`vaekit.latents`, with the encoder pass and the checks on ``x``
that both modules use; they are importable from here as well.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch
from torch import Tensor

from .checks import MAX_EVAL_SEED, MAX_IW_SAMPLES, check_generator, check_int, check_number
from .losses import gaussian_kl
from .iw import MEMORY_BUDGET_BYTES, _check_samples, auto_chunk_size, iw_from_params, randn_like_on
from .iw import decode_nll
from .latents import _batches, _check_positive_int, _check_x, _encode_all, _evaluating
from .latents import (  # re-exported: the diagnostics were public here first
    _active_units_from_mu, _kl_per_dim_from_params, _mutual_information_from_params, active_units, kl_per_dimension,
    mutual_information,
)

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
# Precision


def _check_precision(precision, model) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    params = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if precision != "fp32" and params is not None and params.dtype == torch.float64:
        # autocast and TF32 leave float64 alone: the result would claim an arithmetic not used
        raise ValueError(f"precision={precision!r} reduces float32 arithmetic, and this model is float64; "
                         f"use precision='fp32' (its own float64)")


# ---------------------------------------------------------------------------------------
# ELBO and the importance-weighted likelihood


def _elbo_from_params(model, x, mu, logvar, n_samples, generator, out_dtype=None) -> dict[str, Tensor]:
    # Samples per decoder pass, so that its output ([S, B, decode_numel] in out_dtype, by
    # default mu's) stays within MEMORY_BUDGET_BYTES whatever S is (on every device: a CPU
    # budget as iw's would chunk, and so change, draws that were one before).
    chunk = auto_chunk_size(x.shape[0], getattr(model, "decode_numel", x[0].numel()), out_dtype or mu.dtype,
                            n_samples, budget=MEMORY_BUDGET_BYTES)
    if n_samples == chunk:
        # One draw, as before the chunking: a CPU randn in pieces is not the same numbers as
        # one randn of them all (pieces of fewer than 16 values, or not a multiple of 16, differ).
        z = mu + torch.exp(0.5 * logvar) * randn_like_on((n_samples, *mu.shape), generator, mu)
        reconstruction = decode_nll(model, x, z).mean(0)
    else:
        # Beyond the budget: one randn(c, B, d) and one decoder pass per chunk of c samples.
        # The sum in float64: up to a million chunks of float32 terms.
        sharing = getattr(model, "sharing_pixels", None)
        total = 0
        with sharing(x) if sharing is not None else contextlib.nullcontext():
            for start in range(0, n_samples, chunk):
                z = mu + torch.exp(0.5 * logvar) * randn_like_on((min(chunk, n_samples - start), *mu.shape),
                                                                 generator, mu)
                nll = decode_nll(model, x, z)
                total = total + nll.double().sum(0)
        reconstruction = (total / n_samples).to(nll.dtype)
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

    Memory: the ``S`` samples of a batch are decoded together when their decoder output
    fits in :data:`vaekit.iw.MEMORY_BUDGET_BYTES` (the noise one ``torch.randn(S, B, d)``
    draw), else in chunks of as many samples as fit (the noise drawn chunk by chunk).

    Returns:
        ``{"elbo", "reconstruction", "kl"}``, each ``[N]`` in nats.
    """
    _check_x(model, x)
    _check_samples("n_samples", n_samples)
    _check_positive_int("batch_size", batch_size, optional=True)
    check_generator(generator)
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
        k: importance samples per example, at most :data:`vaekit.checks.MAX_IW_SAMPLES`.
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
            by +0.001 nats). Only the networks' arithmetic is reduced: the latent side
            (noise, ``z``, its log-densities) stays in float32.

    Shape: returns ``[N]``, in nats.
    """
    _check_x(model, x)
    _check_samples("k", k)
    _check_positive_int("chunk_size", chunk_size, optional=True)
    _check_positive_int("batch_size", batch_size, optional=True)
    check_generator(generator)
    _check_precision(precision, model)
    with _evaluating(model, precision):
        mu, logvar = _encode_all(model, x, batch_size)
        parts = [
            iw_from_params(model, x[sl].to(mu.device), mu[sl], logvar[sl], k, chunk_size, generator,
                           _out_dtype(precision))
            for sl in _batches(x.shape[0], batch_size)
        ]
    return torch.cat(parts)


def _out_dtype(precision: str):
    """What the decoder's output is in under ``precision`` (chunks are sized by it);
    ``None``: the posterior parameters' dtype."""
    return torch.bfloat16 if precision == "bf16" else None


def iw_nll(model, x: Tensor, k: int, **kwargs) -> Tensor:
    """``-iw_log_likelihood(model, x, k, **kwargs)``: the estimated NLL ``[N]`` in nats."""
    return -iw_log_likelihood(model, x, k, **kwargs)


# ---------------------------------------------------------------------------------------
# Units


def _check_nll(nll) -> None:
    if isinstance(nll, bool) or not isinstance(nll, (numbers.Real, Tensor, np.ndarray)):
        raise TypeError(f"nll must be a number or a tensor of NLLs in nats, got {type(nll).__name__}")


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
    _check_nll(nll)
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
    _check_nll(nll)
    _check_positive_int("num_dims", num_dims)
    _check_positive_int("n_bits", n_bits)
    return nll + num_dims * n_bits * math.log(2.0)


# ---------------------------------------------------------------------------------------
# Everything at once


def evaluate_model(
    model,
    x: Tensor,
    *,
    iw_samples: int = 0,
    batch_size: int = 500,
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
    example: a variance needs two; the latent dimensions whose posterior mean's variance
    over the examples is above ``threshold``, :func:`active_units`),
    ``mutual_information`` (nats) with ``mutual_information_max``, the estimate's ceiling
    ``log num_examples`` (an estimate near it says only that ``I(x; z)`` is at least about
    that: :func:`mutual_information`), and ``kl_per_dim`` (a list of ``d`` floats); and
    ``bits_per_dim`` of the best NLL at hand (``iw_nll``, else ``-elbo``) where it is a
    code length: a discretized logistic, a Bernoulli likelihood of binary data, or a Gaussian /
    continuous-Bernoulli density when ``n_bits`` says that ``x`` holds dequantised
    ``n_bits``-bit values scaled by ``2^-n_bits`` (see :func:`continuous_to_discrete_nll`).
    The noise is drawn batch by batch, so the estimates depend on ``batch_size`` as on
    ``seed``: the defaults are ``vaekit evaluate``'s, whose numbers they reproduce.
    ``chunk_size``: importance samples decoded at once for ``iw_nll`` (``None`` picks it
    from a memory budget; it sets the memory used, not the estimate: :func:`iw_log_likelihood`).
    ``progress=True`` shows a tqdm bar over the batches. ``precision``: as in
    :func:`iw_log_likelihood` (full float32 by default); the result says which
    (``"precision"``).
    """
    _check_x(model, x)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("chunk_size", chunk_size, optional=True)
    _check_samples("n_samples", n_samples)
    _check_positive_int("n_bits", n_bits, optional=True)
    check_number("threshold", threshold)
    _check_precision(precision, model)
    check_int("iw_samples", iw_samples, high=MAX_IW_SAMPLES)  # 0: no importance-weighted estimate
    check_int("seed", seed, high=MAX_EVAL_SEED)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    from tqdm.auto import tqdm

    n = x.shape[0]
    with _evaluating(model, precision):
        mu, logvar = _encode_all(model, x, batch_size)
        # One generator per quantity, so that e.g. n_samples does not change the iw draws.
        g_elbo, g_iw, g_mi = (torch.Generator(mu.device).manual_seed(seed + i) for i in range(3))
        sums = dict.fromkeys(("elbo", "reconstruction", "kl", "iw"), 0.0)
        for sl in tqdm(_batches(n, batch_size), desc="evaluate", disable=not progress):
            xb = x[sl].to(mu.device)
            terms = _elbo_from_params(model, xb, mu[sl], logvar[sl], n_samples, g_elbo, _out_dtype(precision))
            for key, value in terms.items():
                sums[key] = sums[key] + value.double().sum()  # stays on the device: no sync
            if iw_samples:
                iw = iw_from_params(model, xb, mu[sl], logvar[sl], iw_samples, chunk_size, g_iw, _out_dtype(precision))
                sums["iw"] = sums["iw"] + iw.double().sum()
        means = {key: float(value) / n for key, value in sums.items()}
        result = {
            "num_examples": n,
            "elbo": means["elbo"],
            "reconstruction": means["reconstruction"],
            "kl": means["kl"],
            "active_units": _active_units_from_mu(mu, threshold)[0] if n > 1 else None,  # no variance of 1
            "mutual_information": float(_mutual_information_from_params(mu, logvar, 1, g_mi)),
            "mutual_information_max": math.log(n),
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
