import json
import math
from decimal import Decimal, localcontext

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaekit.io import CheckpointError
from vaekit.losses import gaussian_kl
from vaekit.models import VAE, ModelConfig, likelihood_mean

CONFIGS = [
    ModelConfig(arch="mlp", input_shape=(1, 8, 8), latent_dim=4, hidden=(32, 16)),
    ModelConfig(arch="mlp", input_shape=(784,), latent_dim=3, hidden=(), activation="tanh"),
    ModelConfig(arch="conv", input_shape=(1, 28, 28), latent_dim=5, hidden=(8, 16, 16)),
    ModelConfig(arch="conv", input_shape=(3, 32, 32), latent_dim=6, hidden=(8, 16), likelihood="continuous_bernoulli"),
    ModelConfig(arch="conv", input_shape=(3, 64, 64), latent_dim=7, hidden=(4, 8, 8, 8),
                likelihood="gaussian", decoder_variance="learned"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.arch}-{'x'.join(map(str, c.input_shape))}")
def test_shapes_and_posterior(cfg):
    torch.manual_seed(0)
    model = VAE(cfg)
    x = torch.rand(3, *cfg.input_shape)
    out = model(x)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, cfg.latent_dim)
    mean = out.decoder_out[0] if isinstance(out.decoder_out, tuple) else out.decoder_out
    assert mean.shape == x.shape
    assert model.nll(out.decoder_out, x).shape == (3,)
    q = model.encode(x)
    assert isinstance(q, Independent) and q.batch_shape == (3,) and q.event_shape == (cfg.latent_dim,)
    # The posterior object and the loss's closed form agree (a second computation).
    prior = Independent(Normal(torch.zeros_like(out.mu), torch.ones_like(out.mu)), 1)
    torch.testing.assert_close(kl_divergence(q, prior), gaussian_kl(*model.encode_params(x)), rtol=1e-5, atol=1e-5)
    assert model.sample(2).shape == (2, *cfg.input_shape)
    assert model.reconstruct(x).shape == x.shape


def test_learned_decoder_variance_gets_gradient():
    """The learned per-pixel log-variance is the Gaussian's: the NLL and its gradient as
    torch.distributions' Normal(mean, e^(logvar/2)) gives them, per pixel."""
    cfg = CONFIGS[-1]
    torch.manual_seed(0)
    model = VAE(cfg)
    with torch.no_grad():
        model.decoder_logvar.normal_(0.0, 0.5)  # not one value for every pixel
    x = torch.rand(2, *cfg.input_shape)
    mean, logvar = model(x).decoder_out
    mean = mean.detach()
    model.nll((mean, logvar), x).sum().backward()
    ref_logvar = model.decoder_logvar.detach().clone().requires_grad_()
    ref = -Independent(Normal(mean, torch.exp(0.5 * ref_logvar)), 3).log_prob(x)
    ref.sum().backward()
    torch.testing.assert_close(model.nll((mean, model.decoder_logvar), x), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(model.decoder_logvar.grad, ref_logvar.grad, rtol=1e-4, atol=1e-6)


def test_logvar_is_bounded_and_finite_for_huge_activations():
    cfg = ModelConfig(input_shape=(4,), latent_dim=2, hidden=(3,), logvar_limit=10.0)
    model = VAE(cfg)
    with torch.no_grad():
        model.head.weight.fill_(1e6)
    mu, logvar = model.encode_params(torch.ones(2, 4))
    assert logvar.abs().max() <= 10.0
    assert torch.isfinite(gaussian_kl(mu.clamp(-1e3, 1e3), logvar)).all()


@pytest.mark.parametrize("cfg", CONFIGS[:3] + CONFIGS[4:], ids=str)
def test_save_load_round_trip(tmp_path, cfg):
    torch.manual_seed(1)
    model = VAE(cfg).eval()
    x = torch.rand(2, *cfg.input_shape)
    model.save_pretrained(tmp_path / "m")
    loaded = VAE.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == cfg
    for a, b in zip(model.encode_params(x), loaded.encode_params(x)):
        assert torch.equal(a, b)
    assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_comes_back_in_the_dtype_it_was_saved_in(tmp_path, dtype):
    """A float64 (or bfloat16) model is loaded as such, its weights exactly as saved, still
    trainable; it was cast into a float32 model (float64 weights rounded by up to 1e-7)."""
    torch.manual_seed(1)
    model = VAE(CONFIGS[0]).to(dtype)
    model.save_pretrained(tmp_path / "m")
    loaded = VAE.from_pretrained(tmp_path / "m")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == dtype and torch.equal(a, b), name
    assert all(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, *CONFIGS[0].input_shape, dtype=dtype)
    assert torch.equal(model.eval().encode_params(x)[0], loaded.eval().encode_params(x)[0])


def test_load_refuses_damaged_or_newer(tmp_path):
    model = VAE(CONFIGS[0])
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="safetensors"):
        VAE.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    import json

    meta = json.loads((tmp_path / "config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        VAE.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere holds no saved model: no such directory"):
        VAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(CheckpointError, match="bare holds no saved model: config.json is missing"):
        VAE.from_pretrained(tmp_path / "bare")


def test_wrong_input_shape_is_named():
    model = VAE(CONFIGS[0])
    with pytest.raises(ValueError, match=r"x has shape \(2, 1, 9, 9\)"):
        model(torch.rand(2, 1, 9, 9))


def test_discretized_logistic_and_calibrated_gaussian_use_the_objective_functions():
    from vaekit.objectives import discretized_logistic_nll, optimal_sigma_nll

    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 8, 8)) / 255.0
    for arch, hidden in (("mlp", (16,)), ("conv", (4, 8))):
        model = VAE(ModelConfig(arch=arch, input_shape=(1, 8, 8), hidden=hidden, latent_dim=2,
                                likelihood="discretized_logistic"))
        out = model(x)
        mean, log_scale = out.decoder_out
        assert mean.shape == log_scale.shape == x.shape
        torch.testing.assert_close(model.nll(out.decoder_out, x), discretized_logistic_nll(mean, log_scale, x))
        assert model.sample(2).min() >= 0 and model.sample(2).max() <= 1
    model = VAE(ModelConfig(input_shape=(5,), hidden=(8,), latent_dim=2, likelihood="gaussian",
                            decoder_variance="optimal"))
    xg = torch.randn(4, 5)
    out = model(xg)
    torch.testing.assert_close(model.nll(out.decoder_out, xg), optimal_sigma_nll(out.decoder_out, xg))
    with pytest.raises(ValueError, match="decoder_variance"):
        ModelConfig(likelihood="bernoulli", decoder_variance="optimal")


