"""Tests for vaekit.objectives: every formula against a second computation."""

import doctest
import json
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from vaekit import objectives as obj
from vaekit.losses import gaussian_kl, reconstruction_nll

D64 = torch.float64


# ---------------------------------------------------------------------------------------
# A tiny model implementing the model interface (encode/encode_params/decode/nll/forward)


class VAEOutput(NamedTuple):
    decoder_out: object
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


@dataclass
class TinyConfig:
    input_shape: tuple
    latent_dim: int
    likelihood: str


class TinyVAE(nn.Module):
    """Linear encoder and decoder; "gaussian" decodes to a (mean, logvar) pair."""

    def __init__(self, input_shape=(1, 2, 3), latent_dim=2, likelihood="bernoulli"):
        super().__init__()
        self.config = TinyConfig(input_shape, latent_dim, likelihood)
        size = math.prod(input_shape)
        self.enc = nn.Linear(size, 2 * latent_dim).double()
        self.dec = nn.Linear(latent_dim, size).double()
        self.dec_logvar = nn.Parameter(torch.tensor(0.0, dtype=D64))
        self.calls = 0

    def encode_params(self, x):
        mu, logvar = self.enc(x.flatten(1)).chunk(2, -1)
        return mu, logvar

    def encode(self, x):
        mu, logvar = self.encode_params(x)
        return Independent(Normal(mu, (0.5 * logvar).exp()), 1)

    def decode(self, z):
        out = self.dec(z).view(z.shape[0], *self.config.input_shape)
        if self.config.likelihood == "gaussian":
            return out, self.dec_logvar.expand_as(out)
        return out

    def nll(self, decoder_out, x):
        return reconstruction_nll(self.config.likelihood, decoder_out, x)

    def forward(self, x, noise=None):
        self.calls += 1
        mu, logvar = self.encode_params(x)
        z = mu + (0.5 * logvar).exp() * (torch.randn_like(mu) if noise is None else noise(mu.shape))
        return VAEOutput(self.decode(z), mu, logvar, z)


def binary_batch(b=4, shape=(1, 2, 3)):
    return torch.randint(0, 2, (b, *shape)).double()


def linear_gaussian(exact_posterior=True):
    """x = W z + b + noise, W with orthogonal columns so the exact posterior is diagonal.

    Returns the model (encoder = exact posterior, or perturbed) and log p(x) as a function.
    """
    torch.manual_seed(0)
    model = TinyVAE(input_shape=(2, 2), latent_dim=2, likelihood="gaussian")
    q_mat, _ = torch.linalg.qr(torch.randn(4, 2, dtype=D64))
    s = torch.tensor([1.5, 0.7], dtype=D64)
    w, bias, logvar = q_mat * s, torch.randn(4, dtype=D64), math.log(0.3)
    post_var = 1.0 / (1.0 + s.square() / math.exp(logvar))
    a = post_var[:, None] * w.T / math.exp(logvar)
    with torch.no_grad():
        model.dec.weight.copy_(w)
        model.dec.bias.copy_(bias)
        model.dec_logvar.fill_(logvar)
        model.enc.weight.copy_(torch.cat([a, torch.zeros_like(a)]))
        model.enc.bias.copy_(torch.cat([-a @ bias, post_var.log()]))
        if not exact_posterior:
            model.enc.weight[:2] *= 0.5
            model.enc.bias[2:] += 1.0
    marginal = MultivariateNormal(bias, w @ w.T + math.exp(logvar) * torch.eye(4, dtype=D64))
    return model, (lambda x: marginal.log_prob(x.flatten(1))), (w, bias, logvar)


# ---------------------------------------------------------------------------------------
# Schedules


def test_schedules_against_interpolation():
    for step in range(0, 40):
        assert obj.constant_beta(step, 2.5) == 2.5
        want = np.interp(step, [0, 10], [0.2, 3.0])
        assert obj.linear_warmup(step, beta=3.0, warmup_steps=10, start=0.2) == pytest.approx(want)
        want = np.interp(step % 8, [0, 0.25 * 8], [0.0, 4.0])
        assert obj.cyclical_beta(step, beta=4.0, cycle_steps=8, ratio=0.25) == pytest.approx(want)
        assert obj.beta_schedule("linear", step, beta=1.0, warmup_steps=5) == obj.linear_warmup(
            step, beta=1.0, warmup_steps=5)
        assert obj.beta_schedule("cyclical", step, beta=1.0, cycle_steps=6, ratio=0.5) == obj.cyclical_beta(
            step, beta=1.0, cycle_steps=6)
    assert obj.linear_warmup(0, beta=2.0, warmup_steps=0) == 2.0
    assert obj.cyclical_beta(0, beta=4.0, cycle_steps=8) == 0.0
    assert obj.cyclical_beta(7, beta=4.0, cycle_steps=8, ratio=1.0) == pytest.approx(3.5)
    # the step's share first: beta * step overflowed (inf; a float * a 400-digit int raised OverflowError)
    assert obj.linear_warmup(10**400, beta=1.0, warmup_steps=10**401) == pytest.approx(0.1)
    assert obj.beta_schedule("linear", 2, beta=1.7e308, warmup_steps=3) == pytest.approx(1.7e308 / 3 * 2)


@pytest.mark.parametrize("fields", [
    dict(beta=3),  # an int beta: a float back, as from beta_schedule
    dict(beta=2.5, beta_schedule="linear", warmup_steps=7),
    dict(beta=4.0, beta_schedule="cyclical", cycle_steps=6, cycle_ratio=0.3),
])
def test_config_beta_at_is_the_checked_schedule(fields):
    """The training loop's per-step beta (checked once, in the config) is exactly the
    public, checked schedule: the same float at every step, cycles and the end of the
    warm-up included."""
    oc = obj.ObjectiveConfig(**fields)
    for step in range(0, 30):
        got = oc.beta_at(step)
        want = obj.beta_schedule(oc.beta_schedule, step, beta=oc.beta, warmup_steps=oc.warmup_steps,
                                 cycle_steps=oc.cycle_steps, ratio=oc.cycle_ratio)
        assert type(got) is float and got == want, step
        if oc.beta_schedule == "linear":
            assert got == pytest.approx(np.interp(step, [0, oc.warmup_steps], [0.0, oc.beta]))
        elif oc.beta_schedule == "cyclical":
            assert got == pytest.approx(np.interp(step % oc.cycle_steps, [0, oc.cycle_ratio * oc.cycle_steps],
                                                  [0.0, oc.beta]))
        else:
            assert got == oc.beta


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="cosine"), "beta_schedule"),
    (dict(name="linear"), "warmup_steps"),
    (dict(name="cyclical"), "cycle_steps"),
    (dict(name="constant", beta=-1.0), "beta"),
    (dict(name="constant", ratio=0.0), "ratio"),
    (dict(name="constant", step=-1), "step"),
    (dict(name="constant", warmup_steps=1.5), "warmup_steps"),
])
def test_beta_schedule_rejects(kwargs, match):
    args = dict(name="constant", step=0, beta=1.0, warmup_steps=0, cycle_steps=0, ratio=0.5) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        obj.beta_schedule(args.pop("name"), args.pop("step"), **args)


