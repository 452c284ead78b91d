"""Tests for vaekit.likelihoods: every formula against a second computation."""

import math

import pytest
import torch

from vaekit.likelihoods import bernoulli_nll_samples, discretized_logistic_nll, optimal_sigma_nll
from vaekit.losses import bernoulli_nll, gaussian_nll

D64 = torch.float64


# ---------------------------------------------------------------------------------------
# sigma-VAE


@pytest.mark.parametrize("per", ["example", "batch"])
def test_optimal_sigma_nll_against_gaussian_nll_and_is_minimal(per):
    torch.manual_seed(0)
    x, mean = torch.rand(4, 1, 3, 3, dtype=D64), torch.rand(4, 1, 3, 3, dtype=D64)
    sq = (x - mean).square().flatten(1)
    lv = sq.mean(1).log().view(4, 1, 1, 1) if per == "example" else sq.mean().log()
    out = optimal_sigma_nll(mean, x, per=per)
    torch.testing.assert_close(out, gaussian_nll(mean, x, lv))
    at_optimum = 0.5 * 9 * (math.log(2 * math.pi) + lv.flatten() + 1)  # per example, or the batch mean
    torch.testing.assert_close(out if per == "example" else out.mean(), at_optimum.squeeze())
    for eps in (-0.05, 0.05):
        worse = gaussian_nll(mean, x, lv + eps)
        assert bool((worse > out).all()) if per == "example" else float(worse.sum()) > float(out.sum())


@pytest.mark.parametrize("per", ["example", "batch"])
def test_optimal_sigma_gradient_is_the_detached_one(per):
    torch.manual_seed(1)
    x, mean = torch.rand(3, 5, dtype=D64), torch.rand(3, 5, dtype=D64).requires_grad_()
    (g,) = torch.autograd.grad(optimal_sigma_nll(mean, x, per=per).sum(), mean)
    sq = (x - mean.detach()).square()
    lv = sq.mean(1, keepdim=True).log() if per == "example" else sq.mean().log()
    (g_detached,) = torch.autograd.grad(gaussian_nll(mean, x, lv).sum(), mean)
    torch.testing.assert_close(g, g_detached)
    assert torch.autograd.gradcheck(lambda m: optimal_sigma_nll(m, x, per=per), (mean,))


@pytest.mark.parametrize("per", ["example", "batch"])
def test_optimal_sigma_nll_is_the_brute_force_minimum_over_sigma(per):
    """The NLL minimised over log sigma^2 by a grid on [-12, 4] and a finer one around its
    best point: per example, or of the batch's sum over one shared sigma."""
    torch.manual_seed(2)
    x = torch.rand(5, 2, 3, 4, dtype=D64)
    mean = x + 0.1 * torch.randn_like(x) * torch.arange(1, 6, dtype=D64).view(5, 1, 1, 1)

    def nll(logvar):  # [G, 1 or B] -> [G, B], or [G, 1] summed over the batch
        log_p = torch.distributions.Normal(mean.flatten(1), (0.5 * logvar).exp().unsqueeze(-1))
        out = -log_p.log_prob(x.flatten(1)).sum(-1)
        return out if per == "example" else out.sum(-1, keepdim=True)

    grid = torch.linspace(-12.0, 4.0, 16001, dtype=D64)
    best = grid[nll(grid.unsqueeze(1)).argmin(0)]
    brute = nll(best + torch.linspace(-2e-3, 2e-3, 2001, dtype=D64).unsqueeze(1)).min(0).values
    out = optimal_sigma_nll(mean, x, per=per)
    torch.testing.assert_close(out if per == "example" else out.sum(0, keepdim=True), brute, rtol=1e-10, atol=0)