@pytest.mark.parametrize("flags", [["--likelihood", "discretized_logistic"],
                                   ["--likelihood", "gaussian", "--decoder-variance", "optimal"]])
def test_the_command_line_trains_the_other_likelihoods(tmp_path, flags):
    import numpy as np

    from vaekit.cli import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (120, 6, 6), dtype=np.uint8))
    rc = main(["train", "--dataset", "array", "--data-dir", str(tmp_path / "imgs.npy"), "--epochs", "2",
               "--hidden", "16", "--latent-dim", "2", "--batch-size", "32", "--no-progress",
               "--run-dir", str(tmp_path / "run"), *flags])
    assert rc == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert main(["evaluate", str(tmp_path / "run"), "--iw-samples", "4"]) == 0
    if "optimal" in flags:  # the kept model's evaluation variance has seen every step up to its epoch
        import csv

        rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
        best = min((r for r in rows if r["split"] == "val"), key=lambda r: float(r["loss"]))
        model = VAE.from_pretrained(tmp_path / "run" / "model")
        assert int(model.decoder_mse_steps) == int(best["step"]) > 0


def test_discretized_logistic_refuses_data_off_the_8_bit_grid(tmp_path):
    from vaekit.cli import main

    rc = main(["train", "--likelihood", "discretized_logistic", "--binarize", "none", "--epochs", "1",
               "--no-progress", "--run-dir", str(tmp_path / "run")])
    assert rc == 2 and not (tmp_path / "run").exists()


def test_an_mse_model_is_scored_as_the_gaussian_of_variance_one_half():
    """likelihood='mse' trains on the squared error's gradients and reports the Gaussian
    log-likelihood it stands for (variance 1/2): the squared error + (D/2) log(pi), the
    density of torch.distributions.Normal(x_hat, sqrt(1/2)), in float64."""
    from vaekit.losses import mse

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="mse")).double()
    x_hat = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    x = torch.rand(5, 6, dtype=torch.float64)
    nll = model.nll(x_hat, x)
    reference = -Independent(Normal(x_hat, math.sqrt(0.5)), 1).log_prob(x)
    torch.testing.assert_close(nll, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll, mse(x_hat, x) + 3 * math.log(math.pi), rtol=1e-12, atol=1e-12)
    (g_model,) = torch.autograd.grad(nll.sum(), x_hat)
    (g_mse,) = torch.autograd.grad(mse(x_hat, x).sum(), x_hat)
    torch.testing.assert_close(g_model, g_mse, rtol=1e-12, atol=1e-12)