# ---------------------------------------------------------------------------------------
# Capacity and free bits


def test_capacity_penalty():
    torch.manual_seed(0)
    kl = (torch.rand(6, dtype=D64) * 10).requires_grad_()
    for step in (0, 5, 10, 50):
        c = 8.0 * min(step, 10) / 10
        out = obj.capacity_kl_penalty(kl, step, gamma=3.0, capacity_max=8.0, capacity_steps=10)
        torch.testing.assert_close(out, torch.tensor([3.0 * abs(v - c) for v in kl.tolist()], dtype=D64))
    (grad,) = torch.autograd.grad(out.sum(), kl)
    torch.testing.assert_close(grad, 3.0 * torch.sign(kl.detach() - 8.0))
    with pytest.raises(ValueError, match="gamma"):
        obj.capacity_kl_penalty(kl, 0, gamma=0.0, capacity_max=1.0, capacity_steps=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_capacity_penalty_of_a_half_precision_kl_is_computed_in_float32(dtype):
    """gamma * |kl - C| in float16 overflowed past 65504 (gamma = 1000, kl = 1000: inf)."""
    kl = torch.tensor([1000.0, 3.0], dtype=dtype, requires_grad=True)
    out = obj.capacity_kl_penalty(kl, 5, gamma=1000.0, capacity_max=25.0, capacity_steps=10)
    (g,) = torch.autograd.grad(out.sum(), kl)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1000.0 * (1000.0 - 12.5), 1000.0 * 9.5]))
    torch.testing.assert_close(g, torch.tensor([1000.0, -1000.0], dtype=dtype))


def per_dim_kl(mu, logvar):
    q = Normal(mu, (0.5 * logvar).exp())
    return torch.distributions.kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu)))


def test_free_bits_value_and_gradients():
    torch.manual_seed(0)
    mu = torch.randn(5, 3, dtype=D64) * torch.tensor([2.0, 1.5, 0.01], dtype=D64)
    logvar = torch.randn(5, 3, dtype=D64) * torch.tensor([0.5, 0.5, 0.01], dtype=D64)
    mu.requires_grad_()
    logvar.requires_grad_()
    fb = 0.5
    kl_j = per_dim_kl(mu, logvar).mean(0)
    assert bool((kl_j[:2] > fb).all()) and float(kl_j[2].detach()) < fb
    out = obj.free_bits_kl(mu, logvar, fb)
    assert out.shape == (5,)
    torch.testing.assert_close(out.mean(), torch.clamp(kl_j, min=fb).sum())
    g_fb = torch.autograd.grad(out.mean(), (mu, logvar))
    g_kl = torch.autograd.grad(gaussian_kl(mu, logvar).mean(), (mu, logvar))
    for a, b in zip(g_fb, g_kl):
        torch.testing.assert_close(a[:, :2], b[:, :2])
        assert bool((a[:, 2] == 0).all()) and bool((b[:, 2] != 0).all())
    torch.testing.assert_close(obj.free_bits_kl(mu, logvar, 0.0), gaussian_kl(mu, logvar))
    assert torch.autograd.gradcheck(lambda m, v: obj.free_bits_kl(m, v, fb), (mu, logvar))


# ---------------------------------------------------------------------------------------
# IWAE


def test_log_weights_exact_posterior_equal_log_marginal():
    # With q(z|x) the exact posterior, w = p(x, z) / p(z|x) = p(x) for every z.
    model, log_px, _ = linear_gaussian(exact_posterior=True)
    x = torch.randn(3, 2, 2, dtype=D64)
    log_w = obj.log_importance_weights(model, x, 7)
    assert log_w.shape == (7, 3)
    torch.testing.assert_close(log_w, log_px(x).expand(7, 3), rtol=0, atol=1e-10)
    torch.testing.assert_close(obj.iwae_bound(log_w), log_px(x), rtol=0, atol=1e-10)


def test_k1_bound_is_the_single_sample_elbo():
    torch.manual_seed(1)
    model, x = TinyVAE(), binary_batch()
    torch.manual_seed(5)
    bound = obj.iwae_bound(obj.log_importance_weights(model, x, 1))
    torch.manual_seed(5)
    q = model.encode(x)
    z = q.rsample((1,))[0]
    mc_kl = q.log_prob(z) - Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(bound, -(model.nll(model.decode(z), x) + mc_kl))
    torch.manual_seed(5)
    torch.testing.assert_close(obj.iwae_loss(model, x, 1), -bound)


def test_k1_bound_matches_closed_form_elbo_in_expectation():
    model, _, (w, bias, logvar) = linear_gaussian(exact_posterior=False)
    x = torch.randn(2, 2, 2, dtype=D64)
    mu, lv = model.encode_params(x)
    resid = (x.flatten(1) - mu @ w.T - bias).square().sum(1) + (lv.exp() * w.square().sum(0)).sum(1)
    elbo = -(0.5 * (4 * (math.log(2 * math.pi) + logvar) + resid / math.exp(logvar)) + gaussian_kl(mu, lv))
    torch.manual_seed(2)
    log_w = obj.log_importance_weights(model, x, 20000)
    stderr = log_w.std(0) / math.sqrt(20000)
    assert bool(((log_w.mean(0) - elbo).abs() < 4 * stderr).all())


def test_bound_increases_with_k_towards_log_marginal():
    model, log_px, _ = linear_gaussian(exact_posterior=False)
    x = torch.randn(2, 2, 2, dtype=D64)
    torch.manual_seed(3)
    with torch.no_grad():
        log_w = obj.log_importance_weights(model, x, 64 * 400)
    means = [obj.iwae_bound(log_w.view(k, -1, 2)).mean(0) for k in (1, 4, 64)]
    gap = log_px(x) - means[0]
    assert bool((gap > 0.3).all())
    assert bool((means[0] < means[1]).all()) and bool((means[1] < means[2]).all())
    assert bool((means[2] < log_px(x) + 0.01).all()) and bool((log_px(x) - means[2] < 0.25 * gap).all())


