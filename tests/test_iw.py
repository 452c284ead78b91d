"""The importance-weighted estimate's machinery (vaekit.iw); the estimator itself is tested
against closed forms in test_evaluate.py."""

import math
import re

import pytest
import torch

import vaekit.iw as iw
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


def _small():
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)))
    x = torch.rand(3, 1, 4, 4).bernoulli()
    return model, x, *model.encode_params(x)


@pytest.mark.parametrize("call, error, match", [
    # k beyond MAX_IW_SAMPLES ran for hours (or a 24 GB randn); none or a negative k gave raw errors
    (lambda m, x, mu, lv: iw.log_importance_weights(m, x, 10**12), ValueError, r"k must be an int in \[1, 1000000\]"),
    (lambda m, x, mu, lv: iw.iwae_loss(m, x, 10**7), ValueError, r"k must be an int in \[1, 1000000\]"),
    (lambda m, x, mu, lv: iw.repeat_for_samples(x, -1), ValueError, "k must be an int >= 1, got -1"),
    (lambda m, x, mu, lv: normal_chunks(4, 0, mu, None), ValueError, "chunk_size must be an int >= 1, got 0"),
    (lambda m, x, mu, lv: normal_chunks(10**9, 64, mu, None), ValueError, r"k must be an int in \[1, 1000000\]"),
    (lambda m, x, mu, lv: iw.iw_from_params(m, x, mu, lv, 0, None, None), ValueError, "k must be an int >= 1, got 0"),
    (lambda m, x, mu, lv: iw.iw_from_params(m, x, mu, lv, 4, 0, None), ValueError, "chunk_size must be an int >= 1"),
    (lambda m, x, mu, lv: auto_chunk_size(0, 16, torch.float32, 10), ValueError, "batch must be an int >= 1, got 0"),
    (lambda m, x, mu, lv: auto_chunk_size(4, 16, torch.float32, 2.5), TypeError, "k must be an int, got float"),
    (lambda m, x, mu, lv: iw.log_importance_weights(None, x, 2), TypeError, "model must be a vaekit VAE.*got NoneType"),
    (lambda m, x, mu, lv: iw.decode_nll(m, x, torch.randn(3, 2)), ValueError,
     re.escape("z must be [k, B, d] with k >= 1, got shape (3, 2)")),
    (lambda m, x, mu, lv: iw.decode_nll(m, x, torch.randn(2, 5, 2)), ValueError,
     re.escape("z must be [k, B, d] with B = 3, the examples of x, got shape (2, 5, 2)")),
    (lambda m, x, mu, lv: iw.log_weights_from_noise(m, x, mu, lv, torch.randn(2, 4, 2)), ValueError,
     re.escape("eps must be [k, 3, 2] (k draws of mu's shape), got shape (2, 4, 2)")),
    (lambda m, x, mu, lv: iw.log_weights_from_noise(m, x, mu, lv, torch.randn(1, 2)), ValueError,
     re.escape("eps must be [k, 3, 2]")),  # it broadcast to every example
    (lambda m, x, mu, lv: iw.log_weights_from_noise(m, x, mu.tolist(), lv, torch.randn(2, 3, 2)), TypeError,
     "mu must be a torch.Tensor, got list"),
    (lambda m, x, mu, lv: iw.log_weights_from_noise(m, x, mu, lv[:, :1], torch.randn(2, 3, 2)), ValueError,
     re.escape("mu has shape (3, 2) but logvar has shape (3, 1)")),
])
def test_the_helpers_name_a_bad_argument(call, error, match):
    model, x, mu, logvar = _small()
    with torch.no_grad(), pytest.raises(error, match=match):
        call(model, x, mu, logvar)


def test_iwae_bound_refuses_nan_and_plus_inf_when_validating():
    log_w = torch.zeros(2, 3)
    for bad in (math.nan, math.inf):
        log_w[1, 2] = bad
        with pytest.raises(ValueError, match=r"log_w must hold no NaN or \+inf values"):
            iw.iwae_bound(log_w)
        assert not torch.isfinite(iw.iwae_bound(log_w, validate_args=False)[2])  # the check is the switch's
    log_w[1, 2] = -math.inf  # a zero weight is a weight
    torch.testing.assert_close(iw.iwae_bound(log_w), torch.tensor([0.0, 0.0, -math.log(2.0)]))


