"""Tests for vaekit.evaluate against a linear-Gaussian VAE whose log p(x) is exact.

Model: z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D), so x ~ N(b, W W^T + sigma^2 I).
W has orthogonal columns, which makes the exact posterior diagonal:
q*(z|x) = N(A x + c, S) with S = (I + W^T W / sigma^2)^-1, A = S W^T / sigma^2, c = -A b.
An encoder equal to q* has log w = log p(x) for every z; a perturbed one has a positive gap.
Everything is float64. test_latents.py checks the encoder-only diagnostics on the same model.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

import vaekit.evaluate as ev
import vaekit.iw
import vaekit.latents
from vaekit.losses import gaussian_nll

DTYPE = torch.float64
D, d = 5, 3
SIGMA2 = 0.3


class LinearGaussianVAE(nn.Module):
    """Decoder x = W z + b + N(0, sigma^2 I); encoder N(A x + c, diag(exp(enc_logvar)))."""

    def __init__(self, W, b, sigma2, A, c, enc_logvar):
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.register_buffer("b", b.clone())
        self.register_buffer("A", A.clone())
        self.register_buffer("c", c.clone())
        self.register_buffer("enc_logvar", enc_logvar.clone())
        self.head = nn.Identity()  # a submodule, to check that its own mode is restored
        self.log_sigma2 = math.log(sigma2)
        self.config = SimpleNamespace(
            input_shape=(W.shape[0],), latent_dim=W.shape[1], likelihood="gaussian"
        )
        self.seen = []  # (training, grad enabled) at each encoder call

    def encode_params(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        mu = x @ self.A.T + self.c
        return mu, self.enc_logvar.expand_as(mu)

    def encode(self, x):
        mu, logvar = self.encode_params(x)
        return torch.distributions.Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)

    def decode(self, z):
        return z @ self.W.T + self.b

    def nll(self, decoder_out, x):
        return gaussian_nll(decoder_out, x, self.log_sigma2)


def make_problem(n=32, seed=0, perturb=0.0, ignore=()):
    """Returns (exact-or-perturbed model, data x, exact log p(x) [n])."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=DTYPE))
    scales = torch.tensor([2.0, 1.0, 0.5], dtype=DTYPE)
    W = q * scales
    b = torch.randn(D, generator=g, dtype=DTYPE)
    post_var = 1.0 / (1.0 + scales.square() / SIGMA2)
    A = post_var[:, None] * W.T / SIGMA2
    c = -A @ b
    logvar = post_var.log()
    if perturb:
        A = A + perturb * torch.randn(d, D, generator=g, dtype=DTYPE)
        c = c + perturb * torch.randn(d, generator=g, dtype=DTYPE)
        logvar = logvar + 2 * perturb
    for j in ignore:
        A[j] = 0.0
    model = LinearGaussianVAE(W, b, SIGMA2, A, c, logvar)
    z = torch.randn(n, d, generator=g, dtype=DTYPE)
    x = z @ W.T + b + math.sqrt(SIGMA2) * torch.randn(n, D, generator=g, dtype=DTYPE)
    marginal = MultivariateNormal(b, W @ W.T + SIGMA2 * torch.eye(D, dtype=DTYPE))
    return model, x, marginal.log_prob(x)


def closed_form_elbo(model, x):
    """E_q[log p(x|z)] - KL in closed form for the linear-Gaussian model."""
    with torch.no_grad():
        mu, logvar = model.encode_params(x)
        W, var = model.W, logvar.exp()
        resid = (x - model.b - mu @ W.T).square().sum(-1) + (var * W.square().sum(0)).sum(-1)
        expected_ll = -0.5 * D * (math.log(2 * math.pi) + model.log_sigma2) - 0.5 * resid / SIGMA2
        kl = kl_divergence(Normal(mu, var.sqrt()), Normal(0.0, 1.0)).sum(-1)
    return expected_ll - kl


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_log_weights(model, x, eps):
    """log p(x|z) + log p(z) - log q(z|x) through torch.distributions: [k, B]."""
    with torch.no_grad():
        q = model.encode(x)
        z = q.mean + q.stddev * eps
        log_px_z = Normal(z @ model.W.T + model.b, math.sqrt(SIGMA2)).log_prob(x).sum(-1)
        return log_px_z + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z)


def test_closed_form_helpers_agree():
    exact, x, log_px = make_problem()
    torch.testing.assert_close(closed_form_elbo(exact, x), log_px, rtol=0, atol=1e-10)


