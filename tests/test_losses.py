"""vaekit.losses: every formula checked against a second computation.

Second computations used here: torch.distributions in float64, a 40-digit ``decimal``
evaluation of the continuous Bernoulli, gradcheck, Monte Carlo, numerical quadrature and
the classic tutorial formulas. The last block has one test per tutorial mistake
(docs/objective.md lists them).
"""

import doctest
import math
import re
import subprocess
import sys
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.autograd import gradcheck
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Normal, kl_divergence
from torch.testing import assert_close

from vaekit import losses
from vaekit.losses import (
    VAELoss,
    bernoulli_nll,
    continuous_bernoulli_log_norm,
    continuous_bernoulli_nll,
    gaussian_kl,
    gaussian_nll,
    mse,
    reconstruction_nll,
    set_validate_args,
    validate_args_enabled,
)

F64 = torch.float64
HYPOTHESIS = settings(max_examples=200, deadline=None)


@pytest.fixture(autouse=True)
def _seed_and_restore_validation():
    torch.manual_seed(0)
    before = validate_args_enabled()
    yield
    set_validate_args(before)


def _latent(b=4, d=3, dtype=F64):
    return torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=dtype)


def _posterior(mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def _classic_kl(mu, logvar):
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)


def _cb_reference(eta: float, x: float) -> tuple[float, float]:
    """-log ContinuousBernoulli(x | sigmoid(eta)) and its eta-derivative, to 40 digits.

    log C(eta) = log(a / tanh(a/2)) with a = |eta|; d/d eta log C = sign(eta) (1/a - 1/sinh a).
    """
    with localcontext() as ctx:
        ctx.prec = 40
        e, xd = Decimal(eta), Decimal(x)
        bce = (1 + e.exp()).ln() - e * xd
        sigmoid = 1 / (1 + (-e).exp())
        if eta == 0:
            log_norm, dlog_norm = Decimal(2).ln(), Decimal(0)
        else:
            a = abs(e)
            q = (-a).exp()
            log_norm = a.ln() + (1 + q).ln() - (1 - q).ln()
            dlog_norm = (1 / a - 2 / (a.exp() - q)) * (1 if eta > 0 else -1)
        return float(bce - log_norm), float(sigmoid - xd - dlog_norm)


def _cb_eval(etas, x, dtype):
    """Value and gradient of continuous_bernoulli_nll, one element per example."""
    eta = torch.tensor(etas, dtype=dtype).reshape(-1, 1).requires_grad_()
    xs = torch.full_like(eta, x).detach()
    value = continuous_bernoulli_nll(eta, xs)
    value.sum().backward()
    return eta.detach().double().flatten(), value.detach().double(), eta.grad.double().flatten()


# ---------------------------------------------------------------------------------------
# KL divergence


@pytest.mark.parametrize("prior", ["standard", "scalar", "per_dim", "per_element"])
def test_gaussian_kl_matches_kl_divergence(prior):
    mu, logvar = _latent(5, 4)
    pm, plv = {
        "standard": (0.0, 0.0),
        "scalar": (0.7, -1.3),
        "per_dim": (torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)),
        "per_element": _latent(5, 4),
    }[prior]
    pm_t, plv_t = (torch.as_tensor(v, dtype=F64).expand(5, 4) for v in (pm, plv))
    expected = kl_divergence(_posterior(mu, logvar), _posterior(pm_t, plv_t))
    assert_close(gaussian_kl(mu, logvar, pm, plv), expected, rtol=1e-10, atol=1e-10)


def test_gaussian_kl_keeps_leading_dims():
    mu, logvar = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64)
    out = gaussian_kl(mu, logvar)
    assert out.shape == (2, 3)
    assert_close(out[1], gaussian_kl(mu[1], logvar[1]), rtol=0, atol=0)


def test_gaussian_kl_refuses_a_1d_mu():
    # A 1-D mu is one example to a KL that sums the last dim, but B examples to every
    # likelihood: VAELoss added one KL to each of B reconstruction terms.
    with pytest.raises(ValueError, match=re.escape("mu must have shape [B, d] (at least 2 dims), got shape (4,)")):
        gaussian_kl(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=re.escape("mu must have shape [B, d]")):
        VAELoss(reduction="none")(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.ones(4))
    # d latents of one example beside a batch of 4: the KL's message, not "x has batch size 4
    # but mu has batch size 3" (d read as a batch size)
    with pytest.raises(ValueError, match=re.escape("mu must have shape [B, d] (at least 2 dims), got shape (3,)")):
        VAELoss()(torch.rand(4, 6), torch.zeros(4, 6), torch.zeros(3), torch.ones(3))
    assert gaussian_kl(torch.zeros(1, 4), torch.ones(1, 4)).shape == (1,)


