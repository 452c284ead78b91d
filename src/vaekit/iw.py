"""Importance weighting: the weights ``log p(x, z) - log q(z|x)`` and the IWAE bound (Burda
et al., 2015), which the IWAE objective (:mod:`vaekit.objectives`, where these names are
public too) and the evaluation share; and the machinery of the evaluation's estimate:
noise drawn in fixed blocks, chunks sized to a memory budget, and a running logsumexp
over the chunks.

:func:`vaekit.evaluate.iw_log_likelihood` is the public entry point (it checks its
arguments and puts the model in evaluation mode); :func:`iw_from_params` is what it and
:func:`vaekit.evaluate.evaluate_model` run for each batch, given the posterior parameters.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .checks import (
    _LOG_2PI, MAX_IW_SAMPLES, _out_of_memory, check_int, check_same_shape, check_tensor, read_value, upcast,
    validating,
)

__all__ = ["decode_nll", "repeat_for_samples", "log_weights_from_noise", "log_importance_weights", "iwae_bound", "iwae_loss",
           "iw_from_params", "normal_chunks", "auto_chunk_size", "randn_like_on", "noise_dtype", "MEMORY_BUDGET_BYTES",
           "CPU_BUDGET_BYTES", "NOISE_BLOCK"]


def _log_normal(z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None) -> Tensor:
    """Elementwise log N(z | mu, e^logvar); N(0, 1) when mu and logvar are None."""
    if mu is None:
        return -0.5 * (_LOG_2PI + z.square())
    # scaled, then squared: (z - mu)^2 * e^-logvar is 0 * inf (NaN) at z = mu once e^-logvar
    # overflows (logvar < -88.7 in float32)
    return -0.5 * (_LOG_2PI + logvar + ((z - mu) * torch.exp(-0.5 * logvar)).square())


def _check_samples(name: str, value) -> int:
    """``value`` as an int in [1, MAX_IW_SAMPLES]: samples per example, each decoded (beyond
    the cap a call runs for days or runs out of memory, where it should be refused)."""
    check_int(name, value, low=1)  # "an int >= 1" below the range, as before the cap
    return check_int(name, value, low=1, high=MAX_IW_SAMPLES)


def _check_model(model) -> None:
    """Refuse what is not a model (``None``, a tensor): its first use would raise an
    AttributeError far from the call. Only the interface is asked for, not a vaekit class."""
    if not hasattr(model, "encode_params"):
        raise TypeError(f"model must be a vaekit VAE (a model with encode_params), got {type(model).__name__}")


def repeat_for_samples(x: Tensor, k: int) -> Tensor:
    """``x`` ``[B, *event]`` once per sample, sample-major: ``[k * B, *event]`` (a copy)."""
    check_int("k", k, low=1)
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


def decode_nll(model, x: Tensor, z: Tensor) -> Tensor:
    """``-log p(x | z)`` for ``z`` of shape ``[k, B, d]``: ``[k, B]`` from one decoder call
    (``model.nll_samples`` when the model has one, else ``model.nll`` on ``x`` repeated)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, *event], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"x must be [B, *event], got shape {tuple(x.shape)}")
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor [k, B, d], got {type(z).__name__}")
    if z.dim() != 3 or z.shape[0] < 1:
        raise ValueError(f"z must be [k, B, d] with k >= 1, got shape {tuple(z.shape)}")
    k, b, d = z.shape
    if b != x.shape[0]:
        raise ValueError(f"z must be [k, B, d] with B = {x.shape[0]}, the examples of x, got shape {tuple(z.shape)}")

    def repeated():  # model.nll expects matching [k*B, *event] shapes
        return repeat_for_samples(x, k)

    if getattr(model, "autoregressive", False):  # p(x_i | x_<i, z): the decoder reads x too
        # decode_samples (when the model has it) may share work across the k samples of an image.
        decode_samples = getattr(model, "decode_samples", None)
        out = decode_samples(z, x) if decode_samples is not None else model.decode(z.reshape(k * b, d), repeated())
    else:
        out = model.decode(z.reshape(k * b, d))
    nll_samples = getattr(model, "nll_samples", None) if b else None
    if nll_samples is not None:  # the model scores k samples of each example itself
        nll = nll_samples(out, x)
        if nll.shape != (k, b):
            raise ValueError(f"model.nll_samples must return shape ({k}, {b}), got {tuple(nll.shape)}")
        return nll
    nll = model.nll(out, repeated())
    if nll.shape != (k * b,):
        raise ValueError(f"model.nll must return shape ({k * b},), got {tuple(nll.shape)}")
    return nll.reshape(k, b)