def test_elbo_matches_closed_form_and_lies_below_log_px():
    model, x, log_px = make_problem(perturb=0.15)
    terms = ev.elbo_terms(model, x, n_samples=20000, generator=gen(1), batch_size=10)
    assert set(terms) == {"elbo", "reconstruction", "kl"} and terms["elbo"].shape == (32,)
    # Monte Carlo standard error of the reconstruction term is about 0.015 nats here.
    torch.testing.assert_close(terms["elbo"], closed_form_elbo(model, x), rtol=0, atol=0.08)
    mu, logvar = model.encode_params(x)
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(terms["kl"], kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(terms["elbo"], -(terms["reconstruction"] + terms["kl"]))
    gap = log_px - terms["elbo"]
    assert bool((gap > 0).all()) and float(gap.mean()) > 1.0, gap


def test_exact_posterior_makes_the_estimate_exact_for_any_k():
    model, x, log_px = make_problem()
    for k in (1, 5, 100):
        est = ev.iw_log_likelihood(model, x, k, generator=gen(k))
        torch.testing.assert_close(est, log_px, rtol=0, atol=1e-9)


def test_iw_estimate_rises_with_k_and_converges():
    model, x, log_px = make_problem(perturb=0.15, n=256)
    estimates = [ev.iw_log_likelihood(model, x, k, generator=gen(2)) for k in (1, 10, 100, 1000)]
    means = [float(e.mean()) for e in estimates]
    assert means == sorted(means) and means[0] < means[-1] - 1.0, means
    # k = 1 is an unbiased estimate of the ELBO: within 4 standard errors of the exact one.
    deviation = estimates[0] - closed_form_elbo(model, x)
    assert abs(float(deviation.mean())) < 4 * float(deviation.std()) / math.sqrt(256)
    assert means[-1] < float(log_px.mean()) + 0.02
    big = ev.iw_log_likelihood(model, x[:64], 5000, generator=gen(3), chunk_size=700).mean()
    assert abs(float(big) - float(log_px[:64].mean())) < 0.02


def test_iw_equals_independent_computation_with_the_same_noise():
    model, x, _ = make_problem(perturb=0.3, n=8)
    k = 10  # below the noise block: the whole noise is one randn(k, B, d) call
    lw = reference_log_weights(model, x, torch.randn(k, 8, d, generator=gen(4), dtype=DTYPE))
    est = ev.iw_log_likelihood(model, x, k, generator=gen(4))
    torch.testing.assert_close(est, lw.logsumexp(0) - math.log(k), rtol=0, atol=1e-10)


def test_iw_with_one_sample_is_the_elbo_with_the_same_noise():
    model, x, _ = make_problem(perturb=0.3, n=8)
    iw1 = ev.iw_log_likelihood(model, x, 1, generator=gen(5))
    terms = ev.elbo_terms(model, x, n_samples=1, generator=gen(5))
    # Same draw: iw(k=1) = -reconstruction - (log q(z|x) - log p(z)), a Monte Carlo KL.
    eps = torch.randn(1, 8, d, generator=gen(5), dtype=DTYPE)
    q = model.encode(x)
    z = q.mean + q.stddev * eps[0]
    mc_kl = q.log_prob(z) - Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(iw1, -terms["reconstruction"] - mc_kl, rtol=0, atol=1e-10)
    torch.testing.assert_close(iw1, reference_log_weights(model, x, eps)[0], rtol=0, atol=1e-10)


def test_chunk_size_does_not_change_the_estimate(monkeypatch):
    model, x, _ = make_problem(perturb=0.3, n=6)
    k = 150  # crosses the noise-block boundary
    calls = []
    decode = model.decode

    def counting_decode(z):
        calls.append(z.shape[0])
        return decode(z)

    monkeypatch.setattr(model, "decode", counting_decode)
    results = {}
    for chunk in (1, 7, k):
        calls.clear()
        results[chunk] = ev.iw_log_likelihood(model, x, k, chunk_size=chunk, generator=gen(6))
        assert len(calls) == math.ceil(k / chunk) and max(calls) == min(chunk, k) * 6
    # The automatic size follows the memory budget: 10 samples of 6 x 5 float64 values.
    monkeypatch.setattr(vaekit.iw, "MEMORY_BUDGET_BYTES", 10 * 6 * D * 8)
    monkeypatch.setattr(vaekit.iw, "CPU_BUDGET_BYTES", 10 * 6 * D * 8)
    calls.clear()
    results[None] = ev.iw_log_likelihood(model, x, k, generator=gen(6))
    assert len(calls) == 15 and max(calls) == 60
    for est in results.values():
        torch.testing.assert_close(est, results[k], rtol=0, atol=1e-12)
    batched = ev.iw_log_likelihood(model, x, k, chunk_size=7, batch_size=4, generator=gen(6))
    assert batched.shape == (6,) and bool(torch.isfinite(batched).all())


@pytest.mark.parametrize("n_samples, batch_size", [(7, 4), (9, None), (3, 4), (13, 3), (1, None)])
def test_elbo_decodes_its_samples_in_chunks_within_the_memory_budget(n_samples, batch_size, monkeypatch):
    """Where S samples of a batch would decode to more than MEMORY_BUDGET_BYTES, they are
    decoded in chunks of as many as fit (at least one), each drawn as its own randn(c, B, d):
    the ELBO of that noise, computed here in float64 by hand, with no pass over the budget."""
    model, x, _ = make_problem(perturb=0.3, n=10)
    budget = 3 * 4 * D * 8  # 3 samples of 4 examples (12 rows of D float64 values)
    monkeypatch.setattr(ev, "MEMORY_BUDGET_BYTES", budget)
    rows = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda z: rows.append(z.shape[0]) or decode(z))
    terms = ev.elbo_terms(model, x, n_samples=n_samples, batch_size=batch_size, generator=gen(9))
    # 10 examples at once: one sample (10 rows) per pass; batches of 4 and 2: 3 and 6 samples.
    assert max(rows) <= 12 and sum(rows) == n_samples * 10
    g, expected = gen(9), []
    for start in range(0, 10, batch_size or 10):
        xb = x[start : start + (batch_size or 10)]
        q, chunk = model.encode(xb), max(1, budget // (len(xb) * D * 8))
        eps = torch.cat([torch.randn(min(chunk, n_samples - i), len(xb), d, generator=g, dtype=DTYPE)
                         for i in range(0, n_samples, chunk)])
        z = q.mean + q.stddev * eps
        expected.append(-Normal(z @ model.W.T + model.b, math.sqrt(SIGMA2)).log_prob(xb).sum(-1).mean(0))
    torch.testing.assert_close(terms["reconstruction"], torch.cat(expected), rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["elbo"], -(terms["reconstruction"] + terms["kl"]))


@pytest.mark.parametrize("n_samples, batch_size", [(1, None), (30, 16), (1000, None)])
def test_elbo_within_the_memory_budget_is_one_draw_as_before(n_samples, batch_size):
    """Below the budget (every size here) the ELBO is, bit for bit, the formula of the
    unchunked version: one randn(S, B, d) per batch, one decoder pass, a mean over S."""
    model, x, _ = make_problem(perturb=0.3, n=50)
    terms = ev.elbo_terms(model, x, n_samples=n_samples, batch_size=batch_size, generator=gen(10))
    g, expected = gen(10), []
    for start in range(0, 50, batch_size or 50):
        xb = x[start : start + (batch_size or 50)]
        mu, logvar = model.encode_params(xb)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((n_samples, *mu.shape), generator=g, dtype=DTYPE)
        nll = model.nll(model.decode(z.reshape(-1, d)), xb.repeat(n_samples, 1))
        expected.append(nll.reshape(n_samples, len(xb)).mean(0))
    assert torch.equal(terms["reconstruction"], torch.cat(expected))


def test_bits_per_dim_and_dequantisation_offset():
    assert ev.bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)
    # A density constant on [0, 1]^D is the uniform distribution over 256^D values.
    torch.testing.assert_close(
        ev.continuous_to_discrete_nll(torch.zeros(3), 4), torch.full((3,), 4 * math.log(256.0))
    )
    # A density constant on each of the 2^n bins: p(y) = 2^n P(v); the offset is exact.
    g = gen(9)
    probs = torch.rand(2, 16, generator=g, dtype=DTYPE)
    probs = probs / probs.sum(-1, keepdim=True)  # D = 2 dimensions, 4-bit values
    v = torch.randint(0, 16, (10, 2), generator=g)
    log_pmf = probs.log().gather(1, v.T).T.sum(-1)
    density_nll = -(log_pmf + 2 * math.log(16.0))
    torch.testing.assert_close(ev.continuous_to_discrete_nll(density_nll, 2, n_bits=4), -log_pmf)
    with pytest.raises(ValueError, match="num_dims"):
        ev.bits_per_dim(1.0, 0)