class ThreeLogWeights(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        torch.manual_seed(11)  # the same noise at every call: a deterministic function of the weights
        return obj.log_importance_weights(self.model, x, 3)


def test_log_weights_gradcheck_in_the_weights_and_errors():
    torch.manual_seed(4)
    wrapper = ThreeLogWeights(TinyVAE(input_shape=(5,)))
    x = torch.randint(0, 2, (3, 5)).double()
    names = ("model.enc.weight", "model.enc.bias", "model.dec.weight")
    start = dict(wrapper.named_parameters())
    params = tuple(start[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(
        lambda *p: torch.func.functional_call(wrapper, dict(zip(names, p)), (x,)), params)
    log_w = torch.randn(4, 3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(obj.iwae_bound, (log_w,))
    with pytest.raises(ValueError, match="k must"):
        obj.log_importance_weights(wrapper.model, x, 0)


def test_iwae_bound_names_log_w_for_no_samples_or_no_batch_dim():
    # k = 0 gave "math domain error" from log(0); a 1-D log_w gave a 0-dim bound.
    with pytest.raises(ValueError, match=re.escape("log_w must hold k >= 1 samples along its first dimension "
                                                   "[k, B], got shape (0, 3)")):
        obj.iwae_bound(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=re.escape("log_w must have at least 2 dimension(s) [B, ...], got shape (4,)")):
        obj.iwae_bound(torch.zeros(4))
    assert obj.iwae_bound(torch.zeros(4, 0)).shape == (0,)  # an empty batch is no error


# ---------------------------------------------------------------------------------------
# beta-TCVAE


def tc_inputs(b=5, d=3, seed=0):
    torch.manual_seed(seed)
    mu, logvar = torch.randn(b, d, dtype=D64), torch.randn(b, d, dtype=D64) * 0.3
    return mu + (0.5 * logvar).exp() * torch.randn(b, d, dtype=D64), mu, logvar


@pytest.mark.parametrize("estimator", obj.TC_ESTIMATORS)
def test_tc_terms_telescope_to_the_kl_estimate(estimator):
    z, mu, logvar = tc_inputs()
    terms = obj.tc_decomposition(z, mu, logvar, 1000, estimator=estimator)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    kl_hat = q.log_prob(z) - Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(sum(terms), kl_hat, rtol=0, atol=1e-12)
    weighted = obj.beta_tcvae_kl(z, mu, logvar, 1000, alpha=0.5, beta=6.0, gamma=2.0, estimator=estimator)
    torch.testing.assert_close(weighted, 0.5 * terms[0] + 6.0 * terms[1] + 2.0 * terms[2])


@pytest.mark.parametrize("estimator", obj.TC_ESTIMATORS)
def test_aggregate_posterior_estimate_against_loops(estimator):
    z, mu, logvar = tc_inputs(b=3, d=2, seed=1)
    n, b = 10, 3

    def weight(i, j):
        if estimator == "mws":
            return 1.0 / (b * n)
        return 1.0 / n if i == j else (n - 1) / (n * (b - 1))

    def dens(i, j, dims):
        return math.prod(math.exp(-(z[i, k] - mu[j, k]) ** 2 / (2 * math.exp(logvar[j, k])))
                         / math.sqrt(2 * math.pi * math.exp(logvar[j, k])) for k in dims)

    log_qz = [math.log(sum(weight(i, j) * dens(i, j, range(2)) for j in range(b))) for i in range(b)]
    log_prod = [sum(math.log(sum(weight(i, j) * dens(i, j, [k]) for j in range(b))) for k in range(2))
                for i in range(b)]
    mi, tc, _ = obj.tc_decomposition(z, mu, logvar, n, estimator=estimator)
    log_qz_x = Independent(Normal(mu, (0.5 * logvar).exp()), 1).log_prob(z)
    torch.testing.assert_close(log_qz_x - mi, torch.tensor(log_qz, dtype=D64))
    torch.testing.assert_close(log_qz_x - mi - tc, torch.tensor(log_prod, dtype=D64))


def test_tc_zero_for_a_factorised_dataset_exactly():
    # Means on a 3 x 4 product grid with shared variances: q(z) = q(z1) q(z2) exactly.
    a, c = torch.tensor([-1.0, 0.0, 2.0], dtype=D64), torch.tensor([-2.0, -0.5, 0.5, 1.0], dtype=D64)
    mu = torch.cartesian_prod(a, c)
    logvar = torch.tensor([-1.0, 0.3], dtype=D64).expand(12, 2)
    torch.manual_seed(0)
    z = mu + (0.5 * logvar).exp() * torch.randn(12, 2, dtype=D64)
    tc = obj.tc_decomposition(z, mu, logvar, 12, estimator="stratified").total_correlation
    torch.testing.assert_close(tc, torch.zeros(12, dtype=D64), rtol=0, atol=1e-12)
    tc_mws = obj.tc_decomposition(z, mu, logvar, 12, estimator="mws").total_correlation
    torch.testing.assert_close(tc_mws, torch.full((12,), math.log(12), dtype=D64))  # (d-1) log B offset


def test_tc_near_zero_for_independent_q_and_positive_for_correlated():
    torch.manual_seed(0)
    b, n, var, means = 128, 10_000, 0.25, {}
    for kind in ("independent", "correlated"):
        for est in obj.TC_ESTIMATORS:
            means[est, kind] = 0.0
        for _ in range(10):
            m = torch.randn(b, 2, dtype=D64)
            if kind == "correlated":
                m[:, 1] = m[:, 0]
            z = m + math.sqrt(var) * torch.randn(b, 2, dtype=D64)
            logvar = torch.full((b, 2), math.log(var), dtype=D64)
            for est in obj.TC_ESTIMATORS:
                means[est, kind] += float(obj.tc_decomposition(z, m, logvar, n, estimator=est)[1].mean()) / 10
    true_tc = -0.5 * math.log(1 - (1 / (1 + var)) ** 2)  # z1, z2 correlated with rho = 1 / (1 + var)
    assert abs(means["stratified", "independent"]) < 0.08
    assert abs(means["stratified", "correlated"] - true_tc) < 0.1
    # MWS: the same ordering, on top of an offset between (d-1) log B and (d-1) log N
    # (every posterior overlaps the others here)
    assert math.log(b) < means["mws", "independent"] < math.log(n) + 0.1
    assert means["mws", "correlated"] > means["mws", "independent"] + 0.5


def test_mws_offset_reaches_beyond_d_minus_1_log_n_when_joints_stand_apart_and_marginals_overlap():
    """A factorised q(z) (TC 0) whose joint posteriors stand apart while each dimension's
    marginal is shared by 20 items: the MWS offset is sum_d o_d - o_joint, above the
    (d-1) log N that its docstring once called its maximum, below d log N - log B."""
    torch.manual_seed(0)
    g = torch.linspace(-2, 2, 20, dtype=D64)
    mu = torch.cartesian_prod(g, g)
    (n, d), b = mu.shape, 20
    logvar = torch.full_like(mu, math.log(1e-4))
    tcs = []
    for _ in range(300):
        rows = torch.randperm(n)[:b]
        z = mu[rows] + 0.01 * torch.randn(b, d, dtype=D64)
        tcs.append(obj.tc_decomposition(z, mu[rows], logvar[rows], n, estimator="mws").total_correlation.mean())
    tcs = torch.stack(tcs)
    mean, se = float(tcs.mean()), float(tcs.std() / 300**0.5)
    assert (d - 1) * math.log(n) + 10 * se < mean < d * math.log(n) - math.log(b), (mean, se)


def chen_log_weights(b, n):
    """Chen et al.'s minibatch stratified sampling matrix, as their code builds it."""
    m, strat = b - 1, (n - b + 1) / (n * (b - 1))
    w = torch.full((b, b), 1 / m, dtype=D64)
    w.view(-1)[::m + 1] = 1 / n
    w.view(-1)[1::m + 1] = strat
    w[m - 1, 0] = strat
    return w.log()


def tc_with_log_weights(z, mu, logvar, log_w):
    """``log q(z_i) - sum_d log q(z_id)`` with ``q = sum_j w_ij q(.|x_j)``; ``log_w`` is ``[B, M]``."""
    log_q = Normal(mu, (0.5 * logvar).exp(), validate_args=False).log_prob(z.unsqueeze(1))  # [B, M, d]
    return torch.logsumexp(log_w + log_q.sum(-1), 1) - torch.logsumexp(log_w.unsqueeze(-1) + log_q, 1).sum(-1)


@pytest.mark.parametrize("correlated, sd", [(False, 0.1), (False, 0.3), (True, 0.3)])
def test_tc_estimators_against_the_exact_aggregate_posterior_of_a_finite_data_set(correlated, sd):
    """N = 256 items on an 8 x 8 x 4 grid of means (factorised: exact TC 0; or z2's mean
    set to z1's), batches of B = 64 drawn from them. Each estimator's mean error is taken
    against the exact TC of the same z's, from q(z) = mean_n q(z|x_n) over the whole data."""
    g = torch.Generator().manual_seed(0)
    axis = torch.linspace(-2, 2, 8, dtype=D64)
    mu_all = torch.cartesian_prod(axis, axis, torch.linspace(-1.5, 1.5, 4, dtype=D64))
    if correlated:
        mu_all[:, 1] = mu_all[:, 0]
    (n, d), b, reps = mu_all.shape, 64, 50
    logvar_all = torch.full_like(mu_all, 2 * math.log(sd))
    errors = dict.fromkeys(("mws", "stratified", "chen"), 0.0)
    for _ in range(reps):
        rows = torch.randperm(n, generator=g)[:b]
        mu, logvar = mu_all[rows], logvar_all[rows]
        z = mu + sd * torch.randn(b, d, generator=g, dtype=D64)
        exact = tc_with_log_weights(z, mu_all, logvar_all, torch.full((b, n), -math.log(n), dtype=D64))
        if not correlated:
            torch.testing.assert_close(exact, torch.zeros(b, dtype=D64), rtol=0, atol=1e-10)
        for est in obj.TC_ESTIMATORS:
            tc = obj.tc_decomposition(z, mu, logvar, n, estimator=est).total_correlation
            errors[est] += float((tc - exact).mean()) / reps
        errors["chen"] += float((tc_with_log_weights(z, mu, logvar, chen_log_weights(b, n)) - exact).mean()) / reps
    # the docstring's range at B = 64 is -2 (overlapping, d = 6) to +0.25 (narrow); at d = 3
    # the errors measured over ten seeds lay in -0.26 to +0.11
    assert -0.4 < errors["stratified"] < 0.25, errors
    assert abs(errors["stratified"]) < abs(errors["mws"]) - 10, errors  # MWS: its ~11-nat offset
    if not correlated:  # Chen et al.'s matrix: +0.4 to +1.3 nats off here
        assert abs(errors["stratified"]) < abs(errors["chen"]) - 0.05, errors


def test_mws_offset_grows_with_the_mutual_information_where_stratified_follows_the_exact_tc():
    """Why "stratified" is the default. A factorised q(z) (means on a 12 x 12 x 12 grid,
    shared widths: the exact full-data TC is 0 at every width), batches of 64 of its N =
    1728 items. MWS's TC is the exact one plus an offset of (d-1) log N where the
    posteriors overlap (MI ~ 1.4 nats) and d log N - log B where each stands apart (MI =
    log N): it rises by log(N/B) with the MI, so beta * TC penalises the MI. The
    stratified estimate stays within its small-batch bias of the exact TC at both."""
    g = torch.Generator().manual_seed(0)
    axis = torch.linspace(-2, 2, 12, dtype=D64)
    mu_all = torch.cartesian_prod(axis, axis, axis)
    (n, d), b, reps = mu_all.shape, 64, 10
    eps = torch.randn(n, d, generator=g, dtype=D64)
    errors = {}
    for sd in (1.0, 0.01):
        logvar_all = torch.full_like(mu_all, 2 * math.log(sd))
        errors[sd] = dict.fromkeys(("mws", "stratified", "mi"), 0.0)
        for _ in range(reps):
            rows = torch.randperm(n, generator=g)[:b]
            mu, logvar = mu_all[rows], logvar_all[rows]
            z = mu + sd * eps[rows]
            exact = tc_with_log_weights(z, mu_all, logvar_all, torch.full((b, n), -math.log(n), dtype=D64))
            torch.testing.assert_close(exact, torch.zeros(b, dtype=D64), rtol=0, atol=1e-10)
            for est in obj.TC_ESTIMATORS:
                errors[sd][est] += float((obj.tc_decomposition(z, mu, logvar, n, estimator=est).total_correlation
                                          - exact).mean()) / reps
            # the exact MI: log q(z|x) - log mean_n q(z|x_n)
            log_q = Normal(mu_all, sd).log_prob(z[:, None]).sum(-1)  # [B, N]
            mi = Normal(mu, sd).log_prob(z).sum(-1) - torch.logsumexp(log_q, 1) + math.log(n)
            errors[sd]["mi"] += float(mi.mean()) / reps
    overlap, apart = errors[1.0], errors[0.01]
    assert overlap["mi"] < 2 and abs(apart["mi"] - math.log(n)) < 0.01, errors
    assert abs(overlap["mws"] - (d - 1) * math.log(n)) < 0.1, errors
    assert abs(apart["mws"] - (d * math.log(n) - math.log(b))) < 0.5, errors
    assert apart["mws"] - overlap["mws"] > math.log(n / b) - 0.5, errors  # the MI penalty, per unit of beta
    assert abs(overlap["stratified"]) < 0.1 and abs(apart["stratified"]) < 0.5, errors


def test_stratified_is_the_default_estimator():
    z, mu, logvar = tc_inputs(b=5, d=3)
    chosen = obj.tc_decomposition(z, mu, logvar, 100, estimator="stratified")
    for got, want in zip(obj.tc_decomposition(z, mu, logvar, 100), chosen):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(obj.beta_tcvae_kl(z, mu, logvar, 100),
                               obj.beta_tcvae_kl(z, mu, logvar, 100, estimator="stratified"))
    assert obj.ObjectiveConfig().tc_estimator == obj.ObjectiveConfig(name="beta_tcvae").tc_estimator == "stratified"


def test_a_run_saved_with_the_old_default_mws_loads_resumes_and_serves_as_a_config_file(tmp_path):
    """Earlier versions wrote tc_estimator "mws" (their default) into every run's config.
    Under another objective than beta_tcvae it is read as the new off value, in a saved
    run (which resumes) and in a config.json given to --config; a beta_tcvae run keeps
    the estimator it trained with."""
    from vaekit.config import RunConfig
    from vaekit.flags import build_config
    from vaekit.io import load_checkpoint, read_json, save_checkpoint
    from vaekit.runs import saved_config
    from vaekit.train import fit

    assert obj.without_inert({"name": "elbo", "tc_estimator": "mws"}) == {"name": "elbo", "tc_estimator": "stratified"}
    assert obj.without_inert({"tc_estimator": "mws"}, keep={"tc_estimator"}) == {"tc_estimator": "stratified"}
    assert obj.without_inert({"name": "beta_tcvae", "tc_estimator": "mws"})["tc_estimator"] == "mws"
    assert saved_config({"objective": {"name": "beta_tcvae", "tc_estimator": "mws"}}).objective.tc_estimator == "mws"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((50, 4, 4), dtype=np.float32))
    config = RunConfig.from_dict({"data": {"dataset": "array", "data_dir": str(tmp_path / "x.npy"), "binarize": "none"},
                                  "model": {"hidden": [8], "latent_dim": 2, "likelihood": "gaussian"},
                                  "train": {"epochs": 1, "batch_size": 16, "progress": False, "num_threads": 1}})
    rd = tmp_path / "run"
    fit(config, rd)
    old = lambda cfg: {**cfg, "objective": {**cfg["objective"], "tc_estimator": "mws"}}  # noqa: E731
    (rd / "config.json").write_text(json.dumps(old(read_json(rd / "config.json"))))
    state = load_checkpoint(rd / "checkpoint.pt")
    state["config"] = old(state["config"])
    save_checkpoint(rd / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "format_version")})
    result = fit(config, rd, resume=True, epochs=2)
    assert result.trained and load_checkpoint(rd / "checkpoint.pt")["epoch"] == 2
    (tmp_path / "old.json").write_text(json.dumps(old(read_json(rd / "config.json"))))
    again = build_config(config_file=str(tmp_path / "old.json"))
    assert again.objective.name == "elbo" and again.objective.tc_estimator == "stratified"


def test_tc_gradcheck_and_errors():
    z, mu, logvar = (t.requires_grad_() for t in tc_inputs(b=4, d=2))
    for est in obj.TC_ESTIMATORS:
        assert torch.autograd.gradcheck(
            lambda a, b, c: torch.stack(obj.tc_decomposition(a, b, c, 50, estimator=est)), (z, mu, logvar))
    with pytest.raises(ValueError, match="estimator"):
        obj.tc_decomposition(z, mu, logvar, 50, estimator="mss")
    with pytest.raises(ValueError, match="dataset_size"):
        obj.tc_decomposition(z, mu, logvar, 0)
    with pytest.raises(ValueError, match="logvar"):
        obj.tc_decomposition(z, mu, logvar[:, :1], 50)


@pytest.mark.parametrize("logvar", [-95.0, -85.0])
def test_tc_terms_of_point_like_posteriors_at_their_means_by_hand(logvar):
    """z = mu under posteriors far narrower than their distances: (z - mu)^2 * e^-logvar was
    0 * inf (NaN) past logvar = -88.7 in float32. Each sample's own posterior is then the
    whole of each sum, so with w = 1 / (B N) (MWS): MI = log(B N), TC = (d - 1) log(B N),
    DWKL = sum_j (z_j^2 - logvar_j) / 2 - d log(B N); and the gradients of the telescoped
    sum, log q(z|x) - log p(z): z in z, 0 in mu, -1/2 in logvar."""
    n, d = 10, 2
    mu = torch.tensor([[0.5, 1.0], [2.0, -1.0]], requires_grad=True)
    z = mu.detach().clone().requires_grad_()
    lv = torch.full((2, d), logvar, requires_grad=True)
    terms = obj.tc_decomposition(z, mu, lv, n, estimator="mws")
    log_bn = math.log(2 * n)
    dwkl = -d * log_bn - 0.5 * d * logvar + 0.5 * z.detach().square().sum(-1)
    torch.testing.assert_close(terms.mutual_info, torch.full((2,), log_bn))
    torch.testing.assert_close(terms.total_correlation, torch.full((2,), (d - 1) * log_bn))
    torch.testing.assert_close(terms.dimwise_kl, dwkl)
    g_z, g_mu, g_lv = torch.autograd.grad(sum(t.sum() for t in terms), (z, mu, lv))
    torch.testing.assert_close(g_z, z.detach())
    torch.testing.assert_close(g_mu, torch.zeros(2, d))
    torch.testing.assert_close(g_lv, torch.full((2, d), -0.5))


def test_the_likelihoods_stay_importable_from_objectives():
    from vaekit import likelihoods

    assert obj.discretized_logistic_nll is likelihoods.discretized_logistic_nll
    assert obj.optimal_sigma_nll is likelihoods.optimal_sigma_nll
    assert all(hasattr(obj, name) for name in obj.__all__)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "vae"}, "name"),
    ({"beta": -1.0}, "beta"),
    ({"beta_schedule": "exp"}, "beta_schedule"),
    ({"beta_schedule": "linear", "warmup_steps": 0}, "warmup_steps"),
    ({"beta_schedule": "cyclical", "cycle_steps": 0}, "cycle_steps"),
    ({"beta_schedule": "cyclical", "cycle_steps": 10, "cycle_ratio": 1.5}, "cycle_ratio"),
    ({"free_bits": -0.1}, "free_bits"),
    ({"capacity_gamma": 0.0}, "capacity_gamma"),
    ({"iw_samples": 0}, "iw_samples"),
    ({"iw_samples": 5}, "iw_samples"),
    ({"name": "iwae", "iw_samples": 5, "free_bits": 0.5}, "free_bits"),
    ({"name": "iwae", "iw_samples": 5, "beta": 4.0}, "beta"),
    ({"capacity_max": 25.0, "free_bits": 0.5}, "free_bits"),
    ({"tc_alpha": 2.0}, "tc_alpha"),
    ({"tc_estimator": "mws"}, "tc_estimator"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        obj.ObjectiveConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    # a forgotten beta_schedule="linear": the warm-up the user asked for would never happen
    ({"beta": 4.0, "warmup_steps": 10_000},
     "warmup_steps=10000 has no effect with beta_schedule='constant'; use beta_schedule='linear'"),
    ({"beta_schedule": "cyclical", "cycle_steps": 10, "warmup_steps": 5},
     "warmup_steps=5 has no effect with beta_schedule='cyclical'; use beta_schedule='linear'"),
    ({"beta_schedule": "linear", "warmup_steps": 10, "cycle_steps": 5},
     "cycle_steps=5 has no effect with beta_schedule='linear'; use beta_schedule='cyclical'"),
    ({"beta_schedule": "linear", "warmup_steps": 10, "cycle_ratio": 0.2},
     "cycle_ratio=0.2 has no effect with beta_schedule='linear'; use beta_schedule='cyclical'"),
    ({"cycle_steps": 5}, "cycle_steps=5 has no effect with beta_schedule='constant'; use beta_schedule='cyclical'"),
    ({"capacity_steps": 500}, "capacity_steps=500 has no effect with capacity_max=0.0; use capacity_max > 0"),
    ({"capacity_gamma": 5.0}, "capacity_gamma=5.0 has no effect with capacity_max=0.0; use capacity_max > 0"),
    ({"tc_estimator": "mws"}, "tc_estimator='mws' applies only to name='beta_tcvae', got name='elbo'"),
    ({"name": "iwae", "iw_samples": 5, "tc_estimator": "mws"},
     "tc_estimator='mws' applies only to name='beta_tcvae', got name='iwae'"),
])
def test_config_rejects_a_setting_that_has_no_effect(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(f"ObjectiveConfig.{message}")):
        obj.ObjectiveConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"beta_schedule": "linear", "warmup_steps": 10},
    {"beta_schedule": "cyclical", "cycle_steps": 10, "cycle_ratio": 0.2},
    {"capacity_max": 5.0, "capacity_steps": 500, "capacity_gamma": 5.0},
    {"capacity_max": 5.0},  # capacity_steps = 0: the full capacity from step 0
    {"name": "beta_tcvae", "tc_estimator": "stratified", "beta_schedule": "linear", "warmup_steps": 3},
    {"name": "beta_tcvae", "tc_estimator": "mws"},
    {"name": "iwae", "iw_samples": 5},
])
def test_config_accepts_the_same_settings_where_they_act(kwargs):
    config = obj.ObjectiveConfig(**kwargs)
    assert all(getattr(config, k) == v for k, v in kwargs.items())