def log_weights_from_noise(model, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    r"""Log importance weights ``log p(x, z) - log q(z | x)`` for ``z = mu + sigma * eps``,
    and the reconstruction term ``-log p(x | z)``; each ``[k, B]``.

    With ``z = mu + sigma * eps``, ``log q(z|x) = sum_j(-eps_j^2/2 - logvar_j/2 - log(2 pi)/2)``
    exactly, so

    .. math::
        \log p(z) - \log q(z \mid x) = \tfrac12 \sum_j \big(\epsilon_j^2 - z_j^2 + \log\sigma_j^2\big)

    (the ``log 2 pi`` terms cancel): no density is evaluated twice. Differentiable; the
    IWAE objective and the chunked evaluation in :mod:`vaekit.evaluate` share it. The
    decoder gets ``z`` in the inputs' dtype; the sum is computed in at least float32.

    Shape: ``x`` ``[B, *event]``; ``mu``, ``logvar`` ``[B, d]``; ``eps`` ``[k, B, d]``.
    """
    for name, t in (("mu", mu), ("logvar", logvar), ("eps", eps)):
        check_tensor(name, t)
    if mu.dim() != 2:
        raise ValueError(f"mu must be [B, d], got shape {tuple(mu.shape)}")
    check_same_shape("mu", mu, "logvar", logvar)
    if eps.dim() != 3 or eps.shape[1:] != mu.shape:  # else it would broadcast against mu
        raise ValueError(f"eps must be [k, {', '.join(map(str, mu.shape))}] (k draws of mu's shape), "
                         f"got shape {tuple(eps.shape)}")
    z = mu + torch.exp(0.5 * logvar) * eps
    nll = decode_nll(model, x, z)
    # half precision in float32: z^2 overflows float16 from |z| = 256 on
    eps, z, logvar = upcast(eps, z, logvar)
    return -nll + 0.5 * (eps.square() - z.square() + logvar).sum(-1), nll


def _check_noise_callable(noise) -> None:
    if noise is not None and not callable(noise):
        raise TypeError(f"noise must be a callable noise(shape) -> Tensor, or None, got {type(noise).__name__}")


def _drawn(noise, shape: tuple) -> Tensor:
    """``noise(shape)``, refused unless a tensor of that shape: a wrong one would broadcast
    against ``mu`` or fail far inside. Metadata only: cheap at every step."""
    eps = noise(shape)
    if not isinstance(eps, Tensor):
        raise TypeError(f"noise(shape) must return a torch.Tensor, got {type(eps).__name__}")
    if eps.shape != shape:
        raise ValueError(f"noise(shape) must return a tensor of the shape asked for, {tuple(shape)}, "
                         f"got {tuple(eps.shape)}")
    return eps


def _importance_terms(model, x: Tensor, k: int, noise=None):
    """``(log_w [k, B], nll [k, B], (mu, logvar))`` from one encode and one decode of ``k * B`` latents."""
    _check_model(model)
    k = _check_samples("k", k)
    check_tensor("x", x)
    _check_noise_callable(noise)
    mu, logvar = model.encode_params(x)
    if mu.dim() != 2 or mu.shape[0] != x.shape[0]:
        raise ValueError(
            f"model.encode_params(x) must give [B, d] parameters with B = {x.shape[0]}, got {tuple(mu.shape)}"
        )
    eps = (_drawn(noise, (k, *mu.shape)) if noise is not None
           else torch.randn((k, *mu.shape), dtype=noise_dtype(mu), device=mu.device))
    log_w, nll = log_weights_from_noise(model, x, mu, logvar, eps)
    return log_w, nll, (mu, logvar)


def log_importance_weights(model, x: Tensor, k: int) -> Tensor:
    r"""``log w = log p(x|z) + log p(z) - log q(z|x)`` for ``k`` reparameterised ``z ~ q(z|x)``.

    Uses ``model.encode_params``, ``model.decode`` on all ``k * B`` latents at once
    (``[k*B, d]``, sample-major) and ``model.nll_samples`` on them and ``x`` when the model
    has it (a vaekit VAE), else ``model.nll`` on ``x`` repeated to match. Memory grows with
    ``k * B``: chunk over ``k`` for large ``k``. ``k`` is at most
    :data:`vaekit.checks.MAX_IW_SAMPLES`.

    Shape: ``x`` is ``[B, *event]``; returns ``[k, B]``, differentiable.
    """
    return _importance_terms(model, x, k)[0]


def iwae_bound(log_w: Tensor, *, validate_args: bool | None = None) -> Tensor:
    r"""``L_k = logsumexp_k(log w) - log k`` over the first dimension: ``[k, B] -> [B]``.

    ``L_1`` is the single-sample ELBO; ``E[L_k]`` rises with ``k`` towards ``log p(x)``.
    A log-weight of ``-inf`` (a zero weight) is allowed; NaN and ``+inf`` are refused when
    validating (:func:`vaekit.checks.validating`). Half precision is computed in float32.
    """
    check_tensor("log_w", log_w, min_dim=2)
    if log_w.shape[0] == 0:
        raise ValueError(f"log_w must hold k >= 1 samples along its first dimension [k, B], "
                         f"got shape {tuple(log_w.shape)}")
    if validating(validate_args) and read_value((torch.isnan(log_w) | (log_w == math.inf)).any(), "log_w"):
        raise ValueError("log_w must hold no NaN or +inf values (-inf, a zero weight, is allowed), but it does")
    (log_w,) = upcast(log_w)
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def iwae_loss(model, x: Tensor, k: int) -> Tensor:
    """``-iwae_bound(log_importance_weights(model, x, k))``, ``[B]``."""
    return -iwae_bound(log_importance_weights(model, x, k))


# Target size of one chunk's decoder output when chunk_size is not given. The peak is a
# small multiple of it (the expanded copy of x and the likelihood's temporaries).
MEMORY_BUDGET_BYTES = 256 * 2**20
CPU_BUDGET_BYTES = 8 * 2**20

# Noise for the k samples is drawn in blocks of this many samples, whatever the chunk
# size, so that the draws (and hence the estimate) do not depend on chunk_size.
NOISE_BLOCK = 64


def noise_dtype(mu: Tensor) -> torch.dtype:
    """The dtype of reparameterisation noise drawn for ``mu`` during training: at least
    float32. Under bfloat16 or float16 autocast ``mu`` comes out in half precision, and noise
    drawn in it would be rounded to 8 (or 11) bits, unlike the float32 noise the training
    loop passes in; ``z = mu + sigma * eps`` then promotes to float32."""
    return torch.promote_types(mu.dtype, torch.float32)


def randn_like_on(shape, generator, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device, returned on ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def normal_chunks(k: int, chunk_size: int, like: Tensor, generator):
    """Yield standard-normal tensors ``[c, *like.shape]`` covering ``k`` samples in order.

    The generator is called for blocks of ``min(NOISE_BLOCK, samples left)`` samples
    whatever ``chunk_size`` is, so the concatenated noise depends only on ``k`` and the
    generator's state. (Drawing per chunk would not do: a CPU ``randn`` of n values is
    not the first n values of a larger ``randn``.)
    """
    k, chunk_size = _check_samples("k", k), check_int("chunk_size", chunk_size, low=1)
    return _normal_chunks(k, chunk_size, like, generator)


def _normal_chunks(k: int, chunk_size: int, like: Tensor, generator):
    left = like.new_empty(0, *like.shape)
    drawn = 0
    for start in range(0, k, chunk_size):
        need = min(chunk_size, k - start)
        parts, have = [left], left.shape[0]
        while have < need:
            n = min(NOISE_BLOCK, k - drawn)
            parts.append(randn_like_on((n, *like.shape), generator, like))
            have += n
            drawn += n
        buffer = torch.cat(parts) if len(parts) > 1 else left
        yield buffer[:need]
        left = buffer[need:]


def auto_chunk_size(batch: int, num_dims: int, dtype: torch.dtype, k: int, device=None, *,
                    budget: int | None = None) -> int:
    """Samples per chunk so that the decoder output is about ``budget`` bytes: by default
    ``MEMORY_BUDGET_BYTES`` on an accelerator, ``CPU_BUDGET_BYTES`` on a CPU (where a
    chunk that stays in the caches runs about twice as fast: see docs/benchmarks.md)."""
    for name, value in (("batch", batch), ("num_dims", num_dims), ("k", k)):
        check_int(name, value, low=1)
    if budget is None:
        budget = CPU_BUDGET_BYTES if device is None or torch.device(device).type == "cpu" else MEMORY_BUDGET_BYTES
    return max(1, min(k, budget // max(1, batch * num_dims * dtype.itemsize)))


def iw_from_params(model, x, mu, logvar, k, chunk_size, generator, out_dtype=None) -> Tensor:
    """The k-sample estimate of ``log p(x)`` from posterior parameters; chunks of
    ``chunk_size`` samples (``None``: sized for the decoder output's memory, in
    ``out_dtype``, by default ``mu``'s: bfloat16 under bf16 autocast)."""
    k = _check_samples("k", k)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, low=1)
    given = chunk_size is not None
    if chunk_size is None:
        # decode_numel: what one decoded example holds (an autoregressive head holds feature maps).
        chunk_size = auto_chunk_size(x.shape[0], getattr(model, "decode_numel", x[0].numel()), out_dtype or mu.dtype,
                                     k, mu.device)
    total = None
    # A model may share work on x across the chunks (the late-fusion PixelCNN head's pixel features).
    sharing = getattr(model, "sharing_pixels", None)
    try:
        with sharing(x) if sharing is not None else contextlib.nullcontext():
            for eps in normal_chunks(k, chunk_size, mu, generator):
                chunk = torch.logsumexp(log_weights_from_noise(model, x, mu, logvar, eps)[0], dim=0)
                # log(a + b) from log a and log b: a running logsumexp that never overflows.
                total = chunk if total is None else torch.logaddexp(total, chunk)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise torch.OutOfMemoryError(_chunk_advice(e, chunk_size, given, x.shape[0], k)) from e
    return total - math.log(k)


def _chunk_advice(e: BaseException, chunk: int, given: bool, batch: int, k: int) -> str:
    """What an allocation that failed while a chunk was decoded says: the setting that
    sized the chunk, its value and what to make smaller."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    what = f"decoding {min(chunk, k)} importance samples of each of {batch} examples at once ({first})"
    if given:
        return f"out of memory {what}: chunk_size={chunk} is too large for this device; pass a smaller chunk_size"
    return (f"out of memory {what}: with chunk_size=None the chunk was sized from the batch of {batch} examples "
            f"(k={k}); pass a smaller batch_size, or a chunk_size below {min(chunk, k)}")