class BernoulliVAE(nn.Module):
    """Linear encoder and decoder on [1, 2, 3] images; checks image-shaped events."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4, dtype=DTYPE)
        self.dec = nn.Linear(2, 6, dtype=DTYPE)
        self.config = SimpleNamespace(input_shape=(1, 2, 3), latent_dim=2, likelihood="bernoulli")

    def encode_params(self, x):
        mu, logvar = self.enc(x.flatten(1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        return self.dec(z).reshape(-1, 1, 2, 3)

    def nll(self, decoder_out, x):
        return -Bernoulli(logits=decoder_out).log_prob(x).flatten(1).sum(-1)


def test_image_shaped_events_against_a_per_example_loop():
    torch.manual_seed(0)
    model = BernoulliVAE()
    x = (torch.rand(5, 1, 2, 3, dtype=DTYPE) > 0.5).to(DTYPE)
    k = 20
    est = ev.iw_log_likelihood(model, x, k, chunk_size=3, batch_size=2, generator=gen(10))
    eps_g = gen(10)
    for start in range(0, 5, 2):  # batches draw their noise in order
        xb = x[start : start + 2]
        eps = torch.randn(k, xb.shape[0], 2, generator=eps_g, dtype=DTYPE)
        with torch.no_grad():
            for i in range(xb.shape[0]):
                mu, logvar = model.encode_params(xb[i : i + 1])
                q = Normal(mu[0], (0.5 * logvar[0]).exp())
                lw = []
                for s in range(k):
                    z = q.loc + q.scale * eps[s, i]
                    lp = Bernoulli(logits=model.decode(z[None])[0]).log_prob(xb[i]).sum()
                    lw.append(lp + Normal(0.0, 1.0).log_prob(z).sum() - q.log_prob(z).sum())
                ref = torch.stack(lw).logsumexp(0) - math.log(k)
                torch.testing.assert_close(est[start + i], ref, rtol=0, atol=1e-10)
    out = ev.evaluate_model(model, x, iw_samples=k, batch_size=2)
    assert out["bits_per_dim"] == pytest.approx(out["iw_nll"] / (6 * math.log(2.0)))


def test_bits_per_dim_of_a_bernoulli_model_only_for_binary_data_and_from_the_elbo_without_samples():
    """Bernoulli cross-entropy is a code length for binary pixels only (on grey levels it is
    not a normalised likelihood: no bits per dim); with no importance samples the bound
    in bits is the ELBO's, not the reconstruction term's."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 2, 3), latent_dim=2, hidden=(4,))).to(DTYPE)
    grey = torch.rand(6, 1, 2, 3, dtype=DTYPE)
    out = ev.evaluate_model(model, grey, iw_samples=0, batch_size=4)
    assert "bits_per_dim" not in out and out["elbo"] < 0
    out = ev.evaluate_model(model, grey.round(), iw_samples=0, batch_size=4)
    assert out["bits_per_dim"] == pytest.approx(-out["elbo"] / (6 * math.log(2.0)), rel=1e-12)


