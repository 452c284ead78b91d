"""Tests for vaekit.latents: the encoder-only diagnostics, on the linear-Gaussian VAE of
test_evaluate.py, whose posterior means, variances and mutual information are known in
closed form."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vaekit.latents as lat
from test_evaluate import DTYPE, SIGMA2, D, d, gen, make_problem
from vaekit.losses import gaussian_kl


def test_active_units_count_ignored_dimensions_inactive():
    model, x, _ = make_problem(n=200, ignore=(1,))
    count, variances = lat.active_units(model, x, batch_size=64)
    mu = x @ model.A.T + model.c
    torch.testing.assert_close(variances, mu.var(0), rtol=1e-12, atol=1e-14)
    assert count == d - 1 and float(variances[1]) < 1e-20 and bool((variances[[0, 2]] > 0.01).all())
    assert lat.active_units(model, x, threshold=1e6)[0] == 0


def test_kl_per_dimension_sums_to_the_mean_kl():
    model, x, _ = make_problem(perturb=0.3, n=50)
    per_dim = lat.kl_per_dimension(model, x, batch_size=16)
    mu, logvar = model.encode_params(x)
    assert per_dim.shape == (d,)
    torch.testing.assert_close(per_dim.sum(), gaussian_kl(mu, logvar).mean())
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean(0)
    torch.testing.assert_close(per_dim, ref, rtol=1e-12, atol=1e-14)


def test_mutual_information():
    model, x, _ = make_problem(n=1500)
    mi = lat.mutual_information(model, x, generator=gen(7), batch_size=500)
    # Population value for Gaussians: z ~ N(A b + c, A C A^T + S).
    W = model.W.detach()
    cov_x = W @ W.T + SIGMA2 * torch.eye(D, dtype=DTYPE)
    cov_z = model.A @ cov_x @ model.A.T + torch.diag(model.enc_logvar.exp())
    exact = 0.5 * (torch.logdet(cov_z) - model.enc_logvar.sum())
    assert 0 < float(mi) < math.log(1500)
    assert abs(float(mi) - float(exact)) < 0.1, (float(mi), float(exact))
    # Against the direct pairwise computation, with posteriors that overlap partly.
    model2, xs, _ = make_problem(n=300, perturb=0.5)
    model2.enc_logvar.fill_(-2.0)
    got = lat.mutual_information(model2, xs, n_samples=2, generator=gen(8))
    mu, logvar = model2.encode_params(xs)
    z = mu + (0.5 * logvar).exp() * torch.randn(2, 300, d, generator=gen(8), dtype=DTYPE)
    log_q = Normal(mu, (0.5 * logvar).exp()).log_prob(z.unsqueeze(-2)).sum(-1)  # [2, 300, 300]
    own = torch.diagonal(log_q, dim1=-2, dim2=-1)
    expected = (own - log_q.logsumexp(-1) + math.log(300)).mean()
    assert 1.0 < float(expected) < math.log(300) - 1.0  # neither saturated nor trivial
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # A posterior that ignores x carries no information.
    model.A.zero_()
    assert abs(float(lat.mutual_information(model, x, generator=gen(7)))) < 1e-12
    # A nearly deterministic encoder saturates at log N and never exceeds it.
    small, xs, _ = make_problem(n=4)
    small.enc_logvar.fill_(-20.0)
    mi4 = float(lat.mutual_information(small, xs, n_samples=3, generator=gen(8)))
    assert math.log(4) - 1e-6 < mi4 <= math.log(4) + 1e-12


@pytest.mark.parametrize("n_samples, n", [(5, 30), (4, 30), (2, 30), (7, 17), (1, 17)])
def test_mutual_information_draws_its_samples_in_chunks_within_the_memory_budget(n_samples, n, monkeypatch):
    """Where z [S, N, d] would pass its half of the MEMORY_BUDGET_BYTES that the float64
    [N, d] terms leave, the samples are drawn in chunks of as many as fit, each its own
    randn(s, N, d): the mutual information of that noise, computed here directly, with no
    draw or block over the budget."""
    model, x, _ = make_problem(n=n, perturb=0.5)
    model.enc_logvar.fill_(-2.0)
    # the [N, d] terms, then z of 2 samples (d float64 values each) twice: half for z, half for the blocks
    budget = (5 * d + 2) * n * 8 + 2 * (2 * n * d * 8) + 5
    monkeypatch.setattr(lat, "MEMORY_BUDGET_BYTES", budget)
    draws, blocks = [], []
    randn_like_on, logsumexp = lat.randn_like_on, torch.logsumexp
    monkeypatch.setattr(lat, "randn_like_on", lambda shape, *a: draws.append(shape) or randn_like_on(shape, *a))
    monkeypatch.setattr(torch, "logsumexp", lambda t, **kw: blocks.append(t.numel()) or logsumexp(t, **kw))
    got = lat.mutual_information(model, x, n_samples=n_samples, generator=gen(11))
    assert [s for s, _, _ in draws] == [min(2, n_samples - i) for i in range(0, n_samples, 2)]
    assert max(math.prod(shape) * 8 for shape in draws) <= budget and max(blocks) * 2 * 8 <= budget
    g = gen(11)
    mu, logvar = model.encode_params(x)
    z = torch.cat([mu + (0.5 * logvar).exp() * torch.randn(shape, generator=g, dtype=DTYPE) for shape in draws])
    log_q = Normal(mu, (0.5 * logvar).exp()).log_prob(z.unsqueeze(-2)).sum(-1)  # [S, N, N]
    own = torch.diagonal(log_q, dim1=-2, dim2=-1)
    expected = (own - log_q.logsumexp(-1) + math.log(n)).mean()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_mutual_information_within_the_memory_budget_is_one_draw_as_before(monkeypatch):
    """Below the budget (the sizes users run) the noise is one randn(S, N, d) draw, as
    before the chunking, so the estimate is unchanged (test_mutual_information checks it
    against the direct computation with that draw)."""
    model, x, _ = make_problem(n=300)
    draws = []
    randn_like_on = lat.randn_like_on
    monkeypatch.setattr(lat, "randn_like_on", lambda shape, *a: draws.append(shape) or randn_like_on(shape, *a))
    for n_samples in (1, 50, 1000):
        lat.mutual_information(model, x, n_samples=n_samples, generator=gen(12))
    assert draws == [(1, 300, d), (50, 300, d), (1000, 300, d)]


def test_summaries_of_bf16_posteriors_are_not_rounded_to_bf16():
    """Under bf16 autocast the encoder's mu and logvar are bfloat16; the mutual information
    (its samples drawn and summed as for float32 inputs of the same values) and the active
    units' variances come back in float32, not rounded to bfloat16 (near 9 nats a
    bfloat16 value is a multiple of 1/16 nat)."""
    torch.manual_seed(0)
    mu, logvar = torch.randn(200, 4) * 3, torch.randn(200, 4) * 0.1 - 2
    half_mu, half_logvar = mu.bfloat16(), logvar.bfloat16()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    mi = lat._mutual_information_from_params(half_mu, half_logvar, 2, g())
    same_values = lat._mutual_information_from_params(half_mu.float(), half_logvar.float(), 2, g())
    assert mi.dtype == torch.float32 and torch.equal(mi, same_values)
    count, variances = lat._active_units_from_mu(half_mu, 0.01)
    assert variances.dtype == torch.float32
    torch.testing.assert_close(variances, half_mu.double().var(0).float())


def test_argument_errors_name_the_argument():
    model, x, _ = make_problem(n=4)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        lat.active_units(model, x.long())
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -0.5"):
        lat.active_units(model, x, threshold=-0.5)


def test_sample_counts_generators_models_and_flags_are_checked():
    model, x, _ = make_problem(n=4)
    with pytest.raises(ValueError, match=r"n_samples must be an int in \[1, 1000000\], got 1000000000"):
        lat.mutual_information(model, x, n_samples=10**9)  # a [n_samples, N, d] draw: killed for memory
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        lat.mutual_information(model, x, generator=5)
    with pytest.raises(TypeError, match="model must be a vaekit VAE"):
        lat.kl_per_dimension(None, x)
    with pytest.raises(TypeError, match="on must be a bool, got str"):
        with lat.tf32_flags("yes"):
            pass


def test_mutual_information_with_a_variance_per_example_against_a_brute_force():
    """Posterior variances that differ between examples (in the linear-Gaussian problem they
    are one for all, and a log-density term that is the same for every example cancels):
    the estimate against log q(z|x_m) from torch.distributions for every pair, on the
    same noise."""
    g = torch.Generator().manual_seed(3)
    n, dim, samples = 6, 2, 400
    mu = torch.randn(n, dim, generator=g, dtype=torch.float64)
    logvar = 1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    got = lat._mutual_information_from_params(mu, logvar, samples, torch.Generator().manual_seed(11))
    eps = torch.randn((samples, n, dim), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * eps  # [S, N, d]
    log_q = Normal(mu, (0.5 * logvar).exp()).log_prob(z.unsqueeze(2)).sum(-1)  # [S, N (sample of x_i), N (x_m)]
    own = log_q.diagonal(dim1=1, dim2=2)
    expected = (own - (torch.logsumexp(log_q, -1) - math.log(n))).mean()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _peak_allocated(fn) -> int:
    """The most bytes that what ``fn`` allocated held at once, summed from the profiler's
    record of each allocation and free by PyTorch's CPU allocator (sizes, not times)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_the_peak_allocation_counter_counts_what_is_held_at_once():
    def three():
        a, b = torch.empty(1000), torch.empty(2000)  # 12,000 bytes at once
        del a
        torch.empty(500)
        return b  # held to the end

    assert _peak_allocated(three) == 12000


