"""The machinery of the importance-weighted estimate: noise drawn in fixed blocks, chunks
sized to a memory budget, and a running logsumexp over the chunks.

:func:`vaekit.evaluate.iw_log_likelihood` is the public entry point (it checks its
arguments and puts the model in evaluation mode); :func:`iw_from_params` is what it and
:func:`vaekit.evaluate.evaluate_model` run for each batch, given the posterior parameters.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .objectives import log_weights_from_noise

__all__ = ["iw_from_params", "normal_chunks", "auto_chunk_size", "randn_like_on", "MEMORY_BUDGET_BYTES",
           "CPU_BUDGET_BYTES", "NOISE_BLOCK"]

# Target size of one chunk's decoder output when chunk_size is not given. The peak is a
# small multiple of it (the expanded copy of x and the likelihood's temporaries).
MEMORY_BUDGET_BYTES = 256 * 2**20
CPU_BUDGET_BYTES = 8 * 2**20

# Noise for the k samples is drawn in blocks of this many samples, whatever the chunk
# size, so that the draws (and hence the estimate) do not depend on chunk_size.
NOISE_BLOCK = 64


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


def auto_chunk_size(batch: int, num_dims: int, dtype: torch.dtype, k: int, device=None) -> int:
    """Samples per chunk so that the decoder output is about ``MEMORY_BUDGET_BYTES`` on
    an accelerator, ``CPU_BUDGET_BYTES`` on a CPU (where a chunk that stays in the caches
    runs about twice as fast: see docs/benchmarks.md)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    budget = CPU_BUDGET_BYTES if device is None or torch.device(device).type == "cpu" else MEMORY_BUDGET_BYTES
    return max(1, min(k, budget // max(1, batch * num_dims * itemsize)))


def iw_from_params(model, x, mu, logvar, k, chunk_size, generator) -> Tensor:
    if chunk_size is None:
        # decode_numel: what one decoded example holds (an autoregressive head holds feature maps).
        chunk_size = auto_chunk_size(x.shape[0], getattr(model, "decode_numel", x[0].numel()), mu.dtype, k, mu.device)
    total = None
    # A model may share work on x across the chunks (the late-fusion PixelCNN head's pixel features).
    sharing = getattr(model, "sharing_pixels", None)
    with sharing(x) if sharing is not None else contextlib.nullcontext():
        for eps in normal_chunks(k, chunk_size, mu, generator):
            chunk = torch.logsumexp(log_weights_from_noise(model, x, mu, logvar, eps)[0], dim=0)
            # log(a + b) from log a and log b: a running logsumexp that never overflows.
            total = chunk if total is None else torch.logaddexp(total, chunk)
    return total - math.log(k)