def run(model, x, config, step, seed=7, **kw):
    torch.manual_seed(seed)
    return obj.objective_loss(model, x, config, step, **kw)


def reference_forward(model, x, seed=7):
    torch.manual_seed(seed)
    out = model(x)
    return out, model.nll(out.decoder_out, x), gaussian_kl(out.mu, out.logvar)


@pytest.mark.parametrize("config, step, beta", [
    (obj.ObjectiveConfig(beta=4.0), 3, 4.0),
    (obj.ObjectiveConfig(beta=2.0, beta_schedule="linear", warmup_steps=10), 4, 0.8),
    (obj.ObjectiveConfig(beta=2.0, beta_schedule="cyclical", cycle_steps=10, cycle_ratio=0.5), 13, 1.2),
    (obj.ObjectiveConfig(beta=3.0, free_bits=0.05), 0, 3.0),
    (obj.ObjectiveConfig(capacity_max=5.0, capacity_steps=10, capacity_gamma=100.0), 6, 100.0),
    (obj.ObjectiveConfig(name="beta_tcvae", beta=6.0, tc_alpha=0.5), 0, 6.0),
])
def test_objective_loss_matches_its_parts(config, step, beta):
    torch.manual_seed(0)
    model, x = TinyVAE(), binary_batch(6)
    res = run(model, x, config, step, dataset_size=500)
    assert model.calls == 1
    out, nll, kl = reference_forward(model, x)
    if config.capacity_max:
        penalty = 100.0 * (kl - 5.0 * 6 / 10).abs()
    elif config.free_bits:
        kl_j = per_dim_kl(out.mu, out.logvar).mean(0).detach()
        assert float(kl_j.min()) < config.free_bits < float(kl_j.max())  # both regimes present
        penalty = beta * torch.clamp(kl_j, min=config.free_bits).sum().expand(6)
    elif config.name == "beta_tcvae":
        mi, tc, dw = obj.tc_decomposition(out.z, out.mu, out.logvar, 500)
        penalty = 0.5 * mi + 6.0 * tc + dw
    else:
        penalty = beta * kl
    assert res.beta == pytest.approx(beta)
    torch.testing.assert_close(res.loss, (nll + penalty).mean())
    torch.testing.assert_close(res.reconstruction, nll.mean())
    torch.testing.assert_close(res.kl, kl.mean())