@pytest.mark.parametrize("prior_shape", [(), (1,), (4,), (1, 4), (3, 4)])
def test_gaussian_kl_prior_shapes_that_keep_the_result_per_example(prior_shape):
    mu, logvar = _latent(3, 4)
    pm, plv = torch.randn(prior_shape, dtype=F64), torch.randn(prior_shape, dtype=F64)
    pm_t, plv_t = pm.expand(3, 4), plv.expand(3, 4)
    got = gaussian_kl(mu, logvar, pm, plv)
    assert got.shape == (3,)
    assert_close(got, kl_divergence(_posterior(mu, logvar), _posterior(pm_t, plv_t)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["prior_mu", "prior_logvar"])
@pytest.mark.parametrize("prior_shape", [(4, 1, 5), (3, 4, 5), (3,), (4, 4)])
def test_gaussian_kl_refuses_a_prior_that_changes_the_shape(name, prior_shape):
    # [B, 1, d] broadcast the [B] result to [B, B]; (3,) gave torch's bare "size of tensor a" error.
    mu, logvar = torch.zeros(4, 5), torch.zeros(4, 5)
    want = f"{name} has shape {prior_shape}, which does not broadcast to mu's shape (4, 5) without changing it"
    with pytest.raises(ValueError, match=re.escape(want)):
        gaussian_kl(mu, logvar, **{name: torch.zeros(prior_shape)})


@pytest.mark.parametrize("name", ["prior_mu", "prior_logvar"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_gaussian_kl_prior_values_are_checked_when_validating(name, bad):
    mu, logvar = torch.zeros(4, 5), torch.zeros(4, 5)
    with pytest.raises(ValueError, match=f"{name} must be finite, got {bad}"):
        gaussian_kl(mu, logvar, validate_args=True, **{name: bad})
    with pytest.raises(ValueError, match=f"{name} must be finite, but it holds NaN or infinite values"):
        gaussian_kl(mu, logvar, validate_args=True, **{name: torch.full((5,), bad)})
    assert gaussian_kl(mu, logvar, validate_args=False, **{name: bad}).shape == (4,)  # the fast path reads no value


@pytest.mark.parametrize("name", ["prior_mu", "prior_logvar"])
def test_gaussian_kl_prior_types(name):
    mu, logvar = _latent(2, 3)
    want = gaussian_kl(mu, logvar, **{name: 0.5})
    assert_close(gaussian_kl(mu, logvar, **{name: np.float64(0.5)}), want, rtol=0, atol=0)
    for bad, error in [([0.5], "got list"), (True, "got bool"), (torch.zeros(3, dtype=torch.long), "dtype torch.int64")]:
        with pytest.raises(TypeError, match=f"{name} must be a .*{error}"):
            gaussian_kl(mu, logvar, **{name: bad})


def test_gaussian_kl_against_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64), torch.tensor([[-0.5, 0.3, -2.0]], dtype=F64)
    pm, plv = torch.tensor([0.2, 0.0, 1.0], dtype=F64), torch.tensor([0.4, -0.2, 0.1], dtype=F64)
    q, p = _posterior(mu, logvar), _posterior(pm, plv)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 3, dtype=F64, generator=gen)
    log_ratio = q.log_prob(z) - p.log_prob(z)
    stderr = log_ratio.std() / math.sqrt(len(log_ratio))
    assert abs(log_ratio.mean() - gaussian_kl(mu, logvar, pm, plv)[0]) < 4 * stderr


@st.composite
def _latent_params(draw, lo=-1e3, hi=1e3):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)))

    def arr(a, b):
        return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=st.floats(a, b, width=32))))

    return arr(lo, hi), arr(-80, 80)


@HYPOTHESIS
@given(_latent_params(), st.floats(-100, 100), st.floats(-80, 80))
def test_kl_is_nonnegative(params, prior_mu, prior_logvar):
    mu, logvar = params
    for kl in (gaussian_kl(mu, logvar), gaussian_kl(mu, logvar, prior_mu, prior_logvar)):
        assert not kl.isnan().any() and (kl >= 0).all()


@HYPOTHESIS
@given(_latent_params(), st.floats(-100, 100), st.floats(-80, 80))
def test_kl_is_exactly_zero_at_the_prior(params, m, s):
    mu, logvar = params
    zeros = torch.zeros_like(mu)
    assert (gaussian_kl(zeros, zeros) == 0).all()
    assert (gaussian_kl(torch.full_like(mu, m), torch.full_like(mu, s), m, s) == 0).all()
    assert (gaussian_kl(mu, logvar, mu.clone(), logvar.clone()) == 0).all()


# ---------------------------------------------------------------------------------------
# Reconstruction likelihoods against torch.distributions


@pytest.mark.parametrize("grey", [False, True])
def test_bernoulli_nll_matches_distribution(grey):
    logits = 4 * torch.randn(3, 2, 5, dtype=F64)
    x = torch.rand(3, 2, 5, dtype=F64)
    x = x if grey else x.round()
    dist = Independent(Bernoulli(logits=logits, validate_args=False), 2)
    assert_close(bernoulli_nll(logits, x), -dist.log_prob(x), rtol=1e-10, atol=1e-10)
    direct = (F.softplus(logits) - logits * x).sum((1, 2))
    assert_close(bernoulli_nll(logits, x), direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["float", "0-dim", "per_dim", "per_element", "per_example"])
def test_gaussian_nll_matches_independent_normal(form):
    mean, x = torch.randn(3, 2, 4, dtype=F64), torch.randn(3, 2, 4, dtype=F64)
    logvar = {
        "float": -0.7,
        "0-dim": torch.tensor(0.4, dtype=F64),
        "per_dim": torch.randn(2, 4, dtype=F64),
        "per_element": torch.randn(3, 2, 4, dtype=F64),
        "per_example": torch.randn(3, 1, 1, dtype=F64),
    }[form]
    std = torch.exp(torch.as_tensor(logvar, dtype=F64) / 2).expand_as(x)
    expected = -Independent(Normal(mean, std), 2).log_prob(x)
    assert_close(gaussian_nll(mean, x, logvar), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "x_shape, logvar_shape",
    [((4, 6), (5,)), ((4, 6), (3, 6)), ((4, 6), (4, 1, 6)), ((4, 1), (4, 6)), ((4, 1, 6), (3, 6))],
)
def test_gaussian_nll_bad_logvar_shape_raises_value_error(x_shape, logvar_shape):
    # The last two broadcast, but to a shape larger than x: still a wrong logvar.
    x = torch.zeros(x_shape)
    with pytest.raises(ValueError, match="logvar"):
        gaussian_nll(x, x, torch.zeros(logvar_shape))


def test_continuous_bernoulli_matches_torch_on_moderate_logits():
    logits = torch.empty(4, 3, 5, dtype=F64).uniform_(-8, 8)
    x = torch.rand(4, 3, 5, dtype=F64)
    expected = -Independent(ContinuousBernoulli(logits=logits), 2).log_prob(x)
    assert_close(continuous_bernoulli_nll(logits, x), expected, rtol=1e-10, atol=1e-10)


# Both sides of the float64 Taylor threshold (0.05), zero, and logits far beyond torch's clamp.
_CB_ETAS = [0.0, 1e-5, -1e-5, 5e-4, 1e-3, -1.001e-3, 0.049, -0.04999, 0.05 - 1e-9, 0.05, 0.05 + 1e-9, -0.0501,
            2e-3, 0.3, -3.0, 40.0, -300.0, 1e4]


@pytest.mark.parametrize("x", [0.0, 0.3, 1.0])
def test_continuous_bernoulli_float64_against_40_digit_reference(x):
    eta, value, grad = _cb_eval(_CB_ETAS, x, F64)
    ref = torch.tensor([_cb_reference(float(e), x) for e in eta], dtype=F64)
    assert_close(value, ref[:, 0], rtol=1e-14, atol=1e-15)
    assert_close(grad, ref[:, 1], rtol=1e-12, atol=5e-13)