def test_evaluate_model_keys_determinism_and_modes(capsys):
    model, x, log_px = make_problem(perturb=0.15, n=40)
    model.train()
    model.head.eval()
    out = ev.evaluate_model(model, x, iw_samples=500, batch_size=16, seed=3, progress=True, n_bits=8)
    expected = {"num_examples", "elbo", "reconstruction", "kl", "active_units", "mutual_information",
                "mutual_information_max", "kl_per_dim", "iw_nll", "iw_samples", "bits_per_dim", "precision"}
    assert set(out) == expected and out["precision"] == "fp32"
    assert model.training and not model.head.training
    assert all(seen == (False, False) for seen in model.seen)
    assert "evaluate" in capsys.readouterr().err
    assert out == ev.evaluate_model(model, x, iw_samples=500, batch_size=16, seed=3, n_bits=8)
    assert out["iw_nll"] != ev.evaluate_model(model, x, iw_samples=500, batch_size=16, seed=4)["iw_nll"]
    assert out["iw_samples"] == 500 and out["active_units"] == d and len(out["kl_per_dim"]) == d
    assert 0 < out["mutual_information"] < out["mutual_information_max"] == math.log(40)  # the estimate's ceiling
    assert out["elbo"] < -out["iw_nll"] < float(log_px.mean()) + 0.05
    assert abs(out["iw_nll"] + float(log_px.mean())) < 0.1
    assert out["bits_per_dim"] == pytest.approx(out["iw_nll"] / (D * math.log(2.0)) + 8)
    plain = ev.evaluate_model(model, x)
    assert "iw_nll" not in plain and "bits_per_dim" not in plain