def test_objective_loss_iwae():
    torch.manual_seed(0)
    model, x = TinyVAE(likelihood="gaussian"), torch.rand(3, 1, 2, 3, dtype=D64)
    res = run(model, x, obj.ObjectiveConfig(name="iwae", iw_samples=5), 0)
    torch.manual_seed(7)
    torch.testing.assert_close(res.loss, obj.iwae_loss(model, x, 5).mean())
    mu, logvar = model.encode_params(x)
    torch.testing.assert_close(res.kl, gaussian_kl(mu, logvar).mean())
    assert res.beta == 1.0
    res.loss.backward()
    with pytest.raises(ValueError, match="dataset_size"):
        obj.objective_loss(model, x, obj.ObjectiveConfig(name="beta_tcvae"), 0)
    with pytest.raises(TypeError, match="config"):
        obj.objective_loss(model, x, {"name": "elbo"}, 0)


@pytest.mark.parametrize("name", ["elbo", "iwae"])
def test_noise_drawn_under_bf16_autocast_is_float32_like_the_loops(name):
    """Under bfloat16 autocast mu comes out in bfloat16. Noise objective_loss (or the model)
    draws itself is float32 all the same, the noise the training loop passes in: the two
    give the same loss from the same generator state (bfloat16 noise would be other numbers)."""
    from vaekit.models import VAE, ModelConfig

    model = VAE(ModelConfig(input_shape=(6,), latent_dim=3, hidden=(8,)))
    x = torch.rand(4, 6).round()
    config = obj.ObjectiveConfig(name=name, **({"iw_samples": 4} if name == "iwae" else {}))
    drawn = []

    def loops_noise(shape):
        drawn.append(torch.randn(shape))
        return drawn[-1]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encode_params(x)[0].dtype == torch.bfloat16
        torch.manual_seed(3)
        own = obj.objective_loss(model, x, config, 0)
        torch.manual_seed(3)
        given = obj.objective_loss(model, x, config, 0, noise=loops_noise)
    assert drawn[0].dtype == torch.float32
    assert torch.equal(own.loss, given.loss) and torch.equal(own.reconstruction, given.reconstruction)