def test_half_precision_log_weights_are_summed_in_float32():
    """bfloat16 log-weights in iwae_bound (a 15-nat error at -3000: logsumexp in bfloat16) and
    an all-float16 posterior in log_weights_from_noise (z^2 overflowed past |z| = 256) are
    computed in float32, as every likelihood computes half precision; the decoder still gets
    z in its own dtype."""
    lw = torch.full((5000, 1), -3000.0, dtype=torch.float64) + torch.linspace(-0.1, 0.1, 5000, dtype=torch.float64)[:, None]
    lw = lw.bfloat16()
    got = iw.iwae_bound(lw)
    want = torch.logsumexp(lw.double(), 0) - math.log(5000)  # float64 of the same bfloat16 values
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=0)

    class Stub(torch.nn.Module):
        def decode(self, z):
            seen.append(z.dtype)
            return torch.zeros(z.shape[0], 4)

        def nll(self, out, x):
            return torch.zeros(out.shape[0])

    seen, h = [], torch.float16
    mu = torch.full((2, 3), 300.0, dtype=h, requires_grad=True)
    log_w, _ = iw.log_weights_from_noise(Stub(), torch.zeros(2, 4), mu, torch.zeros(2, 3, dtype=h),
                                         torch.zeros(1, 2, 3, dtype=h))
    (g,) = torch.autograd.grad(log_w.sum(), mu)
    assert seen == [h] and log_w.dtype == torch.float32
    torch.testing.assert_close(log_w, torch.full((1, 2), -0.5 * 3 * 300.0**2))  # log p(z) - log q(z|x), by hand
    torch.testing.assert_close(g, torch.full((2, 3), -300.0, dtype=h))


def _needs_impossible_memory(model, per_latent: int):
    """``model`` whose decoder also allocates ``per_latent`` bytes for every latent it decodes:
    for more than a couple of latents, more than any machine's address space (2**47 bytes),
    so that PyTorch's allocator fails at once, as a chunk too large for memory makes it fail."""
    decode = model.decode

    def hungry(z, *rest):
        torch.empty(z.shape[0] * per_latent, dtype=torch.uint8)
        return decode(z, *rest)

    model.decode = hungry
    return model


def test_a_chunk_too_large_for_memory_is_named_with_advice():
    """An allocation that fails while a chunk is decoded (here a real one: PyTorch's CPU
    allocator refusing 2**49 bytes) says which argument sized the chunk, its value, and
    what to make smaller; it is still an OutOfMemoryError (a RuntimeError), with the
    allocator's own error as its cause."""
    from vaekit.evaluate import iw_log_likelihood

    model, x, _, _ = _small()
    _needs_impossible_memory(model, 2**46)
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory decoding 4 importance samples of each of 3 "
                       r"examples at once \(.*DefaultCPUAllocator.*\): chunk_size=4 is too large for this device; "
                       r"pass a smaller chunk_size") as info:
        iw_log_likelihood(model, x, 8, chunk_size=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(info.value.__cause__, RuntimeError) and "can't allocate memory" in str(info.value.__cause__)
    # chunk_size beyond k: the samples decoded are k, the value named is the one given
    with pytest.raises(torch.OutOfMemoryError, match=r"decoding 8 importance samples .* chunk_size=1000 is too large"):
        iw_log_likelihood(model, x, 8, chunk_size=1000)
    # sized from the batch (chunk_size=None: all 8 samples of the 3 examples fit the budget)
    with pytest.raises(torch.OutOfMemoryError, match=r"decoding 8 importance samples of each of 3 examples .*: "
                       r"with chunk_size=None the chunk was sized from the batch of 3 examples \(k=8\); pass a "
                       r"smaller batch_size, or a chunk_size below 8$"):
        iw_log_likelihood(model, x, 8)


def test_out_of_memory_errors_of_every_kind_get_the_advice_and_other_errors_pass_unchanged(monkeypatch):
    from vaekit.evaluate import iw_log_likelihood

    model, x, _, _ = _small()
    for error in (MemoryError("Unable to allocate 93.6 GiB"), torch.OutOfMemoryError("CUDA out of memory. Tried"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory")):
        def failing(*args, error=error):
            raise error

        monkeypatch.setattr(iw, "log_weights_from_noise", failing)
        first = str(error).split(".")[0]
        with pytest.raises(torch.OutOfMemoryError, match=rf"\({re.escape(first)}.*chunk_size=2 is too large"):
            iw_log_likelihood(model, x, 5, chunk_size=2)
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(iw, "log_weights_from_noise", lambda *a: (_ for _ in ()).throw(other))
    with pytest.raises(RuntimeError) as info:
        iw_log_likelihood(model, x, 5, chunk_size=2)
    assert info.value is other