def test_argument_errors_name_the_argument():
    model, x, _ = make_problem(n=4)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ev.iw_log_likelihood(model, x, 0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        ev.iw_log_likelihood(model, x, 3, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"x has event shape \(4,\)"):
        ev.elbo_terms(model, x[:, :4])
    with pytest.raises(TypeError, match="threshold must be a number, got str"):
        ev.evaluate_model(model, x, threshold="0.01")
    with pytest.raises(ValueError, match="iw_samples"):
        ev.evaluate_model(model, x, iw_samples=-1)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_evaluation_sets_its_precision_for_the_call_only(precision, monkeypatch):
    """Full float32 on CUDA unless asked (PyTorch's default lets cuDNN convolutions use
    TF32), TF32 flags for "tf32", bfloat16 autocast for "bf16"; the global flags are put
    back after the call, also after an error."""
    model, x, _ = make_problem(n=8)
    model, x = model.float(), x.float()  # a reduced precision is refused for a float64 model
    seen = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda z: (seen.append((
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
        torch.is_autocast_enabled("cpu"))), decode(z))[1])
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    before = precision != "tf32"  # the opposite of what the call should set
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
    try:
        out = ev.evaluate_model(model, x, iw_samples=3, precision=precision)
        ev.iw_nll(model, x, 3, precision=precision)
        tf32, bf16 = precision == "tf32", precision == "bf16"
        assert seen and set(seen) == {(tf32, tf32, bf16)} and out["precision"] == precision
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (before, before)
        assert not torch.is_autocast_enabled("cpu")
        monkeypatch.setattr(model, "decode", lambda z: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ev.iw_nll(model, x, 3, precision=precision)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (before, before)
        with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, got 'fp16'"):
            ev.iw_nll(model, x, 3, precision="fp16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bf16_moves_a_linear_gaussian_estimate_little():
    """The reduced arithmetic is the same estimator: on the closed-form problem the bf16
    estimate stays within bfloat16's rounding of the float32 one (float32 model here)."""
    model, x, _ = make_problem(n=64)
    model = model.float()
    x = x.float()
    a = ev.iw_nll(model, x, 200, generator=torch.Generator().manual_seed(0))
    b = ev.iw_nll(model, x, 200, generator=torch.Generator().manual_seed(0), precision="bf16")
    assert not torch.equal(a, b)  # the autocast did take effect
    assert abs(float((b - a).mean())) < 0.05 * float(a.abs().mean()) + 0.1


@pytest.mark.parametrize("estimate", ["iw", "evaluate_model"])
def test_bf16_rounds_the_networks_not_the_latent_side(estimate, monkeypatch):
    """Under bf16 autocast the encoder's mu and logvar come out in bfloat16; the noise, z
    and the latent log-densities were then drawn and summed in bfloat16 too (about 1/256
    of ~50 nats per sample), which the precision check blamed on the matrix products.
    The noise is now drawn in float32, as for precision="fp32"."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(20,), latent_dim=3, hidden=(16,)))  # nn.Linear: autocast applies
    x = torch.rand(16, 20).bernoulli()
    seen = []
    real = vaekit.iw.randn_like_on

    def spy(shape, generator, like):
        seen.append(like.dtype)
        return real(shape, generator, like)

    for module in (vaekit.iw, ev, vaekit.latents):  # each draws through its own name
        monkeypatch.setattr(module, "randn_like_on", spy)
    sizes = []
    real_size = vaekit.iw.auto_chunk_size
    monkeypatch.setattr(vaekit.iw, "auto_chunk_size", lambda *a: sizes.append(a[2]) or real_size(*a))
    if estimate == "iw":
        ev.iw_nll(model, x, 8, generator=gen(0), precision="bf16")
    else:  # evaluate_model: the ELBO, the IW estimate and the mutual information's draws, under bf16
        ev.evaluate_model(model, x, batch_size=8, precision="bf16", iw_samples=4)
    assert seen and set(seen) == {torch.float32}
    assert sizes and set(sizes) == {torch.bfloat16}  # chunks sized for the decoder's bf16 output, as before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_of_half_precision_weights_is_evaluated_in_its_dtype(dtype):
    """Its posterior parameters stay in the weights' dtype (they were taken to float32, and
    the decoder refused a float32 z)."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(20,), latent_dim=3, hidden=(16,))).to(dtype)
    x = torch.rand(16, 20).bernoulli().to(dtype)
    out = ev.evaluate_model(model, x, batch_size=8, iw_samples=4)
    assert math.isfinite(out["elbo"]) and math.isfinite(out["iw_nll"])
    assert torch.isfinite(ev.iw_nll(model, x, 4, generator=gen(0))).all()


def test_data_of_another_dtype_than_the_model_get_a_clear_error():
    from vaekit.models import VAE, ModelConfig

    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2))
    x = torch.rand(4, 6).round().double()
    for call in (lambda: ev.iw_nll(model, x, 2), lambda: ev.evaluate_model(model, x),
                 lambda: ev.active_units(model, x)):
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the model's weights are torch.float32: "
                                            r"pass x.to\(torch.float32\)"):
            call()
    assert ev.iw_nll(model.double(), x, 2).dtype == torch.float64


