"""The autoregressive decoder: causal, normalised, sampled from the distribution it scores."""

import copy
import itertools
import math

import pytest
import torch

from vaekit.evaluate import elbo_terms, iw_log_likelihood
from vaekit.fast import StaticStep
from vaekit.losses import gaussian_kl
from vaekit.models import VAE, ModelConfig
from vaekit.objectives import decode_nll, log_weights_from_noise
from vaekit.pixelcnn import MaskedConv2d, PixelCNNHead, sample_pixels


FUSIONS = pytest.mark.parametrize("fusion", ["early", "late"])


def _model(shape=(1, 5, 5), layers=3, arch="mlp", seed=0, trained_head=True, fusion="early"):
    torch.manual_seed(seed)
    hidden = (16,) if arch == "mlp" else (4,)
    model = VAE(ModelConfig(arch=arch, input_shape=shape, latent_dim=3, hidden=hidden,
                            pixelcnn_layers=layers, pixelcnn_width=6, pixelcnn_fusion=fusion))
    if trained_head:  # the head starts at zero; a random last layer makes every test bite
        torch.nn.init.normal_(model.pixelcnn.out.weight, std=0.5)
        torch.nn.init.normal_(model.pixelcnn.out.bias, std=0.5)
    return model


@pytest.mark.parametrize("shape,arch", [((1, 5, 5), "mlp"), ((2, 4, 6), "mlp"), ((1, 6, 6), "conv")])
@FUSIONS
def test_each_logit_depends_only_on_earlier_pixels(shape, arch, fusion):
    model = _model(shape, layers=4, arch=arch, fusion=fusion)
    c, h, w = shape
    x = torch.rand(1, *shape).bernoulli().requires_grad_(True)
    logits = model.decode(torch.randn(1, 3), x)
    for ch, i, j in itertools.product(range(c), range(h), range(w)):
        (g,) = torch.autograd.grad(logits[0, ch, i, j], x, retain_graph=True)
        seen = g[0].abs().sum(0) != 0  # [H, W]: the pixels this logit reads (any channel)
        order = torch.arange(h * w).reshape(h, w)
        assert not seen[order >= i * w + j].any(), f"logit ({ch}, {i}, {j}) reads pixel at or after itself"
    # ... and it reads some earlier pixels (the head is not dead).
    (g,) = torch.autograd.grad(logits[0, 0, h - 1, w - 1], x)
    assert g.abs().sum() > 0


def test_masks_match_their_definition():
    a, b = MaskedConv2d(1, 1, 5, "A").mask[0, 0], MaskedConv2d(1, 1, 5, "B").mask[0, 0]
    assert a.sum() == 12 and b.sum() == 13  # 2 rows of 5 above, 2 (or 3) in the centre row
    assert a[2, 2] == 0 and b[2, 2] == 1 and a[3:].sum() == 0 and b[2, 3:].sum() == 0
    with pytest.raises(ValueError, match="mask"):
        MaskedConv2d(1, 1, 3, "C")


@FUSIONS
def test_likelihood_is_normalised_over_every_binary_image(fusion):
    """sum_x p(x|z) = 1 over all 2^(C*H*W) images, exactly (float64): the factors are a
    proper autoregressive factorisation."""
    model = _model((1, 3, 3), fusion=fusion).double()
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9)), dtype=torch.float64).reshape(-1, 1, 3, 3)
    z = torch.randn(2, 3, dtype=torch.float64)
    for zi in z:
        with torch.no_grad():
            nll = decode_nll(model, images, zi.expand(1, len(images), 3))[0]
        assert abs(torch.logsumexp(-nll, 0).item()) < 1e-12


@FUSIONS
def test_drawn_images_follow_the_likelihood_they_are_scored_with(fusion):
    """Monte Carlo: the frequency of each of the 16 images of a 2 x 2 draw matches exp(-nll)."""
    model = _model((1, 2, 2), fusion=fusion).double()
    z = torch.randn(1, 3, dtype=torch.float64)
    n = 20000
    g = torch.Generator().manual_seed(1)
    draws = sample_pixels(model.pixelcnn, model.decoder(z.expand(n, 3)), generator=g, probabilities=False)
    codes = (draws.reshape(n, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)).sum(1).long()
    freq = torch.bincount(codes, minlength=16).double() / n
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64).reshape(16, 1, 2, 2)
    p = torch.exp(-decode_nll(model, images, z.expand(1, 16, 3))[0])
    se = torch.sqrt(p * (1 - p) / n)
    assert ((freq - p).abs() <= 5 * se + 1e-9).all(), (freq, p)