@pytest.mark.parametrize("n, dim, n_samples", [(1000, 8, 1), (1000, 8, 3), (200, 40, 30)])  # the last in two draws
def test_mutual_information_allocates_within_the_memory_budget(n, dim, n_samples, monkeypatch):
    """What the estimate holds at once (the float64 [N, d] terms, the draw z, the blocks of
    log q with their temporaries), as the allocator records it, stays within
    MEMORY_BUDGET_BYTES (it took 2.2 times it: the blocks were sized as if z and their
    temporaries took nothing), and uses a fair part of it (blocks of a few rows would crawl)."""
    budget = 2**21
    monkeypatch.setattr(lat, "MEMORY_BUDGET_BYTES", budget)
    g = gen(3)
    mu, logvar = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g) * 0.1
    draws = []
    randn_like_on = lat.randn_like_on
    monkeypatch.setattr(lat, "randn_like_on", lambda shape, *a: draws.append(shape[0]) or randn_like_on(shape, *a))
    peak = _peak_allocated(lambda: lat._mutual_information_from_params(mu, logvar, n_samples, gen(4)))
    assert budget / 3 < peak <= budget, peak / budget
    assert sum(draws) == n_samples and len(draws) == (2 if n_samples == 30 else 1)


def test_the_checks_on_x_read_it_in_one_pass_and_say_what_is_wrong():
    """x is checked from its smallest and largest values (one pass, a few scalars
    allocated, not masks of x's size); a NaN or an infinity anywhere, or a value outside
    [0, 1] for a Bernoulli likelihood, is named as before; an empty event passes."""
    from vaekit.models import VAE, ModelConfig

    model = VAE(ModelConfig(input_shape=(1, 16, 16), latent_dim=2, hidden=(8,), likelihood="bernoulli"))
    x = torch.rand(500, 1, 16, 16)
    assert _peak_allocated(lambda: lat._check_x(model, x)) < 1024
    for pos, bad in ((0, math.nan), (-1, math.nan), (7, math.inf), (-1, -math.inf)):
        y = x.clone()
        y.view(-1)[pos] = bad
        with pytest.raises(ValueError, match=r"^x must be finite, but it holds NaN or infinite values$"):
            lat._check_x(model, y)
    y = x.clone()
    y[3, 0, 2, 2], y[9, 0, 0, 0] = -0.5, 1.25
    with pytest.raises(ValueError, match=r"^x must lie in \[0, 1\] for a bernoulli likelihood, got values in "
                                         r"\[-0\.5, 1\.25\]$"):
        lat._check_x(model, y)
    y[3, 0, 2, 2] = 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\.25\]$"):  # above 1 alone
        lat._check_x(model, y)
    gaussian = VAE(ModelConfig(input_shape=(1, 16, 16), latent_dim=2, hidden=(8,), likelihood="gaussian"))
    lat._check_x(gaussian, y)  # any finite values for a density on the reals
    lat._check_x(object.__new__(type("Encoder", (), {"encode_params": None})), torch.zeros(3, 0))