def test_one_example_has_no_active_unit_count():
    from vaekit.models import VAE, ModelConfig

    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2))
    x = torch.rand(3, 6).round()
    assert ev.evaluate_model(model, x[:1])["active_units"] is None  # not 0: a variance needs two examples
    assert ev.evaluate_model(model, x)["active_units"] == ev.active_units(model, x)[0]


def test_an_mse_model_gets_bits_per_dim_as_the_gaussian_it_is_scored_as():
    """likelihood='mse' is scored as the Gaussian of variance 1/2, a density on [0, 1]^D:
    its bits per dimension on 8-bit data come from the same conversion as a Gaussian's."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="mse"))
    x = torch.randint(0, 256, (10, 6)) / 255.0
    out = ev.evaluate_model(model, x, iw_samples=20, n_bits=8)
    assert out["bits_per_dim"] == pytest.approx(out["iw_nll"] / (6 * math.log(2.0)) + 8)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_a_reduced_precision_is_refused_for_a_float64_model(precision):
    """Autocast and TF32 leave float64 arithmetic alone: the result would record a precision
    it was not computed in."""
    from vaekit.models import VAE, ModelConfig

    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2)).double()
    x = torch.rand(4, 6, dtype=torch.float64).round()
    for call in (lambda: ev.evaluate_model(model, x, precision=precision),
                 lambda: ev.iw_log_likelihood(model, x, k=2, precision=precision)):
        with pytest.raises(ValueError, match=rf"precision='{precision}' reduces float32 arithmetic, and this model "
                                             r"is float64"):
            call()
    assert "elbo" in ev.evaluate_model(model, x, precision="fp32")


@pytest.mark.parametrize("call, error, match", [
    # beyond MAX_IW_SAMPLES the estimates ran for hours, or were killed for a 24 GB randn
    (lambda m, x: ev.iw_log_likelihood(m, x, 10**9), ValueError, r"k must be an int in \[1, 1000000\], got 10+$"),
    (lambda m, x: ev.iw_nll(m, x, 10**9), ValueError, r"k must be an int in \[1, 1000000\]"),
    (lambda m, x: ev.evaluate_model(m, x, iw_samples=10**12), ValueError,
     r"iw_samples must be an int in \[0, 1000000\]"),
    (lambda m, x: ev.evaluate_model(m, x, iw_samples="5"), TypeError, "iw_samples must be an int, got str"),
    (lambda m, x: ev.elbo_terms(m, x, n_samples=10**9), ValueError, r"n_samples must be an int in \[1, 1000000\]"),
    (lambda m, x: ev.evaluate_model(m, x, n_samples=10**9), ValueError, r"n_samples must be an int in \[1, 1000000\]"),
    # evaluate_model seeds three generators with seed, seed + 1 and seed + 2
    (lambda m, x: ev.evaluate_model(m, x, seed=2**64), ValueError,
     r"seed must be an int in \[0, 18446744073709551613\], got 18446744073709551616"),
    (lambda m, x: ev.evaluate_model(m, x, seed=-1), ValueError, r"seed must be an int in \[0, \d+\], got -1"),
    (lambda m, x: ev.evaluate_model(m, x, seed=1.5), TypeError, "seed must be an int, got float"),
    (lambda m, x: ev.evaluate_model(m, x, seed="0"), TypeError, "seed must be an int, got str"),
    (lambda m, x: ev.evaluate_model(m, x, progress="no"), TypeError, "progress must be a bool, got str"),
    (lambda m, x: ev.elbo_terms(m, x, generator=5), TypeError, "generator must be a torch.Generator or None, got int"),
    (lambda m, x: ev.iw_nll(m, x, 2, generator="cpu"), TypeError,
     "generator must be a torch.Generator or None, got str"),
    (lambda m, x: ev.elbo_terms(None, x), TypeError, r"model must be a vaekit VAE \(a model with encode_params\), "
                                                     r"got NoneType"),
    (lambda m, x: ev.bits_per_dim("1", 784), TypeError, "nll must be a number or a tensor of NLLs in nats, got str"),
    (lambda m, x: ev.continuous_to_discrete_nll([1.0], 784), TypeError, "nll must be a number or a tensor.*got list"),
])
def test_bad_arguments_are_named(call, error, match):
    model, x, _ = make_problem(n=4)
    with pytest.raises(error, match=match):
        call(model, x)


def test_the_largest_seed_and_array_nlls_are_accepted():
    model, x, _ = make_problem(n=4)
    assert ev.evaluate_model(model, x, iw_samples=2, seed=2**64 - 3)["num_examples"] == 4
    import numpy as np

    assert ev.bits_per_dim(np.float64(784 * math.log(2.0)), 784) == pytest.approx(1.0)
    assert ev.continuous_to_discrete_nll(np.zeros(2), 1, n_bits=1) == pytest.approx([math.log(2.0)] * 2)


def _vaekit_linear_gaussian(w, b, noise_var):
    """vaekit's own VAE as a linear-Gaussian model p(z) = N(0, I), p(x|z) = N(W z + b,
    noise_var I) (no hidden layer, fixed decoder variance), its encoder set to the exact
    posterior's mean and the diagonal of its covariance (through the bounded log-variance).
    With orthogonal columns of W that posterior is diagonal, so q(z|x) = p(z|x) exactly."""
    from vaekit.models import VAE, ModelConfig

    dim, latent = w.shape
    config = ModelConfig(input_shape=(dim,), latent_dim=latent, hidden=(), likelihood="gaussian",
                         fixed_logvar=math.log(noise_var))
    model = VAE(config).double()
    (decoder,) = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    cov = torch.linalg.inv(torch.eye(latent, dtype=torch.float64) + w.T @ w / noise_var)
    gain = cov @ w.T / noise_var  # the posterior mean is gain (x - b)
    limit = config.logvar_limit
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[:latent] = gain
        model.head.bias[:latent] = -(gain @ b)
        model.head.bias[latent:] = limit * torch.atanh(torch.diagonal(cov).log() / limit)
    return model.eval()


def test_iw_estimate_of_vaekits_own_model_is_the_exact_log_likelihood_under_the_exact_posterior():
    """Through the real VAE class (bounded log-variance, fixed-variance Gaussian decoder,
    the batched and chunked paths): with q(z|x) = p(z|x) every importance weight is p(x),
    so the estimate equals the closed form log N(x; b, W W^T + s^2 I) for every k."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    w, b, s2 = q * torch.tensor([1.5, 0.7], dtype=torch.float64), torch.randn(6, dtype=torch.float64), 0.3
    model = _vaekit_linear_gaussian(w, b, s2)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(6, dtype=torch.float64))
    x = marginal.sample((7,))
    exact = marginal.log_prob(x)
    for k, batch_size, chunk_size in [(1, None, None), (10, 3, None), (1000, 1, 64), (257, None, 100)]:
        got = ev.iw_log_likelihood(model, x, k, batch_size=batch_size, chunk_size=chunk_size,
                                generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-9)
    # the ELBO's KL is analytic and its reconstruction a Monte Carlo mean; here ELBO = log p(x)
    terms = ev.elbo_terms(model, x, n_samples=20000, generator=torch.Generator().manual_seed(0))
    assert (terms["elbo"] - exact).abs().max() < 0.05  # several standard errors of the 20,000-sample mean (0.007-0.016 seen)