@FUSIONS
def test_sampling_probabilities_equal_the_teacher_forced_logits(fusion):
    """Each pixel's probability during the pixel-by-pixel draw (computed on the rows so far)
    equals sigmoid of the one-pass logits on the finished draw. 9 rows, 2 layers (an output
    reads 4 rows above its own): the band of rows computed per pixel is cut at the top."""
    model = _model((2, 9, 4), layers=2, fusion=fusion)
    assert model.pixelcnn.rows_above == 4
    cond = model.decoder(torch.randn(3, 3))
    g = torch.Generator().manual_seed(0)
    probs = sample_pixels(model.pixelcnn, cond, generator=g)
    g.manual_seed(0)
    draw = sample_pixels(model.pixelcnn, cond, generator=g, probabilities=False)
    assert set(draw.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(probs, torch.sigmoid(model.pixelcnn(draw, cond)), rtol=1e-5, atol=1e-6)


def test_sampled_images_do_not_depend_on_the_chunk_size(monkeypatch):
    """VAE.sample decodes in chunks bounded by MAX_SAMPLE_NUMEL: with a PixelCNN head the
    images of one seed are the same whatever the chunk size, and are generate()'s images
    of the same z with the pixels' uniform numbers drawn next (and the pixels are the
    uniforms below the teacher-forced probabilities)."""
    import vaekit.models

    model = _model((1, 4, 4), layers=2)
    n = 5
    whole = model.sample(n, generator=torch.Generator().manual_seed(3))
    assert n * model.decode_numel <= vaekit.models.MAX_SAMPLE_NUMEL  # one chunk above
    for chunk in (1, 2):
        monkeypatch.setattr(vaekit.models, "MAX_SAMPLE_NUMEL", chunk * model.decode_numel)
        assert max(1, vaekit.models.MAX_SAMPLE_NUMEL // model.decode_numel) == chunk < n
        # the same draws: the probabilities differ only by the rounding of smaller batches
        torch.testing.assert_close(model.sample(n, generator=torch.Generator().manual_seed(3)), whole,
                                   rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 3, generator=g)
    u = torch.rand(n, 1, 4, 4, generator=g)
    g2 = torch.Generator().manual_seed(3)
    torch.testing.assert_close(model.generate(torch.randn(n, 3, generator=g2), generator=g2), whole, rtol=0, atol=0)
    cond = model.decoder(z)
    draw = sample_pixels(model.pixelcnn, cond, uniforms=u, probabilities=False)
    with torch.no_grad():
        p = torch.sigmoid(model.pixelcnn(draw, cond))
    assert torch.equal(draw, (u < p).to(draw.dtype))
    torch.testing.assert_close(whole, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"uniforms must have cond's shape \(5, 1, 4, 4\), got \(5, 16\)"):
        sample_pixels(model.pixelcnn, cond, uniforms=u.reshape(n, 16))


@FUSIONS
def test_untrained_head_is_the_plain_decoder(fusion):
    ar = _model((1, 6, 6), trained_head=False, fusion=fusion)
    plain = VAE(ModelConfig(arch="mlp", input_shape=(1, 6, 6), latent_dim=3, hidden=(16,)))
    plain.load_state_dict({k: v for k, v in ar.state_dict().items() if not k.startswith("pixelcnn.")})
    x = torch.rand(4, 1, 6, 6).bernoulli()
    z = torch.randn(4, 3)
    torch.testing.assert_close(ar.decode(z, x), plain.decode(z))


@FUSIONS
def test_importance_weighted_estimate_with_an_autoregressive_decoder(fusion):
    """One log weight is log p(x|z) + log p(z) - log q(z|x) (torch.distributions); the
    k-sample estimate lies above the ELBO; chunking does not change it."""
    model = _model((1, 5, 5), fusion=fusion).double()
    x = torch.rand(6, 1, 5, 5, dtype=torch.float64).bernoulli()
    mu, logvar = model.encode_params(x)
    eps = torch.randn(1, 6, 3, dtype=torch.float64)
    log_w, nll = log_weights_from_noise(model, x, mu, logvar, eps)
    z = mu + torch.exp(0.5 * logvar) * eps[0]
    q = torch.distributions.Independent(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), 1)
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros_like(mu), 1.0), 1)
    log_p_x_z = -model.nll(model.decode(z, x), x)
    torch.testing.assert_close(log_w[0], log_p_x_z + prior.log_prob(z) - q.log_prob(z))
    torch.testing.assert_close(nll[0], -log_p_x_z)
    g = torch.Generator().manual_seed(0)
    ll = iw_log_likelihood(model, x, 200, generator=g, chunk_size=7)
    g.manual_seed(0)
    ll_auto = iw_log_likelihood(model, x, 200, generator=g)
    torch.testing.assert_close(ll, ll_auto)
    terms = elbo_terms(model, x, n_samples=200, generator=torch.Generator().manual_seed(1))
    assert (ll > terms["elbo"]).all()