def test_an_optimal_variance_model_is_evaluated_as_one_normalised_gaussian(tmp_path):
    """decoder_variance='optimal': training scores each example under its own best variance
    (not a density: the variance depends on the x scored); evaluation scores every example
    under one variance, the running mean of the training batches' squared error, which is
    torch.distributions.Normal's density (float64)."""
    from vaekit.objectives import optimal_sigma_nll

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="gaussian",
                            decoder_variance="optimal")).double()
    mses = []
    for i in range(150):  # the first 100 batches are averaged, then an exponential average (0.01)
        mean, x = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64) * (1 + i / 50)
        torch.testing.assert_close(model.nll(mean, x), optimal_sigma_nll(mean, x))
        mses.append(float((x - mean).square().mean()))
    expected = sum(mses[:100]) / 100
    for m in mses[100:]:
        expected += 0.01 * (m - expected)
    assert float(model.decoder_mse) == pytest.approx(expected, rel=1e-12)
    nan = torch.full((4, 6), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be finite"):
        model.nll(torch.zeros(4, 6, dtype=torch.float64), nan)
    model.nll(torch.zeros(4, 6, dtype=torch.float64), nan, validate_args=False)  # as the training loop calls it
    assert float(model.decoder_mse) == pytest.approx(expected, rel=1e-12)  # a non-finite batch is left out

    model.eval()
    mean, x = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    reference = -Independent(Normal(mean, math.sqrt(expected)), 1).log_prob(x)
    torch.testing.assert_close(model.nll(mean, x), reference, rtol=1e-12, atol=1e-12)
    before = float(model.decoder_mse)
    model.nll(mean, x)
    assert float(model.decoder_mse) == before  # evaluation does not move it
    model.save_pretrained(tmp_path / "m")
    back = VAE.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(back.nll(mean, x), reference, rtol=1e-12, atol=1e-12)


def test_bad_inputs_to_the_model_name_the_argument():
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the model's weights are torch.float32"):
        model.encode(torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x must be a floating tensor .* got torch.uint8"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    for call in (model.decode, model.generate):
        with pytest.raises(ValueError, match=r"z must have shape \[N, 3\] \(latent_dim 3\), got \(2, 5\)"):
            call(torch.zeros(2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast computes in its own dtype
        assert model.decode(torch.zeros(2, 3)).shape == (2, 1, 4, 4)
    assert model.double().decode(torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_an_optimal_variance_model_saved_before_decoder_mse_still_loads_and_warns(tmp_path):
    """Models saved before the evaluation variance was kept lack the buffer: they load (with
    a warning), score as they did then, and record the variance once they train again."""
    from safetensors.torch import load_file, save_file

    from vaekit.objectives import optimal_sigma_nll

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="gaussian",
                            decoder_variance="optimal"))
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    old = {k: v for k, v in load_file(weights).items() if not k.startswith("decoder_mse")}
    save_file(old, weights)
    config = tmp_path / "m" / "config.json"  # and without the weights' SHA-256, which came later
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "weights_sha256"}))
    with pytest.warns(UserWarning, match="saved before vaekit kept an evaluation variance"):
        back = VAE.from_pretrained(tmp_path / "m")
    back.eval()
    mean, x = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(back.nll(mean, x), optimal_sigma_nll(mean, x))  # as it was scored then
    back.train()
    back.nll(mean, x)
    back.eval()
    reference = -Independent(Normal(mean, float((x - mean).square().mean()) ** 0.5), 1).log_prob(x)
    torch.testing.assert_close(back.nll(mean, x), reference)  # one step later: the tracked variance

    # saved again untrained, it stays "no variance seen" (0 steps) and is scored as then
    old_model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="gaussian",
                                decoder_variance="optimal")).double()
    with pytest.warns(UserWarning):
        old_model.load_state_dict({k: v.double() for k, v in old.items()})
    assert old_model.decoder_mse.dtype == torch.float64 and float(old_model.decoder_mse_steps) == 0
    old_model.save_pretrained(tmp_path / "again")
    again = VAE.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(again.nll(mean.double(), x.double()), optimal_sigma_nll(mean.double(), x.double()))
    # a partial load (strict=False) fills in nothing and reports the buffers missing
    missing = back.load_state_dict({k: v for k, v in old.items() if k.startswith("encoder")}, strict=False).missing_keys
    assert "decoder_mse" in missing and float(back.decoder_mse_steps) == 1