def test_docstring_examples_run():
    result = doctest.testmod(obj, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0


def test_a_field_set_after_the_fact_is_checked_as_the_constructor_checks_it():
    """config.beta = -5.0 trained with a negative KL weight, name = 'foo' as the ELBO: each
    field is checked when set (alone: two fields can still be changed one after the other)."""
    config = obj.ObjectiveConfig()
    for field, value, error, match in [
        ("beta", -5.0, ValueError, "ObjectiveConfig.beta must be a finite number >= 0, got -5.0"),
        ("name", "foo", ValueError, "ObjectiveConfig.name must be one of elbo, iwae, beta_tcvae, got 'foo'"),
        ("iw_samples", 10**7, ValueError, r"ObjectiveConfig.iw_samples must be an int in \[1, 1000000\]"),
        ("cycle_ratio", 0.0, ValueError, "ObjectiveConfig.cycle_ratio must be a finite number > 0"),
        ("warmup_steps", 1.5, TypeError, "ObjectiveConfig.warmup_steps must be an int, got float"),
        ("tc_estimator", "mss", ValueError, "ObjectiveConfig.tc_estimator must be one of mws, stratified"),
    ]:
        before = getattr(config, field)
        with pytest.raises(error, match=match):
            setattr(config, field, value)
        assert getattr(config, field) == before
    config.beta_schedule, config.warmup_steps, config.beta = "linear", 10, 2.0
    assert config.beta_at(5) == 1.0
    import copy
    import dataclasses
    import pickle

    for same in (copy.deepcopy(config), pickle.loads(pickle.dumps(config)), dataclasses.replace(config)):
        assert same == config


def test_a_schedule_left_without_what_it_needs_by_an_assignment_is_named_at_beta_at():
    """Fields set one by one are checked alone; the schedule's needs of the others (a
    cycle for "cyclical", a warm-up for "linear") are checked when beta_at next runs,
    where the unchecked schedule divided by zero."""
    config = obj.ObjectiveConfig(beta_schedule="cyclical", cycle_steps=10)
    config.cycle_steps = 0
    with pytest.raises(ValueError, match=r"^ObjectiveConfig\.cycle_steps must be >= 1 with the 'cyclical' beta "):
        config.beta_at(3)
    config.cycle_steps = 4  # mended: the next call is checked again, and passes
    assert config.beta_at(1) == obj.beta_schedule("cyclical", 1, beta=1.0, cycle_steps=4)
    config.beta_schedule = "linear"  # its warm-up is still 0
    with pytest.raises(ValueError, match=r"warmup_steps must be >= 1 with the 'linear' beta schedule, got 0"):
        config.beta_at(3)
    config.warmup_steps = 8
    assert config.beta_at(2) == 0.25


@pytest.mark.parametrize("name", ["elbo", "iwae"])
def test_objective_loss_refuses_an_empty_batch_and_bad_noise(name):
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model, x = VAE(ModelConfig(input_shape=(1, 2, 3), latent_dim=2, hidden=(8,))), binary_batch(3).float()
    config = obj.ObjectiveConfig(name=name, **({"iw_samples": 2} if name == "iwae" else {}))
    asked = (2, 3, 2) if name == "iwae" else (3, 2)
    empty = re.escape("x must be a batch [B, *event] with B >= 1, got shape (0, 1, 2, 3)")
    with pytest.raises(ValueError, match=empty):
        obj.objective_loss(model, x[:0], config, 0)  # the mean of no losses: NaN
    with pytest.raises(TypeError, match="noise must be a callable noise.*got Tensor"):
        obj.objective_loss(model, x, config, 0, noise=torch.randn(asked))
    for wrong in ((7, 7), (*asked[:-2], 1, 2)):  # [1, d] broadcast to every example
        with pytest.raises(ValueError, match=re.escape(f"noise(shape) must return a tensor of the shape asked for, "
                                                       f"{asked}, got {wrong}")):
            obj.objective_loss(model, x, config, 0, noise=lambda shape: torch.randn(wrong))


def test_kl_penalties_and_the_tc_decomposition_check_their_shapes():
    with pytest.raises(ValueError, match=re.escape("kl must be [B] (one KL per example), got shape (4, 3)")):
        obj.capacity_kl_penalty(torch.rand(4, 3), 0, gamma=1.0, capacity_max=1.0, capacity_steps=10)
    with pytest.raises(ValueError, match=re.escape("mu has shape (4, 3) but logvar has shape (4, 2)")):
        obj.free_bits_kl(torch.zeros(4, 3), torch.zeros(4, 2), 0.1)
    z, mu, logvar = tc_inputs(b=4, d=3)
    with pytest.raises(ValueError, match="dataset_size must be >= the batch size B = 4, got 2"):
        obj.tc_decomposition(z, mu, logvar, 2)
    with pytest.raises(ValueError, match=re.escape("z must hold at least 1 example [B, d], got shape (0, 3)")):
        obj.tc_decomposition(z[:0], mu[:0], logvar[:0], 2)
    assert obj.tc_decomposition(z, mu, logvar, 4).mutual_info.shape == (4,)  # the whole data set: fine


# ---------------------------------------------------------------------------------------
# Values and gradients through objective_loss, against the TinyVAE's terms written out here


def by_hand(model, x, eps):
    """The Bernoulli TinyVAE's terms at ``z = mu + sigma * eps`` (``eps`` ``[B, d]`` or
    ``[k, B, d]``), written out: -log p(x|z), the KL to N(0, I) per dimension ``[B, d]``,
    z, mu, logvar."""
    d = model.config.latent_dim
    h = x.flatten(1) @ model.enc.weight.T + model.enc.bias
    mu, logvar = h[:, :d], h[:, d:]
    z = mu + torch.exp(0.5 * logvar) * eps
    logits = z @ model.dec.weight.T + model.dec.bias
    nll = (torch.logaddexp(torch.zeros_like(logits), logits) - x.flatten(1) * logits).sum(-1)
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar)
    return nll, kl, z, mu, logvar