@FUSIONS
def test_static_step_trains_the_autoregressive_model_like_a_hand_written_step(fusion):
    torch.manual_seed(0)
    model = _model((1, 5, 5), fusion=fusion)
    twin = copy.deepcopy(model)
    opt, opt_twin = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)
    step = StaticStep(model, opt, batch_size=4)
    for _ in range(3):
        x, eps = torch.rand(4, 1, 5, 5).bernoulli(), torch.randn(4, 3)
        step.run(x, eps, 1e-2, 1.0)
        mu, logvar = twin.encode_params(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        loss = (twin.nll(twin.decode(z, x), x) + gaussian_kl(mu, logvar)).mean()
        opt_twin.zero_grad()
        loss.backward()
        opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_generate_sample_reconstruct_and_errors():
    model = _model((1, 4, 4))
    x = torch.rand(3, 1, 4, 4).bernoulli()
    g = torch.Generator().manual_seed(0)
    s = model.sample(5, generator=g)
    assert s.shape == (5, 1, 4, 4) and ((s >= 0) & (s <= 1)).all()
    g.manual_seed(0)
    torch.testing.assert_close(model.sample(5, generator=g), s)  # seeded: repeatable
    assert model.reconstruct(x).shape == x.shape
    assert model.decode_numel > math.prod(model.config.input_shape)
    with pytest.raises(ValueError, match="x is required"):
        model.decode(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x has shape \(2, 1, 4, 5\)"):
        model.decode(torch.randn(2, 3), torch.zeros(2, 1, 4, 5))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"pixelcnn_layers": -1}, "pixelcnn_layers"),
        ({"pixelcnn_layers": 2, "pixelcnn_width": 0}, "pixelcnn_width"),
        ({"pixelcnn_layers": 2, "input_shape": (784,)}, "input_shape"),
        ({"pixelcnn_layers": 2, "likelihood": "gaussian"}, "likelihood"),
        ({"pixelcnn_layers": 2, "pixelcnn_fusion": "middle"}, "pixelcnn_fusion"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


@FUSIONS
def test_head_alone_runs_on_rows_cut_off_at_the_bottom(fusion):
    head = PixelCNNHead(1, 4, 3, torch.nn.ReLU, fusion)
    torch.nn.init.normal_(head.out.weight)
    x, cond = torch.rand(2, 1, 6, 6).bernoulli(), torch.randn(2, 1, 6, 6)
    full = head.run(x, cond, head.condition(cond))
    cut = head.run(x[:, :, :3], cond[:, :, :3], [f[:, :, :3] for f in head.condition(cond)])
    torch.testing.assert_close(cut, full[:, :, :3])


@FUSIONS
def test_decoding_k_samples_at_once_equals_decoding_each_with_x_repeated(fusion):
    """decode_samples (which evaluation uses, and which reads the pixels once per image
    under late fusion) gives the logits of decode on x repeated k times, in z's order."""
    model = _model((1, 6, 5), layers=3, fusion=fusion).double()
    k, b = 4, 3
    x = torch.rand(b, 1, 6, 5, dtype=torch.float64).bernoulli()
    z = torch.randn(k, b, 3, dtype=torch.float64)
    xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, 1, 6, 5)
    torch.testing.assert_close(model.decode_samples(z, x), model.decode(z.reshape(k * b, 3), xs), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"x has shape \(2, 1, 6, 5\)"):
        model.decode_samples(z, x[:2])
    plain = VAE(ModelConfig(arch="mlp", input_shape=(1, 6, 5), latent_dim=3, hidden=(16,)))
    torch.testing.assert_close(plain.decode_samples(z.float(), x.float()), plain.decode(z.float().reshape(k * b, 3)))