def test_continuous_bernoulli_continuous_across_taylor_threshold():
    # The jump between the two sides must be the true change of the function, no more.
    for sign in (1.0, -1.0):
        eta, value, grad = _cb_eval([sign * 0.05 * (1 - 1e-9), sign * 0.05 * (1 + 1e-9)], 0.25, F64)
        ref = [_cb_reference(float(e), 0.25) for e in eta]
        assert abs((value[1] - value[0]) - (ref[1][0] - ref[0][0])) < 2e-15
        assert abs((grad[1] - grad[0]) - (ref[1][1] - ref[0][1])) < 5e-13


def test_continuous_bernoulli_log_norm_float64_gradient_is_relatively_exact():
    """log C's own gradient, sign(eta) (1/a - 1/sinh a), which the nll's gradient adds to
    sigmoid(eta) - x and so hides where small: within 1e-12 of the 40-digit value relatively,
    on both sides of the series' switch (at a switch of 1e-3 the exact form's cancellation
    left 8e-10 just above it)."""
    etas = np.concatenate([np.geomspace(1e-6, 3.0, 200), -np.geomspace(1e-4, 1.0, 20)])
    eta = torch.tensor(etas, dtype=F64, requires_grad=True)
    grad, = torch.autograd.grad(continuous_bernoulli_log_norm(eta).sum(), eta)

    def dlog_norm(eta: float) -> float:  # 40 digits
        with localcontext() as ctx:
            ctx.prec = 40
            a = abs(Decimal(eta))
            return float((1 / a - 2 / (a.exp() - (-a).exp())) * (1 if eta > 0 else -1))

    ref = torch.tensor([dlog_norm(float(e)) for e in etas], dtype=F64)
    assert_close(grad, ref, rtol=1e-12, atol=0)


def test_continuous_bernoulli_float32_gradient_near_zero():
    # float32 (and bf16/fp16, which are upcast to float32) near logit 0: value and
    # gradient within a few float32 ulps of 1 of the exact answer, no jump at the switch.
    etas = np.concatenate([np.geomspace(1e-5, 2.0, 60), -np.geomspace(1e-5, 2.0, 7)])
    eta, value, grad = _cb_eval(etas.tolist(), 0.5, torch.float32)
    ref = torch.tensor([_cb_reference(float(e), 0.5) for e in eta], dtype=F64)
    assert_close(value, ref[:, 0], rtol=0, atol=1e-6)
    assert_close(grad, ref[:, 1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Gradients, extreme values, autocast


def _req(*ts):
    return tuple(t.detach().clone().requires_grad_() for t in ts)


_CB_GRAD_LOGITS = torch.tensor([[0.0, 1e-5, -1e-5, 0.05 - 5e-7, 0.05 + 5e-7, -0.05 + 5e-7, 2.5, -6.0]], dtype=F64)
_GRADCHECKS = {
    "gaussian_kl": lambda: (lambda m, lv, pm, plv: gaussian_kl(m, lv, pm, plv), _req(*_latent(), *_latent())),
    "gaussian_kl_std": lambda: (gaussian_kl, _req(*_latent())),
    "bernoulli_nll": lambda: (bernoulli_nll, _req(3 * torch.randn(2, 5, dtype=F64), torch.rand(2, 5, dtype=F64))),
    "gaussian_nll_scalar": lambda: (gaussian_nll, _req(*_latent(2, 5), torch.tensor(0.3, dtype=F64))),
    "gaussian_nll_per_dim": lambda: (gaussian_nll, _req(*_latent(2, 5), torch.randn(5, dtype=F64))),
    "gaussian_nll_per_element": lambda: (gaussian_nll, _req(*_latent(2, 5), torch.randn(2, 5, dtype=F64))),
    "mse": lambda: (mse, _req(*_latent(2, 5))),
    "continuous_bernoulli_nll": lambda: (
        continuous_bernoulli_nll, _req(_CB_GRAD_LOGITS, torch.rand_like(_CB_GRAD_LOGITS) * 0.8 + 0.1)),
}


@pytest.mark.parametrize("name", list(_GRADCHECKS))
def test_gradcheck(name):
    fn, inputs = _GRADCHECKS[name]()
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("reconstruction", losses.RECONSTRUCTIONS)
def test_gradcheck_vae_loss(reconstruction):
    x, logits, mu, logvar = _req(torch.rand(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64), *_latent(2, 3))
    loss_fn = VAELoss(beta=2.0, reconstruction=reconstruction)
    assert gradcheck(lambda *a: loss_fn(*a).loss, (x.detach(), logits, mu, logvar))


def _finite_with_grad(fn, *inputs):
    inputs = _req(*inputs)
    out = fn(*inputs)
    out.sum().backward()
    return bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(t.grad).all()) for t in inputs)


def test_extreme_values_are_finite_in_float32():
    logvar = torch.linspace(-80, 80, 161).reshape(7, 23)
    mu = torch.randn(7, 23) * 10
    assert _finite_with_grad(gaussian_kl, mu, logvar)
    assert _finite_with_grad(gaussian_nll, mu, mu + torch.randn(7, 23), logvar)
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4, 0.0]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5]])
    for fn in (bernoulli_nll, continuous_bernoulli_nll):
        assert _finite_with_grad(lambda lg: fn(lg, x), logits)
    for rec in ("bernoulli", "continuous_bernoulli"):
        assert _finite_with_grad(lambda lg, m, lv: VAELoss(reconstruction=rec)(x, lg, m, lv).loss,
                                 logits, mu[:1, :3], logvar[:1, :3])