def grad_of(loss, model):
    """d loss / d (encoder and decoder weights), flat (zeros where loss does not use them)."""
    params = (model.enc.weight, model.enc.bias, model.dec.weight, model.dec.bias)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def with_noise(model, x, config, step, eps, **kw):
    return obj.objective_loss(model, x, config, step, noise=lambda shape: eps, **kw)


HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("estimator", [None, "mws"])  # None: the default, stratified
@pytest.mark.parametrize("alpha, beta, gamma, schedule, step, beta_t", [
    (0.3, 5.0, 2.0, {}, 0, 5.0),
    (2.0, 0.5, 3.0, {}, 0, 0.5),
    (0.5, 6.0, 3.0, dict(beta_schedule="linear", warmup_steps=10), 5, 3.0),  # beta_t weighs the TC alone
])
def test_beta_tcvae_value_and_gradient_by_hand(alpha, beta, gamma, schedule, step, beta_t, estimator):
    """nll + alpha MI + beta_t TC + gamma DWKL, the stratified and the MWS estimates written
    out (Chen et al., 2018), with the three weights apart: a swap of alpha and gamma fails here."""
    torch.manual_seed(0)
    (b, d, n), model, x = (6, 3, 1000), TinyVAE(latent_dim=3), binary_batch(6)
    eps = torch.randn(b, d, dtype=D64)
    chosen = {} if estimator is None else {"tc_estimator": estimator}
    config = obj.ObjectiveConfig(name="beta_tcvae", beta=beta, tc_alpha=alpha, tc_gamma=gamma, **schedule,
                                 **chosen)
    res = with_noise(model, x, config, step, eps, dataset_size=n)
    nll, _, z, mu, logvar = by_hand(model, x, eps)
    if estimator == "mws":
        log_w = torch.full((b, b), -math.log(b * n), dtype=D64)
    else:  # the own item weighs 1/N, each other (N-1) / (N (B-1))
        log_w = torch.full((b, b), math.log((n - 1) / (n * (b - 1))), dtype=D64).fill_diagonal_(-math.log(n))
    log_q = -HALF_LOG_2PI - 0.5 * (logvar + (z[:, None] - mu[None]).square() / logvar.exp())  # [i, j, d]
    log_qz_x = (-HALF_LOG_2PI - 0.5 * (logvar + eps.square())).sum(-1)
    log_qz = torch.logsumexp(log_w + log_q.sum(-1), 1)
    log_prod = torch.logsumexp(log_w[..., None] + log_q, 1).sum(-1)
    log_pz = (-HALF_LOG_2PI - 0.5 * z.square()).sum(-1)
    want = (nll + alpha * (log_qz_x - log_qz) + beta_t * (log_qz - log_prod) + gamma * (log_prod - log_pz)).mean()
    assert res.beta == beta_t
    torch.testing.assert_close(res.loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_of(res.loss, model), grad_of(want, model), rtol=1e-10, atol=1e-12)