def test_late_fusion_runs_the_masked_layers_once_per_image():
    model = _model((1, 6, 6), fusion="late")
    calls = []
    model.pixelcnn.masked[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    x = torch.rand(3, 1, 6, 6).bernoulli()
    with torch.no_grad():
        decode_nll(model, x, torch.randn(50, 3, 3))
    assert calls == [3]  # not 150
    assert len(model.pixelcnn.cond) == 0 and len(_model(fusion="early").pixelcnn.cond) == 3


def test_late_fusion_mixes_the_decoder_logits_over_each_window():
    """The late head's logits equal cond + offset + sum_t weight_t * (cond shifted by t),
    the shifts computed here by convolutions with one-hot 3 x 3 kernels."""
    model = _model((2, 5, 4), fusion="late").double()
    head = model.pixelcnn
    x = torch.rand(3, 2, 5, 4, dtype=torch.float64).bernoulli()
    cond = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    m = head.mixing(x)  # [B, C, 10, H, W]
    assert m.shape == (3, 2, 10, 5, 4)
    expected = cond + m[:, :, 9]
    for t in range(9):
        kernel = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
        kernel.view(2, 9)[:, t] = 1.0
        shifted = torch.nn.functional.conv2d(cond, kernel, padding=1, groups=2)  # cond at offset t, per channel
        expected = expected + m[:, :, t] * shifted
    torch.testing.assert_close(head(x, cond), expected, rtol=1e-12, atol=1e-12)


def test_chunked_evaluation_reads_the_pixels_once_per_batch_under_late_fusion():
    model = _model((1, 5, 5), fusion="late").double()
    calls = []
    model.pixelcnn.masked[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    x = torch.rand(6, 1, 5, 5, dtype=torch.float64).bernoulli()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ll = iw_log_likelihood(model, x, 40, generator=g, chunk_size=3, batch_size=4)
    assert calls == [4, 2]  # once per batch, not once per chunk of samples
    g.manual_seed(0)
    with torch.no_grad():
        ll_whole = iw_log_likelihood(model, x, 40, generator=g, chunk_size=40, batch_size=4)
    torch.testing.assert_close(ll, ll_whole)
    # With gradients on, nothing is shared (the shared maps would carry no gradient of their own).
    calls.clear()
    model.train(False)
    with model.sharing_pixels(x):
        decode_nll(model, x, torch.randn(2, 6, 3, dtype=torch.float64))
        decode_nll(model, x, torch.randn(2, 6, 3, dtype=torch.float64))
    assert calls == [6, 6]


def _causal_mask(k: int, centre: int) -> torch.Tensor:
    """Rows above the centre, and the centre row left of it (and the centre with ``centre``)."""
    m = torch.zeros(k, k)
    m[: k // 2] = 1
    m[k // 2, : k // 2 + centre] = 1
    return m


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_the_head_is_its_documented_network(fusion):
    """The head's forward pass rebuilt from F.conv2d, masks written here and F.unfold: a
    7x7 mask-A layer, 3x3 mask-B layers with residual connections, the 1x1 output layer,
    added to the decoder's logits (early) or mixing them over each 3x3 window (late).
    The causality, normalisation and sampling tests hold for any masked network; this
    pins the one vaekit documents (saved models compute it)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    head = PixelCNNHead(2, 5, 3, torch.nn.ELU, fusion=fusion)
    torch.nn.init.normal_(head.out.weight)
    torch.nn.init.normal_(head.out.bias)
    x, cond = torch.rand(2, 2, 6, 5).bernoulli(), torch.randn(2, 2, 6, 5)
    first = head.masked[0]
    h = F.conv2d(x, first.weight * _causal_mask(7, 0), first.bias, padding=3)
    h = F.elu(h + F.conv2d(cond, head.cond[0].weight, head.cond[0].bias, padding=1) if fusion == "early" else h)
    for i, layer in enumerate(head.masked[1:], 1):
        a = F.conv2d(h, layer.weight * _causal_mask(3, 1), layer.bias, padding=1)
        if fusion == "early":
            a = a + F.conv2d(cond, head.cond[i].weight, head.cond[i].bias, padding=1)
        h = h + F.elu(a)
    o = F.conv2d(h, head.out.weight, head.out.bias)
    if fusion == "early":
        want = cond + o
    else:
        o = o.reshape(2, 2, 10, 6, 5)  # per channel: 9 window weights and an offset
        window = F.unfold(cond, 3, padding=1).reshape(2, 2, 9, 6, 5)
        want = cond + o[:, :, 9] + (o[:, :, :9] * window).sum(2)
    torch.testing.assert_close(head(x, cond), want, rtol=1e-5, atol=1e-5)