@pytest.mark.parametrize("logvar, residual", [(-89.0, 0.0), (-89.0, 2.0**-6), (-170.0, 0.0), (-95.0, 2.0**-25)])
def test_gaussian_nll_below_float32_s_exp_range_is_its_float64_value(logvar, residual):
    """(x - mean)^2 * e^-logvar was 0 * inf (NaN, and NaN gradients) at mean = x and inf for a
    small residual once e^-logvar overflowed float32 (logvar < -88.7), where the true values
    fit: scaled before it is squared, the residual gives them. A learned log-variance (a
    tensor) is not clamped; the float64 closed form, value and gradients."""
    x = torch.full((2, 3), 0.25)
    mean = (x + residual).requires_grad_()
    lv = torch.full((2, 3), logvar, requires_grad=True)
    for out in (gaussian_nll(mean, x, lv),
                VAELoss(reconstruction="gaussian", reduction="none")(x, (mean, lv), torch.zeros(2, 1),
                                                                    torch.zeros(2, 1)).reconstruction):
        g_mean, g_lv = torch.autograd.grad(out.sum(), (mean, lv))
        r, inv_var = residual, math.exp(-logvar)  # (x + residual) - x is residual exactly (2^-25: an ulp of 0.25)
        want = 3 * 0.5 * (math.log(2 * math.pi) + logvar + r * r * inv_var)
        assert_close(out.double(), torch.full((2,), want, dtype=F64), rtol=1e-6, atol=1e-4)
        assert_close(g_mean.double(), torch.full((2, 3), r * inv_var, dtype=F64), rtol=1e-6, atol=0)
        assert_close(g_lv.double(), torch.full((2, 3), 0.5 * (1 - r * r * inv_var), dtype=F64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("call", [
    lambda lv: gaussian_nll(torch.zeros(2, 3), torch.zeros(2, 3), lv),
    lambda lv: reconstruction_nll("gaussian", torch.zeros(2, 3), torch.zeros(2, 3), logvar=lv, validate_args=False),
    lambda lv: VAELoss(reconstruction="gaussian", logvar=lv),
    lambda lv: VAELoss(reconstruction="gaussian", logvar=lv, validate_args=False),
])
@pytest.mark.parametrize("logvar", [-90.0, 80.5, -1e4, math.inf])
def test_a_fixed_log_variance_number_is_refused_outside_model_config_s_range(call, logvar):
    """A fixed log-variance given as a number lies in [-80, 80], as ModelConfig.fixed_logvar:
    beyond, e^-logvar (or e^logvar) leaves float32 (VAELoss(logvar=-90) gave NaN at mean = x)."""
    from vaekit.model_config import MAX_LOGVAR

    assert losses._MAX_LOGVAR == MAX_LOGVAR
    message = f"logvar must be a finite number >= -80 and <= 80, got {logvar}"
    with pytest.raises(ValueError, match=re.escape(message)):
        call(logvar)
    call(-80.0), call(80)  # the bounds themselves


@pytest.mark.parametrize("prior_logvar", [-100.0, torch.tensor([-100.0]), torch.full((2, 1), -100.0)])
@pytest.mark.parametrize("offset", [0.0, 2.0**-20])
def test_gaussian_kl_to_a_narrow_prior_is_its_float64_value(prior_logvar, offset):
    """(mu - m)^2 * e^-s was 0 * inf (NaN) at mu = m once e^-s overflowed float32 (s < -88.7);
    scaled before it is squared, the difference gives the KL, 0 at the prior itself."""
    mu = torch.full((2, 1), 1.0 + offset, requires_grad=True)
    logvar = torch.full((2, 1), -100.0, requires_grad=True)
    kl = gaussian_kl(mu, logvar, 1.0, prior_logvar)
    g_mu, g_lv = torch.autograd.grad(kl.sum(), (mu, logvar))
    inv_var = math.exp(100.0)
    assert_close(kl.double(), torch.full((2,), 0.5 * offset**2 * inv_var, dtype=F64), rtol=1e-6, atol=0)
    assert_close(g_mu.double(), torch.full((2, 1), offset * inv_var, dtype=F64), rtol=1e-6, atol=0)
    assert_close(g_lv.double(), torch.zeros(2, 1, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("x, shown", [
    (torch.tensor([[0.5, 1.0000001]]), "[0.5, 1.0000001192092896]"),  # :g wrote "1"
    (torch.tensor([[0.5, 1 + 2.0**-52]], dtype=F64), "[0.5, 1.0000000000000002]"),
    (torch.tensor([[-0.5, 1.0]]), "[-0.5, 1]"),  # :g where it shows the value outside
    (torch.tensor([[0.25, 1.5]]), "[0.25, 1.5]"),
])
def test_a_value_just_outside_the_unit_interval_is_shown_outside_it(x, shown):
    with pytest.raises(ValueError, match=re.escape(f"x must lie in [0, 1], got values in {shown}")):
        bernoulli_nll(torch.zeros_like(x), x)


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e20), (torch.float32, 3e38), (torch.float64, 1e200)])
def test_continuous_bernoulli_gradient_finite_for_any_finite_logit(dtype, big):
    # "Stable for logits of any size": the unused Taylor branch must not overflow, or
    # torch.where sends 0 * inf = NaN into the gradient.
    logits, x = torch.tensor([[big, -big]], dtype=dtype), torch.tensor([[0.3, 0.3]], dtype=dtype)
    assert _finite_with_grad(lambda lg: continuous_bernoulli_nll(lg, x), logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_numeric_log_variance_is_not_rounded_to_half_inputs(dtype):
    """Half inputs are computed in float32, and so is a log-variance given as a number
    (log(0.1) in bfloat16 moved a 784-pixel Gaussian NLL by about 1.6 nats)."""
    mean, x = torch.rand(2, 784).to(dtype), torch.rand(2, 784).to(dtype)
    lv = math.log(0.1)
    want = gaussian_nll(mean.double(), x.double(), lv).float()
    assert_close(gaussian_nll(mean, x, lv), want, rtol=1e-5, atol=1e-3)
    assert_close(VAELoss(reconstruction="gaussian", logvar=lv, reduction="none")(
        x, mean, torch.zeros(2, 3), torch.zeros(2, 3)).loss, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_bf16_autocast_matches_float32_of_the_same_values(scale):
    layer = torch.nn.Linear(4, 12)
    with torch.no_grad():
        layer.weight.mul_(scale)
    h, x = torch.randn(3, 4), torch.rand(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h)
        logits, mu, logvar = out[:, :6], out[:, 6:9] / scale, 80 * torch.tanh(out[:, 9:])
        assert logits.dtype == torch.bfloat16
        got = [bernoulli_nll(logits, x), continuous_bernoulli_nll(logits, x), gaussian_kl(mu, logvar),
               VAELoss(reconstruction="continuous_bernoulli")(x, logits, mu, logvar).loss]
    want = [bernoulli_nll(logits.float(), x), continuous_bernoulli_nll(logits.float(), x),
            gaussian_kl(mu.float(), logvar.float()),
            VAELoss(reconstruction="continuous_bernoulli")(x, logits.float(), mu.float(), logvar.float()).loss]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert_close(g, w, rtol=0, atol=0)
    got[-1].backward()
    assert torch.isfinite(layer.weight.grad).all()


_MIXED = {  # each loss with its arguments; one of them is made float32, the rest float64
    "bernoulli_nll": (bernoulli_nll, lambda: (20 + 1e-3 * torch.randn(2, 784, dtype=F64), torch.zeros(2, 784, dtype=F64))),
    "continuous_bernoulli_nll": (continuous_bernoulli_nll, lambda: (3 * torch.randn(2, 9, dtype=F64),
                                                                    torch.rand(2, 9, dtype=F64))),
    "gaussian_nll": (gaussian_nll, lambda: (torch.randn(2, 9, dtype=F64), torch.randn(2, 9, dtype=F64),
                                            torch.randn(9, dtype=F64))),
    "gaussian_nll_0dim_logvar": (gaussian_nll, lambda: (torch.randn(2, 9, dtype=F64), torch.randn(2, 9, dtype=F64),
                                                        torch.tensor(-1.3, dtype=F64))),
    "mse": (mse, lambda: (torch.randn(2, 9, dtype=F64), torch.randn(2, 9, dtype=F64))),
    "gaussian_kl": (gaussian_kl, lambda: (*_latent(2, 5), torch.randn(5, dtype=F64), torch.tensor(0.7, dtype=F64))),
}


@pytest.mark.parametrize("name", list(_MIXED))
@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16])
def test_mixed_dtypes_are_computed_in_the_common_dtype(name, low):
    # bernoulli_nll(float64 logits, float32 x) was computed in float32 (~2e-3 nats off on 784
    # pixels) while the others promoted: now every loss computes in the common dtype.
    fn, make = _MIXED[name]
    args = make()
    for i in range(len(args)):
        mixed = [a.to(low) if j == i else a for j, a in enumerate(args)]
        reference = fn(*[a.double() for a in mixed])  # the same values, all float64
        got = fn(*mixed)
        assert got.dtype == F64, (name, i)
        assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("reconstruction", losses.RECONSTRUCTIONS)
def test_vae_loss_with_mixed_dtypes_is_float64(reconstruction):
    # Each term is computed in the common dtype of its own arguments: here float64 for both.
    x, out, mu, logvar = _batch(reconstruction)
    x32, logvar32 = x.float(), logvar.float()
    got = VAELoss(2.0, reconstruction)(x32, out, mu, logvar32)
    want = VAELoss(2.0, reconstruction)(x32.double(), out, mu, logvar32.double())
    for g, w in zip(got, want):
        assert g.dtype == F64
        assert_close(g, w, rtol=0, atol=0)


_EMPTY = {
    "bernoulli_nll": lambda x: bernoulli_nll(x, x),
    "continuous_bernoulli_nll": lambda x: continuous_bernoulli_nll(x, x),
    "gaussian_nll": lambda x: gaussian_nll(x, x),
    "gaussian_nll_per_dim_logvar": lambda x: gaussian_nll(x, x, torch.zeros(x.shape[1:])),
    "mse": lambda x: mse(x, x),
    "gaussian_kl": lambda x: gaussian_kl(x.flatten(1), x.flatten(1)),
    **{f"reconstruction_nll_{k}": (lambda k: lambda x: reconstruction_nll(k, x, x))(k) for k in losses.RECONSTRUCTIONS},
}


@pytest.mark.parametrize("name", list(_EMPTY))
@pytest.mark.parametrize("event", [(5,), (1, 3, 2)])
def test_every_loss_takes_an_empty_batch(name, event):
    # sum_event reshaped with -1, which torch refuses for 0 elements.
    x = torch.zeros(0, *event, requires_grad=True)
    out = _EMPTY[name](x)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reconstruction", losses.RECONSTRUCTIONS)
def test_vae_loss_on_an_empty_batch(reconstruction):
    x, out, mu, logvar = _batch(reconstruction)
    empty = (x[:0], tuple(o[:0] for o in out) if isinstance(out, tuple) else out[:0], mu[:0], logvar[:0])
    none = VAELoss(2.0, reconstruction, "none")(*empty)
    assert all(t.shape == (0,) for t in none)
    total = VAELoss(2.0, reconstruction, "sum")(*empty)
    assert all(t.shape == () and float(t) == 0.0 for t in total)  # the sum of nothing
    # torch's mean of nothing is NaN; a NaN loss would train on silently: refused, naming the batch.
    with pytest.raises(ValueError, match=re.escape("reduction='mean' needs a batch of at least one example, "
                                                   "got an empty batch (x has batch size 0)")):
        VAELoss(2.0, reconstruction, "mean")(*empty)


# ---------------------------------------------------------------------------------------
# mse is a Gaussian with a fixed variance


@pytest.mark.parametrize("var", [0.5, 1.0, 0.1, 3.0])
def test_mse_is_twice_sigma2_gaussian_nll_minus_constant(var):
    x_hat, x = torch.randn(3, 2, 5, dtype=F64), torch.randn(3, 2, 5, dtype=F64)
    d = 10
    # docstring: gaussian_nll = mse / (2 sigma^2) + (D/2) log(2 pi sigma^2)
    const = var * d * math.log(2 * math.pi * var)
    assert_close(mse(x_hat, x), 2 * var * gaussian_nll(x_hat, x, math.log(var)) - const, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_mse_objective_is_gaussian_objective_with_variance_one_half(beta):
    # Same beta on both sides: mse + beta KL = gaussian_nll(sigma^2 = 1/2) + beta KL - (D/2) log pi.
    x, x_hat, (mu, logvar) = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64), _latent()
    as_mse = VAELoss(beta, "mse", "none")(x, x_hat, mu, logvar).loss
    as_gauss = VAELoss(beta, "gaussian", "none", logvar=math.log(0.5))(x, x_hat, mu, logvar).loss
    assert_close(as_mse, as_gauss - 3 * math.log(math.pi), rtol=1e-12, atol=1e-12)
    if beta > 0:  # equivalently: tuning beta under MSE picks the variance sigma^2 = beta/2 of an ELBO
        var = beta / 2
        elbo = VAELoss(1.0, "gaussian", "none", logvar=math.log(var))(x, x_hat, mu, logvar).loss
        assert_close(as_mse, 2 * var * elbo - var * 6 * math.log(2 * math.pi * var), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# VAELoss


def _batch(reconstruction, b=4, d=6, dtype=F64):
    x = torch.rand(b, d, dtype=dtype)
    out = torch.randn(b, d, dtype=dtype)
    if reconstruction == "gaussian":
        out = (out, torch.randn(b, d, dtype=dtype))
    return (x, out, *_latent(b, 3, dtype))


@pytest.mark.parametrize("reconstruction", losses.RECONSTRUCTIONS)
def test_reductions_are_consistent(reconstruction):
    args = _batch(reconstruction)
    none, mean, total = (VAELoss(2.5, reconstruction, r)(*args) for r in ("none", "mean", "sum"))
    assert none.loss.shape == none.reconstruction.shape == none.kl.shape == (4,)
    assert_close(none.loss, none.reconstruction + 2.5 * none.kl)
    for field in ("loss", "reconstruction", "kl"):
        assert_close(getattr(mean, field), getattr(none, field).mean())
        assert_close(getattr(total, field), getattr(none, field).sum())


def test_sum_bernoulli_equals_the_classic_tutorial_loss():
    x, logits, mu, logvar = _batch("bernoulli", 8, 20)
    x = x.round()
    classic = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") + 3.0 * _classic_kl(mu, logvar).sum()
    assert_close(VAELoss(3.0, "bernoulli", "sum")(x, logits, mu, logvar).loss, classic, rtol=1e-10, atol=1e-10)


def test_gaussian_learned_variance_reaches_logvar():
    x, (mean, dec_logvar), mu, logvar = _batch("gaussian")
    dec_logvar.requires_grad_()
    out = VAELoss(reconstruction="gaussian", reduction="none")(x, (mean, dec_logvar), mu, logvar)
    assert_close(out.reconstruction, gaussian_nll(mean, x, dec_logvar))
    out.loss.sum().backward()
    assert dec_logvar.grad is not None and (dec_logvar.grad != 0).all()


@pytest.mark.parametrize("kwargs, name", [
    ({"beta": -0.1}, "beta"), ({"beta": float("nan")}, "beta"), ({"beta": float("inf")}, "beta"),
    ({"beta": torch.tensor([1.0, 2.0])}, "beta"), ({"beta": torch.tensor([2.0])}, "beta"),
    ({"reconstruction": "l2"}, "reconstruction"), ({"reduction": "avg"}, "reduction"),
    ({"reconstruction": "gaussian", "logvar": math.nan}, "logvar"),
    ({"reconstruction": "gaussian", "logvar": math.nan, "validate_args": False}, "logvar"),  # a setting
    ({"reconstruction": "gaussian", "logvar": torch.tensor([0.0, math.inf])}, "logvar"),
])
def test_vae_loss_rejects_bad_settings_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VAELoss(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": torch.tensor(True)}, "beta must be a floating-point tensor, got dtype torch.bool"),
    ({"beta": True}, "beta must be a number or a 0-dim floating-point tensor, got bool"),
    ({"reconstruction": "gaussian", "logvar": "0.1"}, "logvar must be a number, got str"),
    ({"reconstruction": "gaussian", "logvar": torch.zeros(3, dtype=torch.long)},
     "logvar must be a floating-point tensor, got dtype torch.int64"),
    ({"validate_args": 1}, "validate_args must be a bool or None, got int"),
])
def test_vae_loss_rejects_bad_types_at_construction(kwargs, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        VAELoss(**kwargs)


def test_vae_loss_beta_forms_and_dtypes():
    x, logits, mu, logvar = _batch("bernoulli", dtype=torch.float32)
    want = VAELoss(4.0, reduction="none")(x, logits, mu, logvar)
    # numpy scalars are numbers, as check_number has it elsewhere
    for beta in (np.float32(4.0), np.int64(4), torch.tensor(4.0), torch.tensor(4.0, dtype=F64)):
        for reduction in losses.REDUCTIONS:
            got = VAELoss(beta, reduction=reduction)(x, logits, mu, logvar)
            # a float64 0-dim beta made a float64 loss beside float32 terms
            assert got.loss.dtype == got.reconstruction.dtype == got.kl.dtype == torch.float32, (beta, reduction)
            assert got.loss.shape == got.kl.shape
            assert_close(got.loss, losses._reduce(want.loss, reduction))


@pytest.mark.parametrize("case", ["x_vs_logits", "mu_vs_logvar", "x_vs_mu_batch"])
def test_shape_mismatch_names_both_arguments_and_shapes(case):
    x, logits, mu, logvar = _batch("bernoulli")
    if case == "x_vs_logits":
        logits, words = logits[:, :5], ["x has", "logits has", "(4, 6)", "(4, 5)"]
    elif case == "mu_vs_logvar":
        logvar, words = logvar[:, :2], ["mu has", "logvar has", "(4, 3)", "(4, 2)"]
    else:
        mu, logvar, words = mu[:3], logvar[:3], ["x has", "mu has", "4", "3"]
    with pytest.raises(ValueError) as err:
        VAELoss()(x, logits, mu, logvar)
    assert all(w in str(err.value) for w in words), str(err.value)


def _bad_value_case(case):
    x, out, mu, logvar = _batch("bernoulli")
    rec = "bernoulli"
    if case == "x_above_one":
        x[0, 0] = 1.5
    elif case == "x_below_zero_cb":
        x[0, 0], rec = -0.1, "continuous_bernoulli"
    elif case == "nan_logits":
        out[1, 2] = float("nan")
    elif case == "nan_mu":
        mu[0, 0] = float("nan")
    elif case == "nan_x_gaussian":
        x[0, 0], rec = float("nan"), "gaussian"
    return rec, (x, out, mu, logvar)


@pytest.mark.parametrize("case", ["x_above_one", "x_below_zero_cb", "nan_logits", "nan_mu", "nan_x_gaussian"])
def test_value_checks_raise_and_can_be_switched_off(case):
    rec, args = _bad_value_case(case)
    with pytest.raises(ValueError):
        VAELoss(reconstruction=rec)(*args)
    VAELoss(reconstruction=rec, validate_args=False)(*args)
    set_validate_args(False)  # the autouse fixture restores it
    assert not validate_args_enabled()
    VAELoss(reconstruction=rec)(*args)


def test_set_validate_args_needs_a_bool():
    with pytest.raises(TypeError, match="value"):
        set_validate_args(0)


def test_the_validate_args_switch_is_the_one_in_checks():
    from vaekit import checks

    assert set_validate_args is checks.set_validate_args and validate_args_enabled is checks.validate_args_enabled
    set_validate_args(False)  # the autouse fixture restores it
    assert not checks.validating(None) and checks.validating(True)


def test_integer_tensors_raise_type_error():
    i, f = torch.ones(2, 3, dtype=torch.long), torch.rand(2, 3)
    calls = [lambda: gaussian_kl(i, f), lambda: bernoulli_nll(f, i), lambda: bernoulli_nll(i, f),
             lambda: gaussian_nll(f, i, 0.0), lambda: gaussian_nll(f, f, i), lambda: mse(i, f),
             lambda: continuous_bernoulli_nll(f, i), lambda: VAELoss()(i, f, f, f)]
    for call in calls:
        with pytest.raises(TypeError):
            call()


# ---------------------------------------------------------------------------------------
# The eight tutorial mistakes (docs/objective.md)


def test_mistake1_kl_leading_minus():
    mu, logvar = _latent(16, 5)
    kl = gaussian_kl(mu, logvar)
    assert (kl >= 0).all()
    assert_close(kl, kl_divergence(_posterior(mu, logvar), _posterior(0 * mu, 0 * logvar)), rtol=1e-10, atol=1e-10)
    sign_dropped = 0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)
    assert (sign_dropped < 0).all()


def test_mistake2_bernoulli_minus_covers_both_terms():
    logits, x = torch.randn(6, 10, dtype=F64), torch.randint(0, 2, (6, 10)).to(F64)
    nll = bernoulli_nll(logits, x)
    assert_close(nll, -Bernoulli(logits=logits).log_prob(x).sum(-1), rtol=1e-10, atol=1e-10)
    p = torch.sigmoid(logits)
    wrong = (-x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert ((wrong - nll).abs() > 1e-3).all()


def test_mistake3_code_imports_and_runs():
    import vaekit
    import vaekit.losses as module

    assert vaekit.__version__
    assert all(hasattr(module, name) for name in module.__all__)
    enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
    x = torch.rand(3, 6).round()
    mu, logvar = enc(x).chunk(2, dim=1)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    VAELoss()(x, dec(z), mu, logvar).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in [*enc.parameters(), *dec.parameters()])
    done = subprocess.run([sys.executable, "-c", "import vaekit.losses"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_mistake4_logvar_is_log_variance():
    mu = torch.randn(8, 3, dtype=F64)
    var = torch.rand(8, 3, dtype=F64) * 3 + 0.1
    kl = gaussian_kl(mu, var.log())
    assert_close(kl, kl_divergence(Independent(Normal(mu, var.sqrt()), 1), _posterior(0 * mu, 0 * mu)), rtol=1e-10, atol=1e-10)
    assert ((gaussian_kl(mu, var) - kl).abs() > 1e-3).all()


def test_mistake5_beta_multiplies_the_kl_only():
    x, logits, mu, logvar = _batch("bernoulli")
    base = VAELoss(0.0)(x, logits, mu, logvar)
    for beta in (0.5, 1.0, 7.0):
        out = VAELoss(beta)(x, logits, mu, logvar)
        assert_close(out.loss - base.loss, beta * out.kl)
        assert_close(out.reconstruction, base.reconstruction, rtol=0, atol=0)


def test_mistake6_reduction_must_be_explicit():
    b, d = 3, 784
    x, logits = torch.rand(b, 1, 28, 28, dtype=F64).round(), torch.randn(b, 1, 28, 28, dtype=F64)
    mu, logvar = _latent(b, 8)
    per_pixel_mean = F.binary_cross_entropy_with_logits(logits, x, reduction="mean") + _classic_kl(mu, logvar).mean()
    assert_close(per_pixel_mean, VAELoss(beta=d)(x, logits, mu, logvar).loss / d, rtol=1e-12, atol=1e-12)
    elbo_scale = VAELoss(beta=1.0)(x, logits, mu, logvar).loss / d
    assert abs(per_pixel_mean - elbo_scale) > 1e-3


def test_mistake7_cross_entropy_from_logits_and_normalised_on_grey_levels():
    logits = torch.tensor([40.0, 60.0, 80.0, -40.0, -60.0, -100.0]).reshape(-1, 1)
    x = (logits < 0).float()  # the worst case: confident and wrong
    truth = (F.softplus(logits.double()) - logits.double() * x.double()).flatten()
    on_probs = logits.clone().requires_grad_()
    probs = torch.sigmoid(on_probs)
    bce = F.binary_cross_entropy(probs, x, reduction="none").flatten()
    hand_written = -(x * probs.log() + (1 - x) * (1 - probs).log()).flatten()
    assert torch.isinf(hand_written[:3]).all()
    assert ((bce[:3] - truth[:3]).abs() > 10).all()  # clamped at 100 nats
    bce.sum().backward()
    assert (on_probs.grad.abs() < 1e-5).all()  # no gradient left although the model is wrong
    on_logits = logits.clone().requires_grad_()
    nll = bernoulli_nll(on_logits, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all()
    assert_close(nll.double(), truth, rtol=1e-6, atol=0)
    assert_close(on_logits.grad, torch.sigmoid(logits) - x)
    # grey levels: the continuous Bernoulli is a density on [0, 1]; exp(-BCE) is not.
    grid = torch.linspace(0, 1, 100_001, dtype=F64).reshape(-1, 1)
    for eta in (-5.0, -0.5, 0.0, 1e-4, 2.0, 8.0):
        lg = torch.full_like(grid, eta)
        density = torch.exp(-continuous_bernoulli_nll(lg, grid))
        unnormalised = torch.exp(-bernoulli_nll(lg, grid))
        assert abs(torch.trapezoid(density, grid.flatten()) - 1) < 1e-8
        assert abs(torch.trapezoid(unnormalised, grid.flatten()) - 1) > 0.4


def test_mistake8_beta_above_one_and_schedules():
    x, logits, mu, logvar = _batch("bernoulli")
    for beta in (4.0, 250.0, 0.0):
        out = VAELoss(beta)(x, logits, mu, logvar)
        assert_close(out.loss, out.reconstruction + beta * out.kl)
    beta = torch.tensor(0.0, dtype=F64)
    loss_fn = VAELoss(beta)
    seen = []
    for step in range(3):
        beta.fill_(min(1.0, step / 2))  # a warm-up schedule, updated in place
        seen.append(loss_fn(x, logits, mu, logvar))
    for out, b in zip(seen, (0.0, 0.5, 1.0)):
        assert_close(out.loss, out.reconstruction + b * out.kl)
    assert seen[0].loss < seen[1].loss < seen[2].loss


def test_docstring_examples_run():
    # The VAELoss example used names it never defined (docs/objective.md, mistake 3).
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.parametrize("field, value, error, pattern", [
    ("beta", -1.0, ValueError, r"beta must be a finite number >= 0, got -1\.0"),
    ("beta", "2", TypeError, r"beta must be a number or a 0-dim floating-point tensor, got str"),
    ("beta", torch.ones(2), ValueError, r"beta must be a scalar \(a 0-dim tensor\), got a tensor of shape \(2,\)"),
    ("reduction", "avg", ValueError, r"reduction must be one of mean, sum, none, got 'avg'"),
    ("reconstruction", "poisson", ValueError, r"reconstruction must be one of .*, got 'poisson'"),
])
def test_a_reassigned_setting_is_checked_as_the_constructors_is(field, value, error, pattern):
    """beta "may be reassigned between steps": a negative one gave a loss with a negative KL
    weight, and reduction="avg" a per-example vector, silently. Checked at the call."""
    loss_fn = VAELoss(beta=2.0)
    x, logits = torch.rand(3, 5).bernoulli(), torch.randn(3, 5)
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2)
    setattr(loss_fn, field, value)
    with pytest.raises(error, match=pattern):
        loss_fn(x, logits, mu, logvar)
    setattr(loss_fn, field, {"beta": torch.tensor(0.5), "reduction": "mean", "reconstruction": "bernoulli"}[field])
    out = loss_fn(x, logits, mu, logvar)  # a good one is taken, a tensor beta kept as it is
    torch.testing.assert_close(out.loss, out.reconstruction + (0.5 if field == "beta" else 2.0) * out.kl)


def test_a_tensor_beta_is_read_only_when_validating():
    """Reassigned each step on a GPU, a tensor beta read at every call would be a device sync
    a step: with value checks off only its shape and dtype are checked."""
    loss_fn = VAELoss(beta=1.0, validate_args=False)
    x, logits, mu, logvar = torch.rand(3, 5).bernoulli(), torch.randn(3, 5), torch.randn(3, 2), torch.randn(3, 2)
    loss_fn.beta = torch.tensor(-1.0)  # a value no check reads: taken
    torch.testing.assert_close(loss_fn(x, logits, mu, logvar).loss, loss_fn.__class__(0.0)(x, logits, mu, logvar).loss
                               - VAELoss(1.0)(x, logits, mu, logvar).kl)
    loss_fn.validate_args = True
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got -1\.0"):
        loss_fn(x, logits, mu, logvar)
    loss_fn.beta = torch.ones(2)  # a shape is metadata: refused either way
    loss_fn.validate_args = False
    with pytest.raises(ValueError, match=r"beta must be a scalar"):
        loss_fn(x, logits, mu, logvar)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got -3\.0"):
        VAELoss(beta=torch.nn.Parameter(torch.tensor(-3.0)))  # a Parameter is checked too


# ---------------------------------------------------------------------------------------
# torch.func and second derivatives


def test_per_example_gradients_under_vmap_are_a_loop_of_autograd_gradients():
    """vmap(grad(...)) over the examples, value checks off: each example's gradient as
    autograd gives it one example at a time. With the checks on, vmap cannot read values:
    the check says how to turn them off (PyTorch's own error spoke of data-dependent
    control flow)."""
    from torch.func import grad, vmap

    B, D, d = 5, 7, 3
    x, logits = torch.rand(B, D, dtype=F64), torch.randn(B, D, dtype=F64)
    mu, logvar = torch.randn(B, d, dtype=F64), torch.randn(B, d, dtype=F64)
    loss = VAELoss(beta=2.5, reduction="sum", validate_args=False)

    def one(lo, xi, m, v):
        return loss(xi[None], lo[None], m[None], v[None]).loss

    per_example = vmap(grad(one, argnums=(0, 2, 3)))(logits, x, mu, logvar)
    for i in range(B):
        inputs = [t[i:i + 1].clone().requires_grad_() for t in (logits, mu, logvar)]
        loss(x[i:i + 1], inputs[0], inputs[1], inputs[2]).loss.backward()
        for got, t in zip(per_example, inputs):
            assert_close(got[i], t.grad[0], rtol=1e-12, atol=1e-14)

    checked = VAELoss(beta=2.5, reduction="sum")
    for fn, args in ((lambda lo, xi: bernoulli_nll(lo, xi), (logits, x)),
                     (lambda m, v: gaussian_kl(m[None], v[None]), (mu, logvar)),
                     (lambda lo, xi, m, v: checked(xi[None], lo[None], m[None], v[None]).loss, (logits, x, mu, logvar))):
        with pytest.raises(RuntimeError, match=r"^the value check of \w+ cannot run under torch\.func\.vmap .*"
                                               r"pass validate_args=False or call vaekit\.set_validate_args\(False\)$"):
            vmap(fn)(*args)


@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "continuous_bernoulli", "kl", "vae_loss"])
def test_second_derivatives_pass_gradgradcheck(name):
    """Gradient penalties and Hessian-vector products differentiate the losses twice."""
    from torch.autograd import gradgradcheck

    B, D, d = 3, 4, 2
    x = torch.rand(B, D, dtype=F64)
    a, b = torch.randn(B, D, dtype=F64, requires_grad=True), torch.randn(B, D, dtype=F64, requires_grad=True)
    mu, logvar = torch.randn(B, d, dtype=F64, requires_grad=True), torch.randn(B, d, dtype=F64, requires_grad=True)
    fn, inputs = {
        "bernoulli": (lambda lo: bernoulli_nll(lo, x), (a,)),
        "gaussian": (lambda m, v: gaussian_nll(m, x, v), (a, b)),
        "continuous_bernoulli": (lambda lo: continuous_bernoulli_nll(lo, x), (a,)),
        "kl": (gaussian_kl, (mu, logvar)),
        "vae_loss": (lambda lo, m, v: VAELoss(beta=3.0)(x, lo, m, v).loss, (a, mu, logvar)),
    }[name]
    assert gradgradcheck(fn, inputs)