def test_docstring_examples_run():
    import doctest

    import vaekit.models

    result = doctest.testmod(vaekit.models, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def _cb_mean(logit: float) -> float:
    """The continuous Bernoulli's mean, 1/(1 - e^-l) - 1/l, in 60-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 60
        l = Decimal(logit)
        return float(1 / (1 - (-l).exp()) - 1 / l)


def test_continuous_bernoulli_mean_against_a_60_digit_reference():
    """torch's ContinuousBernoulli clamps sigmoid(l) to [eps, 1 - eps]: its mean was 0.02774
    for every l below about -36 (0.025 at -40, 0.00352 at -284, where trained models put
    the logits of always-black pixels) and 0.9723 at +284 (0.9965). Near 0, where the two
    terms cancel, the series takes over at |l| = 0.1."""
    logits = [s * m * 10.0**e for e in range(-6, 5) for m in (1.0, 3.7) for s in (1, -1)]
    logits += [s * v for v in (0.0999, 0.1, 0.1001, 36.0, 40.0, 100.0, 284.0, 300.0, 800.0) for s in (1, -1)]
    l = torch.tensor(logits, dtype=torch.float64)
    want = torch.tensor([_cb_mean(v) for v in logits], dtype=torch.float64)
    torch.testing.assert_close(likelihood_mean("continuous_bernoulli", l), want, rtol=2e-14, atol=0)
    torch.testing.assert_close(likelihood_mean("continuous_bernoulli", l.float()), want.float())  # float32 in and out
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf])
    assert likelihood_mean("continuous_bernoulli", edges).tolist() == [0.5, 0.5, 1.0, 0.0]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_nll_samples_is_nll_of_x_repeated(likelihood):
    torch.manual_seed(0)
    model = VAE(ModelConfig(arch="mlp", input_shape=(6,), hidden=(8,), latent_dim=3, likelihood=likelihood)).double()
    x, z = torch.rand(4, 6, dtype=torch.float64), torch.randn(5, 4, 3, dtype=torch.float64)
    out = model.decode(z.reshape(20, 3))
    reference = model.nll(out, x.repeat(5, 1)).reshape(5, 4)
    torch.testing.assert_close(model.nll_samples(out, x), reference)


def test_nll_samples_follows_a_subclass_nll():
    class Scaled(VAE):
        def nll(self, decoder_out, x, *, validate_args=None):
            return 2 * super().nll(decoder_out, x, validate_args=validate_args)

    torch.manual_seed(0)
    model = Scaled(ModelConfig(arch="mlp", input_shape=(6,), hidden=(8,), latent_dim=3)).double()
    x, z = torch.rand(4, 6, dtype=torch.float64), torch.randn(5, 4, 3, dtype=torch.float64)
    out = model.decode(z.reshape(20, 3))
    torch.testing.assert_close(model.nll_samples(out, x), 2 * VAE.nll(model, out, x.repeat(5, 1)).reshape(5, 4))


def test_nll_samples_takes_the_bernoulli_path_unless_nll_is_replaced(monkeypatch):
    import vaekit.models as models

    calls = []
    real = models.bernoulli_nll_samples
    monkeypatch.setattr(models, "bernoulli_nll_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = VAE(ModelConfig(arch="mlp", input_shape=(6,), hidden=(8,), latent_dim=3))
    x, out = torch.rand(4, 6), torch.randn(20, 6)
    model.nll_samples(out, x)
    assert calls == [1]
    model.nll = lambda decoder_out, x, **k: VAE.nll(model, decoder_out, x, **k) + 1.0  # patched on the instance
    torch.testing.assert_close(model.nll_samples(out, x), VAE.nll(model, out, x.repeat(5, 1)).reshape(5, 4) + 1.0)
    assert calls == [1]


def test_nll_samples_refuses_a_sample_count_that_does_not_divide():
    model = VAE(ModelConfig(arch="mlp", input_shape=(6,), hidden=(8,), latent_dim=3, likelihood="gaussian"))
    with pytest.raises(ValueError, match=r"decoder_out must hold k samples of each of the 4 examples.*\(18, 6\)"):
        model.nll_samples(torch.randn(18, 6), torch.rand(4, 6))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_decode_nll_of_an_empty_batch_is_empty(likelihood):
    from vaekit.iw import decode_nll

    model = VAE(ModelConfig(arch="mlp", input_shape=(6,), hidden=(8,), latent_dim=3, likelihood=likelihood))
    assert decode_nll(model, torch.rand(0, 6), torch.randn(5, 0, 3)).shape == (5, 0)


def test_decode_nll_checks_what_nll_samples_returns():
    from vaekit.iw import decode_nll

    class Odd(VAE):
        def nll_samples(self, decoder_out, x, *, validate_args=None):
            return torch.zeros(3)

    model = Odd(ModelConfig(arch="mlp", input_shape=(6,), hidden=(8,), latent_dim=3))
    with pytest.raises(ValueError, match=r"model.nll_samples must return shape \(5, 4\), got \(3,\)"):
        decode_nll(model, torch.rand(4, 6), torch.randn(5, 4, 3))


def _small(**kw):
    return VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,), **kw))


def _mutated():
    config = ModelConfig(input_shape=(4,), hidden=())
    config.latent_dim = 0
    return VAE(config)


def _saved_over_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    _small().save_pretrained(tmp_path / "afile")


_XB = torch.rand(3, 1, 4, 4).bernoulli()


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda p: _small().sample(10**12), ValueError,
                 r"n must be at most 134217728 \(images of 16 values, .*\), got 1000000000000", id="sample-n"),
    pytest.param(lambda p: _small().sample(2, generator=0), TypeError, "generator must be a torch.Generator or None",
                 id="sample-generator"),
    pytest.param(lambda p: VAE(ModelConfig(input_shape=(2**31 - 1,), hidden=(2**31 - 1,))), ValueError,
                 r"config \(input_shape=\(2147483647,\), hidden=\(2147483647,\), .*parameters, over the 2147483648",
                 id="config-huge-input"),
    pytest.param(lambda p: VAE(ModelConfig(hidden=(200000, 200000))), ValueError,
                 r"hidden=\(200000, 200000\).* makes a model of 80324000816 parameters", id="config-huge-hidden"),
    pytest.param(lambda p: _mutated(), ValueError, "ModelConfig.latent_dim must be an integer in", id="config-mutated"),
    pytest.param(lambda p: _small(likelihood="discretized_logistic").nll(torch.randn(3, 1, 4, 4), _XB), TypeError,
                 r"decoder_out must be a \(mean, log_scale\) pair for likelihood 'discretized_logistic', got Tensor",
                 id="nll-logistic-tensor"),
    pytest.param(lambda p: _small().decode_samples(torch.randn(3, 2), _XB), ValueError,
                 r"z must be \[k, B, d\], got shape \(3, 2\)", id="decode-samples-2d"),
    pytest.param(lambda p: _small().decode_samples([1.0], _XB), TypeError, r"z must be a torch.Tensor \[k, B, d\]",
                 id="decode-samples-list"),
    pytest.param(lambda p: _small(pixelcnn_layers=1, pixelcnn_width=4).decode(torch.randn(3, 2), [1.0]), TypeError,
                 "x must be a torch.Tensor, got list", id="pixelcnn-decode-x"),
    pytest.param(lambda p: _small(pixelcnn_layers=1, pixelcnn_width=4).decode_samples(torch.randn(2, 3, 2), [1.0]),
                 TypeError, r"x must be a torch.Tensor \[B, \*input_shape\], got list", id="pixelcnn-decode-samples-x"),
    pytest.param(lambda p: _small()(_XB, noise=lambda s: torch.randn(9)), ValueError,
                 r"noise\(shape\) must return a tensor of shape \(3, 2\), got shape \(9,\)", id="forward-noise"),
    pytest.param(lambda p: _small().nll_samples(torch.randn(6, 1, 4, 4), [1.0]), TypeError,
                 r"x must be a torch.Tensor \[B, \*event\], got list", id="nll-samples-x"),
    pytest.param(lambda p: _small().encode(torch.full((3, 1, 4, 4), float("nan"))), ValueError, "x must be finite",
                 id="encode-nan"),
    pytest.param(lambda p: likelihood_mean("gaussian", "abc"), TypeError,
                 r"decoder_out must be a mean tensor or a \(mean, \.\.\.\) pair, got str", id="likelihood-mean-str"),
    pytest.param(_saved_over_a_file, ValueError, "directory .*afile.* is a file", id="save-over-a-file"),
])
def test_bad_arguments_to_the_model_are_refused_by_name(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


@pytest.mark.parametrize("cfg", CONFIGS + [
    ModelConfig(arch="conv", input_shape=(3, 17, 9), hidden=(4, 8, 5), likelihood="discretized_logistic"),
    ModelConfig(input_shape=(2, 8, 8), hidden=(7,), pixelcnn_layers=3, pixelcnn_width=5),
    ModelConfig(arch="conv", input_shape=(2, 8, 8), hidden=(7, 3), pixelcnn_layers=2, pixelcnn_width=5,
                pixelcnn_fusion="late"),
], ids=lambda c: f"{c.arch}-{'x'.join(map(str, c.input_shape))}-{c.likelihood}-pixelcnn{c.pixelcnn_layers}")
def test_the_parameters_are_counted_before_building(cfg):
    """VAE refuses a config over MAX_PARAMETERS from this count, made before anything is allocated."""
    from vaekit.models import _n_parameters

    assert _n_parameters(cfg) == sum(p.numel() for p in VAE(cfg).parameters())


def test_sample_is_the_bernoulli_mean_of_a_decoded_prior_draw():
    """VAE.sample(n, generator): z = randn(n, d, generator), the images sigmoid(decoder(z)),
    the Bernoulli means (grey levels), not draws from them."""
    torch.manual_seed(0)
    model = _small()
    got = model.sample(6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = torch.sigmoid(model.decoder(torch.randn(6, 2, generator=torch.Generator().manual_seed(7))))
    assert got.shape == (6, 1, 4, 4) and torch.equal(got, want)
    assert ((got > 0) & (got < 1)).all()


def test_sample_decodes_in_chunks_where_one_pass_would_hold_too_much(monkeypatch):
    """A PixelCNN head holds many maps an image: n is refused only where the images alone
    would be too many, and decoded in chunks whose peak stays under the bound (the CLI's
    -n 3000 on a 64 x 64 PixelCNN was refused before)."""
    import vaekit.models

    torch.manual_seed(0)
    model = _small(pixelcnn_layers=1, pixelcnn_width=6).eval()
    monkeypatch.setattr(vaekit.models, "MAX_SAMPLE_NUMEL", 3 * model.decode_numel)  # chunks of 3 images
    out = model.sample(10, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(10, 2, generator=g)
    by_hand = torch.cat([model.generate(part, generator=g) for part in z.split(3)])
    assert out.shape == (10, 1, 4, 4) and torch.equal(out, by_hand)
    with pytest.raises(ValueError, match=rf"n must be at most {3 * model.decode_numel // 16} \(images of 16 values"):
        model.sample(3 * model.decode_numel // 16 + 1)


@pytest.mark.parametrize("cfg", CONFIGS + [ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="gaussian",
                                                       decoder_variance="optimal")], ids=str)
def test_deepcopy_and_pickle_give_the_same_model(cfg):
    """copy.deepcopy and a pickle round trip (what DataLoader workers, multiprocessing and
    checkpointing libraries do with a module): the same config, tensors and outputs, bit for bit."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = VAE(cfg)
    if cfg.decoder_variance == "optimal":  # one training step's tracked variance, so the buffer is not its initial one
        model.train()
        model.nll(torch.rand(3, *cfg.input_shape), torch.rand(3, *cfg.input_shape))
    model.eval()
    x = torch.rand(2, *cfg.input_shape)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.config == cfg and not other.training
        for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), name
        for a, b in zip(model.encode_params(x), other.encode_params(x)):
            assert torch.equal(a, b)
        assert torch.equal(model.reconstruct(x), other.reconstruct(x))


