"""The importance-weighted estimate's machinery (vaekit.iw); the estimator itself is tested
against closed forms in test_evaluate.py."""

import pytest
import torch

from vaekit.iw import CPU_BUDGET_BYTES, MEMORY_BUDGET_BYTES, NOISE_BLOCK, auto_chunk_size, normal_chunks


@pytest.mark.parametrize("chunk", [1, 7, NOISE_BLOCK, NOISE_BLOCK + 3, 500])
def test_the_noise_does_not_depend_on_the_chunk_size(chunk):
    like = torch.zeros(3, 2, dtype=torch.float64)
    k = 2 * NOISE_BLOCK + 5
    one = torch.cat(list(normal_chunks(k, k, like, torch.Generator().manual_seed(0))))
    chunks = list(normal_chunks(k, chunk, like, torch.Generator().manual_seed(0)))
    assert [c.shape[0] for c in chunks] == [min(chunk, k - s) for s in range(0, k, chunk)]
    assert torch.equal(torch.cat(chunks), one) and one.shape == (k, 3, 2)
    assert float(one.std()) == pytest.approx(1.0, abs=0.15)


def test_chunks_fit_the_budget_of_their_device():
    # [chunk, batch, D] float32 values: 8 MB on a CPU, 256 MB elsewhere; at least 1, at most k
    assert auto_chunk_size(100, 784, torch.float32, 5000) == CPU_BUDGET_BYTES // (100 * 784 * 4)
    assert auto_chunk_size(100, 784, torch.float32, 5000, "cuda") == MEMORY_BUDGET_BYTES // (100 * 784 * 4)
    assert auto_chunk_size(100, 784, torch.float64, 3, "cuda") == 3
    assert auto_chunk_size(10**6, 10**4, torch.float32, 5000) == 1