def test_optimal_sigma_clamps_a_perfect_reconstruction():
    x = torch.rand(2, 4, dtype=D64)
    mean = x.clone().requires_grad_()
    out = optimal_sigma_nll(mean, x, min_logvar=-9.0)
    torch.testing.assert_close(out, gaussian_nll(mean, x, -9.0))
    (g,) = torch.autograd.grad(out.sum(), mean)
    assert bool(torch.isfinite(g).all())
    with pytest.raises(ValueError, match="per"):
        optimal_sigma_nll(mean, x, per="pixel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, D64])
@pytest.mark.parametrize("per", ["example", "batch"])
def test_optimal_sigma_of_a_perfect_fit_at_the_lowest_min_logvar_is_finite(dtype, per):
    """min_logvar stops at -80 (below about -87 a perfect fit gave NaN in float32: 0 * e^89 =
    0 * inf); there the value is the clamped variance's closed form and the gradient 0."""
    x = torch.rand(2, 4).to(dtype)
    mean = x.clone().requires_grad_()
    out = optimal_sigma_nll(mean, x, per=per, min_logvar=-80.0)
    (g,) = torch.autograd.grad(out.sum(), mean)
    floor = torch.tensor(math.exp(-80.0), dtype=torch.promote_types(dtype, torch.float32))  # e^-80 as stored
    want = 0.5 * 4 * (math.log(2 * math.pi) + math.log(float(floor)))
    torch.testing.assert_close(out.double(), torch.full((2,), want, dtype=D64), rtol=1e-7, atol=0)
    assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------------------
# Discretized logistic


def all_levels(mean, log_scale, n_bits=8):
    k = 2 ** n_bits
    x = torch.arange(k, dtype=D64).div(k - 1).view(k, 1)
    return discretized_logistic_nll(torch.full_like(x, mean), torch.full_like(x, log_scale), x, n_bits=n_bits)


@pytest.mark.parametrize("mean, log_scale", [(0.5, -3.0), (0.1, 0.0), (-0.4, -1.0), (1.3, -20.0),
                                             (0.7, 20.0), (0.5001, -20.0), (0.3, -6.0), (0.5, 2.0)])
def test_masses_sum_to_one(mean, log_scale):
    assert abs(float(torch.exp(-all_levels(mean, log_scale)).sum()) - 1.0) < 1e-9
    assert abs(float(torch.exp(-all_levels(mean, log_scale, n_bits=3)).sum()) - 1.0) < 1e-9


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (D64, 1e-12)])
@pytest.mark.parametrize("log_scale", [-7.0, -9.0, -12.0, -16.0, -40.0, -80.0])
def test_masses_sum_to_one_under_a_sharp_logistic_with_its_mean_on_a_bin_edge(dtype, log_scale, tol):
    """Neighbouring bins share an edge: computed twice (x + h and x' - h) it rounded two
    ways, and a sharp logistic turned the difference into lost or doubled mass (0.9988 at
    log_scale -12 in float32; 1.5 at -80 in float64, with the mean on the edge)."""
    k = 255
    x = torch.arange(k + 1, dtype=dtype).div(k).view(-1, 1)
    for mean in [0.5, 127.5 / k, 3.5 / k, 0.123456, 0.9]:
        nll = discretized_logistic_nll(torch.full_like(x, mean), torch.full_like(x, log_scale), x)
        assert abs(float(torch.exp(-nll.double()).sum()) - 1.0) < tol, (mean, float(torch.exp(-nll.double()).sum()))


def test_masses_against_cdf_differences():
    k = 255
    x = torch.arange(256, dtype=D64).div(k)
    # log_scale 1.4 and 1.5 sit either side of the switch to the series for log(1 - e^-delta)
    for mean, log_scale in [(0.4, -2.5), (0.9, -4.0), (0.0, 0.5), (0.3, 1.4), (0.3, 1.5), (0.6, 3.0)]:
        cdf = lambda v: torch.sigmoid((v - mean) / math.exp(log_scale))
        upper = torch.where(x > 1 - 1e-9, torch.ones_like(x), cdf(x + 0.5 / k))
        lower = torch.where(x < 1e-9, torch.zeros_like(x), cdf(x - 0.5 / k))
        want = -torch.log(upper - lower)
        got = all_levels(mean, log_scale).view(-1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_discretized_logistic_gradcheck_and_extremes():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 1, 2, 2)).double().div(255)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
    mean = (torch.rand(2, 1, 2, 2, dtype=D64) * 1.2 - 0.1).requires_grad_()
    log_scale = (torch.rand(2, 1, 2, 2, dtype=D64) * 3 - 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, s: discretized_logistic_nll(m, s, x), (mean, log_scale))
    for dtype in (torch.float32, D64):
        for ls in (-20.0, 20.0):
            m = torch.tensor([-3.0, 0.5, 4.0, 1.0], dtype=dtype).view(1, 4).expand(2, 4).clone().requires_grad_()
            s = torch.full((2, 4), ls, dtype=dtype, requires_grad=True)
            xx = torch.tensor([[0.0, 0.5, 1.0, 0.2], [1.0, 0.0, 3 / 255, 1.0]], dtype=dtype).mul(255).round().div(255)
            out = discretized_logistic_nll(m, s, xx)
            out.sum().backward()
            assert bool(torch.isfinite(out).all() and torch.isfinite(m.grad).all() and torch.isfinite(s.grad).all())
    with pytest.raises(ValueError, match="multiples"):
        discretized_logistic_nll(mean, log_scale, torch.full_like(mean, 0.5001))


def test_optimal_sigma_nll_of_an_empty_batch_is_empty():
    for per in ("example", "batch"):
        assert optimal_sigma_nll(torch.zeros(0, 3, 4), torch.zeros(0, 3, 4), per=per).shape == (0,)


# -- the Bernoulli term of k samples per example ------------------------------------------


def _samples_case(k=6, b=4, event=(3, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k * b, *event, generator=g, dtype=dtype) * 8
    flat = logits.view(-1)
    flat[0], flat[7], flat[9] = 60.0, -60.0, 0.0  # softplus's extremes (and its threshold)
    x = torch.rand(b, *event, generator=g, dtype=dtype)
    x.view(-1)[0], x.view(-1)[7] = 1.0, 0.0
    return logits, x


@pytest.mark.parametrize("grad", [False, True])
def test_bernoulli_nll_samples_is_bernoulli_nll_of_repeated_x(grad):
    logits, x = _samples_case()
    k, b = logits.shape[0] // x.shape[0], x.shape[0]
    reference = bernoulli_nll(logits, x.repeat(k, 1, 1)).reshape(k, b)
    with torch.set_grad_enabled(grad):
        for given in (logits, logits.reshape(k, b, 3, 5)):  # both layouts
            got = bernoulli_nll_samples(given.requires_grad_(grad) if grad else given, x)
            assert got.shape == (k, b)
            torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)