@pytest.mark.parametrize("doc", ["README.md", "docs/objective.md"])
def test_the_python_blocks_of_the_readme_and_the_objective_doc_run(doc, tmp_path, monkeypatch, capsys):
    """What a reader copies first runs as written (in a folder of its own: the README's
    block saves a model)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks, doc
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__doc_block__"})
    if doc == "README.md":
        assert VAE.from_pretrained(tmp_path / "my-vae").config.latent_dim == 16


@pytest.mark.parametrize("mse", [1e-6, 0.0])
def test_an_optimal_variance_model_scores_under_the_floor_of_its_variance(mse):
    """A tracked squared error below e^-9 (or 0: a decoder that reproduced its data) is
    scored under the variance e^-9, optimal_sigma_nll's floor, not under its own (whose log
    was -inf for 0)."""
    from vaekit.losses import gaussian_nll

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), hidden=(8,), latent_dim=2, likelihood="gaussian",
                            decoder_variance="optimal")).eval()
    model.decoder_mse.fill_(mse)
    model.decoder_mse_steps.fill_(5)
    mean, x = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(model.nll(mean, x), gaussian_nll(mean, x, -9.0), rtol=1e-6, atol=0)


def test_forward_draws_z_by_the_reparameterisation_with_the_noise_given():
    """z = mu + exp(logvar / 2) eps, as torch.distributions' Normal(mu, sigma).rsample
    forms it from the same eps, and the decoder's output is that z's."""
    torch.manual_seed(0)
    model = VAE(CONFIGS[0]).eval()
    x = torch.rand(3, *CONFIGS[0].input_shape)
    eps = torch.randn(3, CONFIGS[0].latent_dim)
    out = model(x, noise=lambda shape: eps)
    normal = Normal(out.mu, torch.exp(0.5 * out.logvar))
    torch.testing.assert_close(out.z, normal.loc + normal.scale * eps, rtol=0, atol=0)
    assert torch.equal(out.decoder_out, model.decode(out.z))
    mu, logvar = model.encode_params(x)
    assert torch.equal(out.mu, mu) and torch.equal(out.logvar, logvar)


def test_forward_in_training_draws_its_own_noise_as_a_standard_normal_scaled_by_exp_half_logvar():
    """Without a noise argument, forward (in training mode) draws eps ~ N(0, I) from the
    global generator after encoding (encoding draws nothing) and forms z = mu + e^(logvar/2) eps:
    with the same seed, z is the closed form of that draw. And logvar is a log-variance, not a
    log-standard-deviation: with the head's output pinned to (mu, logvar) = (0.3, log 0.25),
    20,000 draws of z have mean 0.3 and variance 0.25 (standard errors 0.0035 and 0.0025)."""
    torch.manual_seed(0)
    model = VAE(CONFIGS[0]).train()
    x = torch.rand(5, *CONFIGS[0].input_shape)
    torch.manual_seed(11)
    out = model(x)
    torch.manual_seed(11)
    eps = torch.randn(5, CONFIGS[0].latent_dim)
    mu, logvar = model.encode_params(x)
    want = mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()
    torch.testing.assert_close(out.z.double(), want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(out.z, mu)  # the noise was used

    model = VAE(ModelConfig(input_shape=(3,), latent_dim=2, hidden=(), logvar_limit=12.0)).train()
    with torch.no_grad():
        model.head.weight.zero_()
        raw = 12.0 * math.atanh(math.log(0.25) / 12.0)  # the head's raw output whose bound is log 0.25
        model.head.bias.copy_(torch.tensor([0.3, 0.3, raw, raw]))
    torch.manual_seed(5)
    z = model(torch.rand(20000, 3)).z.double()
    torch.testing.assert_close(model.encode_params(torch.rand(1, 3))[1], torch.full((1, 2), math.log(0.25)))
    assert (z.mean(0) - 0.3).abs().max() < 0.015
    assert (z.var(0) - 0.25).abs().max() < 0.012


_ODD = [
    ModelConfig(arch="conv", input_shape=(1, 7, 9), latent_dim=2, hidden=(4,)),
    ModelConfig(arch="conv", input_shape=(1, 7, 9), latent_dim=2, hidden=(4, 6, 3)),
    ModelConfig(arch="conv", input_shape=(3, 13, 11), latent_dim=3, hidden=(4, 5), likelihood="gaussian",
                fixed_logvar=-0.5),
    ModelConfig(arch="conv", input_shape=(3, 13, 11), latent_dim=3, hidden=(5, 4, 4, 4), likelihood="gaussian",
                decoder_variance="learned"),
    ModelConfig(arch="conv", input_shape=(2, 5, 13), latent_dim=2, hidden=(3, 3), likelihood="discretized_logistic"),
]


@pytest.mark.parametrize("cfg", _ODD, ids=lambda c: f"{'x'.join(map(str, c.input_shape))}-{len(c.hidden)}-{c.likelihood}")
def test_conv_models_on_odd_sides_mirror_every_layer_and_score_every_pixel(cfg):
    """Odd heights and widths: each stride-2 convolution (kernel 3, padding 1) gives
    floor((n - 1) / 2) + 1 rows and columns, as Conv2d's own formula says; each transposed
    convolution gives back the size its encoder twin took, so the decoder's output has the
    input's shape exactly; and the reconstruction term is the per-example sum over every
    pixel of each pixel's own NLL (torch.distributions or the BCE, in float64)."""
    from torch import nn

    torch.manual_seed(0)
    model = VAE(cfg)
    x = torch.rand(3, *cfg.input_shape)
    if cfg.likelihood == "bernoulli":
        x = x.bernoulli()
    if cfg.likelihood == "discretized_logistic":
        x = torch.randint(0, 256, x.shape) / 255.0
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append((type(m).__name__, tuple(i[0].shape[-2:]),
                                                                   tuple(o.shape[-2:]))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    out = model(x)
    for h in hooks:
        h.remove()
    n = len(cfg.hidden)
    encoder, decoder = sizes[:n], sizes[n:]
    for name, (h, w), (ho, wo) in encoder:
        assert name == "Conv2d" and (ho, wo) == ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
    assert [s[0] for s in decoder] == ["ConvTranspose2d"] * n + ["Conv2d"]
    assert [s[2] for s in decoder[:n]] == [s[1] for s in reversed(encoder)]  # each undoes its twin
    assert decoder[-1][1] == decoder[-1][2] == cfg.input_shape[1:]
    mean = out.decoder_out[0] if isinstance(out.decoder_out, tuple) else out.decoder_out
    assert mean.shape == x.shape
    nll = model.nll(out.decoder_out, x)
    assert nll.shape == (3,)
    xd = x.double()
    if cfg.likelihood == "bernoulli":
        per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(mean.double(), xd, reduction="none")
    elif cfg.likelihood == "gaussian":
        logvar = out.decoder_out[1].double() if cfg.decoder_variance == "learned" else torch.tensor(cfg.fixed_logvar)
        per_pixel = -Normal(mean.double(), torch.exp(0.5 * logvar)).log_prob(xd)
    else:
        from vaekit.likelihoods import discretized_logistic_nll

        log_scale = out.decoder_out[1]
        assert log_scale.shape == x.shape
        # each pixel scored alone, as a one-pixel image, then added up
        per_pixel = discretized_logistic_nll(mean.reshape(-1, 1), log_scale.reshape(-1, 1),
                                             x.reshape(-1, 1)).double().reshape(x.shape)
    assert per_pixel.shape == x.shape
    torch.testing.assert_close(nll.double(), per_pixel.flatten(1).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fixed_logvar", [0.0, -1.3, 2.5])
def test_a_learned_decoder_variance_starts_at_fixed_logvar(fixed_logvar):
    """decoder_variance='learned': one log-variance per data dimension, a parameter, each
    starting at fixed_logvar (the config's documented starting value); decode hands it out
    as the second of (mean, logvar), and the untrained model scores x under N(mean,
    e^fixed_logvar) per pixel."""
    torch.manual_seed(0)
    cfg = ModelConfig(input_shape=(2, 3, 4), latent_dim=2, hidden=(8,), likelihood="gaussian",
                      decoder_variance="learned", fixed_logvar=fixed_logvar)
    model = VAE(cfg)
    lv = model.decoder_logvar
    assert isinstance(lv, torch.nn.Parameter) and lv.requires_grad and lv.dtype == torch.float32
    assert lv.shape == (2, 3, 4)
    assert torch.equal(lv, torch.full((2, 3, 4), fixed_logvar))
    assert any(p is lv for p in model.parameters())
    mean, logvar = model.decode(torch.randn(3, 2))
    assert logvar is lv
    x = torch.randn(3, 2, 3, 4)
    want = -Normal(mean.double(), math.exp(0.5 * fixed_logvar)).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(model.nll((mean, logvar), x).double(), want, rtol=1e-5, atol=1e-4)


_ACTS = {"relu": (torch.nn.ReLU, torch.nn.functional.relu), "tanh": (torch.nn.Tanh, torch.tanh),
         "elu": (torch.nn.ELU, torch.nn.functional.elu), "gelu": (torch.nn.GELU, torch.nn.functional.gelu),
         "silu": (torch.nn.SiLU, torch.nn.functional.silu)}


@pytest.mark.parametrize("name", sorted(_ACTS))
def test_each_activation_name_builds_the_module_it_names(name):
    """Every activation module of an MLP and a conv model is the class the name says (and
    one follows each hidden layer), its forward is torch.nn.functional's function of that
    name, and the MLP's encoder and decoder are the layers with that function between them,
    written out here."""
    from torch import nn

    from vaekit.models import ACTIVATIONS

    assert set(ACTIVATIONS) == set(_ACTS)
    klass, fn = _ACTS[name]
    all_classes = tuple(k for k, _ in _ACTS.values())
    torch.manual_seed(0)
    mlp = VAE(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(5, 4), activation=name))
    conv = VAE(ModelConfig(arch="conv", input_shape=(1, 6, 6), latent_dim=2, hidden=(3, 4), activation=name))
    for model, count in ((mlp, 4), (conv, 5)):  # mlp: 2 + 2 layers; conv: 2 + the decoder's linear + 2
        acts = [m for m in model.modules() if isinstance(m, all_classes)]
        assert len(acts) == count and all(type(m) is klass for m in acts)
    t = torch.linspace(-4, 4, 81)
    for m in (m for m in mlp.modules() if isinstance(m, klass)):
        torch.testing.assert_close(m(t), fn(t), rtol=0, atol=0)
    x, z = torch.randn(3, 6), torch.randn(3, 2)
    lin = [m for m in mlp.modules() if isinstance(m, nn.Linear)]  # enc 6-5, 5-4, head 4-4, dec 2-4, 4-5, 5-6

    def f(layer, h):
        return torch.nn.functional.linear(h, layer.weight, layer.bias)

    head = f(lin[2], fn(f(lin[1], fn(f(lin[0], x)))))
    torch.testing.assert_close(mlp.encoder_head(x), head, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mlp.decode(z), f(lin[5], fn(f(lin[4], fn(f(lin[3], z))))), rtol=1e-6, atol=1e-6)