def test_iwae_gradient_is_the_self_normalised_average_of_grad_log_w():
    """Burda et al. (2015), eq. 7-8: grad L_k = sum_i w~_i grad log w_i, w~_i = w_i / sum_j w_j,
    each log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) written out (k = 5, fixed noise)."""
    torch.manual_seed(1)
    (k, b), model, x = (5, 3), TinyVAE(), binary_batch(3)
    eps = torch.randn(k, b, 2, dtype=D64)
    res = with_noise(model, x, obj.ObjectiveConfig(name="iwae", iw_samples=k), 0, eps)
    nll, _, z, mu, logvar = by_hand(model, x, eps)
    log_pz = (-HALF_LOG_2PI - 0.5 * z.square()).sum(-1)
    log_qz_x = (-HALF_LOG_2PI - 0.5 * (logvar + (z - mu).square() / logvar.exp())).sum(-1)
    log_w = -nll + log_pz - log_qz_x  # [k, B]
    torch.testing.assert_close(res.loss, -(torch.logsumexp(log_w, 0) - math.log(k)).mean(), rtol=1e-12, atol=0)
    w_tilde = torch.softmax(log_w.detach(), 0)
    grads = [[grad_of(log_w[i, j], model) for j in range(b)] for i in range(k)]
    want = -sum(w_tilde[i, j] * grads[i][j] for i in range(k) for j in range(b)) / b
    got = grad_of(res.loss, model)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the weights matter: the plain average over the k samples (the ELBO's gradient) is another
    plain = -sum(grads[i][j] for i in range(k) for j in range(b)) / (k * b)
    assert float((plain - want).abs().max()) > 0.01 * float(want.abs().max())


@pytest.mark.parametrize("schedule, steps", [
    (dict(beta_schedule="linear", warmup_steps=8), (0, 1, 7, 8, 100)),
    (dict(beta_schedule="cyclical", cycle_steps=10, cycle_ratio=0.4), (0, 3, 4, 9, 10, 13, 24)),
])
def test_a_schedule_as_the_gradient_sees_it(schedule, steps):
    """grad loss = grad nll + beta_t grad KL, beta_t written out here (Fu et al., 2019 for the
    cycles), at the warm-up's start and end and a cycle's edges (start, top, last step, next start)."""
    torch.manual_seed(2)
    model, x = TinyVAE(), binary_batch(5)
    eps = torch.randn(5, 2, dtype=D64)
    nll, kl, *_ = by_hand(model, x, eps)
    kl = kl.sum(-1)
    g_nll, g_kl = grad_of(nll.mean(), model), grad_of(kl.mean(), model)
    config = obj.ObjectiveConfig(beta=3.0, **schedule)
    for step in steps:
        if schedule["beta_schedule"] == "linear":
            beta_t = 3.0 * min(1.0, step / 8)
        else:
            beta_t = 3.0 * min(1.0, (step % 10) / 10 / 0.4)
        res = with_noise(model, x, config, step, eps)
        assert res.beta == pytest.approx(beta_t, rel=1e-12, abs=0), step
        torch.testing.assert_close(res.loss, (nll + beta_t * kl).mean(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_of(res.loss, model), g_nll + beta_t * g_kl, rtol=1e-10, atol=1e-12)


def test_free_bits_under_a_schedule_and_a_dimension_at_the_threshold_by_hand():
    """beta_t * sum_j max(lambda, kl_j), kl_j the batch-mean KL of dimension j; a dimension
    exactly at lambda gets no KL gradient (free_bits_kl's docstring: the threshold counts as below)."""
    torch.manual_seed(3)
    model, x = TinyVAE(latent_dim=3), binary_batch(4)
    eps = torch.randn(4, 3, dtype=D64)
    with torch.no_grad():  # dimension 0: mu = 1, logvar = 0 for every example, a KL of 0.5 nats exactly
        model.enc.weight[[0, 3]] = 0.0
        model.enc.bias[[0, 3]] = torch.tensor([1.0, 0.0], dtype=D64)
        model.enc.bias[1] += 2.0  # dimension 1 well above the threshold
    nll, kl, *_ = by_hand(model, x, eps)
    kl_j = kl.mean(0)
    assert kl_j[0].item() == 0.5 and kl_j[1].item() > 0.5 > kl_j[2].item()  # at, above, below
    assert float(grad_of(kl_j[0], model).abs().max()) > 0.5  # what the threshold takes away
    g_nll, g_kl1 = grad_of(nll.mean(), model), grad_of(kl_j[1], model)
    config = obj.ObjectiveConfig(beta=2.0, beta_schedule="linear", warmup_steps=4, free_bits=0.5)
    for step, beta_t in ((0, 0.0), (1, 0.5), (4, 2.0)):
        res = with_noise(model, x, config, step, eps)
        assert res.beta == beta_t
        torch.testing.assert_close(res.loss, nll.mean() + beta_t * (0.5 + kl_j[1] + 0.5), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_of(res.loss, model), g_nll + beta_t * g_kl1, rtol=1e-10, atol=1e-12)


def test_capacity_with_kls_on_both_sides_of_c_is_per_example_by_hand():
    """mean(nll + gamma |KL_i - C|), each example's KL (as ObjectiveConfig documents), with
    half the batch below C and half above, where |mean KL - C| would give another gradient."""
    torch.manual_seed(4)
    model, x = TinyVAE(), binary_batch(6)
    eps = torch.randn(6, 2, dtype=D64)
    nll, kl, *_ = by_hand(model, x, eps)
    kl = kl.sum(-1)
    s = kl.detach().sort().values
    c = float(s[2] + s[3]) / 2
    config = obj.ObjectiveConfig(capacity_max=2 * c, capacity_steps=10, capacity_gamma=7.0)
    res = with_noise(model, x, config, 5, eps)  # halfway up: C = capacity_max / 2
    want = (nll + 7.0 * (kl - c).abs()).mean()
    assert res.beta == 7.0
    torch.testing.assert_close(res.loss, want, rtol=1e-12, atol=0)
    got = grad_of(res.loss, model)
    torch.testing.assert_close(got, grad_of(want, model), rtol=1e-10, atol=1e-12)
    batch_form = nll.mean() + 7.0 * (kl.mean() - c).abs()
    assert float((got - grad_of(batch_form, model)).abs().max()) > 0.1 * float(got.abs().max())