def test_bernoulli_nll_samples_gradients():
    logits, x = _samples_case(k=3, b=2, event=(4,))
    logits.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l, t: bernoulli_nll_samples(l, t, validate_args=False), (logits, x))
    weights = torch.randn(3, 2, dtype=torch.float64)
    mine = torch.autograd.grad((bernoulli_nll_samples(logits, x) * weights).sum(), logits)[0]
    ref = torch.autograd.grad((bernoulli_nll(logits, x.repeat(3, 1)).reshape(3, 2) * weights).sum(), logits)[0]
    torch.testing.assert_close(mine, ref)


def test_bernoulli_nll_samples_computes_half_precision_in_float32():
    logits, x = _samples_case(dtype=torch.float32)
    half = logits.to(torch.bfloat16)
    got = bernoulli_nll_samples(half, x)
    assert got.dtype == torch.float32
    reference = bernoulli_nll(half.double(), x.double().repeat(6, 1, 1)).reshape(6, 4)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-4)


def test_bernoulli_nll_samples_leaves_its_inputs_alone():
    logits, x = _samples_case(dtype=torch.float32)
    before, x_before = logits.clone(), x.clone()
    with torch.no_grad():
        bernoulli_nll_samples(logits, x)
    assert torch.equal(logits, before) and torch.equal(x, x_before)


def test_bernoulli_nll_samples_refuses_bad_shapes_and_values():
    logits, x = _samples_case()
    with pytest.raises(ValueError, match=r"logits must be \[k, B, \*event\].*got \(22, 3, 5\)"):
        bernoulli_nll_samples(logits[:22], x)
    with pytest.raises(ValueError, match="logits must be"):
        bernoulli_nll_samples(logits.reshape(6, 4, 15), x)
    with pytest.raises(ValueError, match="x"):
        bernoulli_nll_samples(logits, x + 1.0)
    with pytest.raises(TypeError, match="logits"):
        bernoulli_nll_samples(logits.long(), x)
    bernoulli_nll_samples(logits, x + 1.0, validate_args=False)  # the evaluation's own setting


def test_an_empty_batch_of_grey_levels_gives_no_values_not_an_error():
    """The value checks have nothing to read in an empty batch (max() of nothing failed)."""
    empty = torch.zeros(0, 3)
    assert discretized_logistic_nll(empty, empty, empty, validate_args=True).shape == (0,)
    assert optimal_sigma_nll(empty, empty).shape == (0,)


@pytest.mark.parametrize("call, pattern", [
    (lambda: discretized_logistic_nll(*[torch.zeros(2, 3)] * 3, n_bits=100), r"n_bits must be an int in \[1, 16\], got 100"),
    (lambda: discretized_logistic_nll(*[torch.zeros(2, 3)] * 3, n_bits=0), r"n_bits must be an int in \[1, 16\], got 0"),
    (lambda: optimal_sigma_nll(torch.rand(4, 10), torch.rand(4, 10), min_logvar=1000.0),
     r"min_logvar must be a finite number >= -80 and <= 80, got 1000\.0"),
    (lambda: optimal_sigma_nll(torch.rand(4, 10), torch.rand(4, 10), min_logvar=-89.0),
     r"min_logvar must be a finite number >= -80 and <= 80, got -89\.0"),  # a perfect fit gave NaN
    (lambda: optimal_sigma_nll(torch.zeros(4, 0), torch.zeros(4, 0)),
     r"x must hold at least one value per example, got shape \(4, 0\)"),  # was NaN
])
def test_settings_that_overflowed_or_gave_nan_are_refused_by_name(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("log_scale", [-85.0, -100.0, -1e4])
def test_discretized_logistic_below_the_log_scale_floor_is_the_floor_s_value(log_scale):
    """log_scale is clamped at -80: below it 1/s overflowed float32 and a mean on a bin's
    edge gave NaN (loss and gradients). A mean exactly on the edge between levels 3 and 4
    of 255 under a point-like logistic: half the mass on each side, log 2 each."""
    levels = 255
    x = torch.tensor([[3.0, 4.0]]) / levels
    mean = torch.full((1, 2), 3.5 / levels, requires_grad=True)
    scale = torch.full((1, 2), log_scale, requires_grad=True)
    nll = discretized_logistic_nll(mean, scale, x)
    at_floor = discretized_logistic_nll(mean.detach(), torch.full((1, 2), -80.0), x)
    assert torch.equal(nll.detach(), at_floor)
    assert float(nll.detach()) == pytest.approx(2 * math.log(2.0), rel=1e-6)
    nll.sum().backward()
    assert bool(torch.isfinite(mean.grad).all()) and bool(torch.isfinite(scale.grad).all())
