"""fused_vae_loss against the eager reference vaekit.losses.VAELoss.

The Triton-path tests (marked ``triton_path`` by ``interpreted``) run on the GPU where
there is CUDA, elsewhere under Triton's interpreter in a subprocess (tests/triton_harness.py).
The fallback tests run in both.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from triton_harness import (CHILD, NATIVE, compile_for_hopper, interpreted, run_file_interpreted,  # noqa: F401
                            triton_path_device)

from vaekit import kernels
from vaekit.kernels import (bias_grad, fused_available, fused_bias_grad, fused_linear, fused_posterior_sample,
                            fused_vae_loss, fused_vae_loss_grads, posterior_sample)
from vaekit.losses import REDUCTIONS, VAELoss


def _cpu_rand(shape, generator):
    """Seeded uniform numbers, the same on every machine, on the default device."""
    return torch.rand(shape, generator=generator, device="cpu").to(torch.empty(0).device)


def _cpu_randn(shape, generator):
    return torch.randn(shape, generator=generator, device="cpu").to(torch.empty(0).device)
GAUSS_LOGVAR = -0.7


def _inputs(B, D, d, *, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = _cpu_rand((B, D), generator=g)
    x[: B // 2] = x[: B // 2].round()  # binary and grey-level targets
    out = (scale * _cpu_randn((B, D), generator=g)).to(dtype).requires_grad_()
    mu = _cpu_randn((B, d), generator=g).requires_grad_()
    logvar = _cpu_randn((B, d), generator=g).requires_grad_()
    return x, out, mu, logvar


def _is_fused(result) -> bool:
    return "_FusedVAELoss" in type(result.reconstruction.grad_fn).__name__


def _both(x, out, mu, logvar, *, beta=1.0, reconstruction="bernoulli", reduction="mean"):
    fused = fused_vae_loss(x, out, mu, logvar, beta=beta, reconstruction=reconstruction,
                           reduction=reduction, gaussian_logvar=GAUSS_LOGVAR)
    ref = VAELoss(beta, reconstruction, reduction, logvar=GAUSS_LOGVAR)(x, out, mu, logvar)
    return fused, ref


def _grads(result, inputs, weights):
    """Gradients of sum_k <w_k, output_k>: None weights leave that output out of the graph."""
    total = sum((t * w).sum() for t, w in zip(result, weights) if w is not None)
    return torch.autograd.grad(total, inputs, allow_unused=True)


def _assert_same(fused, ref, rtol=1e-5, atol=1e-5):
    for a, b in zip(fused, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _assert_grads_same(ga, gb, rtol=1e-5, atol=1e-6):
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ always run


@pytest.mark.skipif(kernels._INTERPRETED, reason="this process runs Triton's interpreter on CPU")
@pytest.mark.parametrize("reconstruction", ["bernoulli", "gaussian", "mse", "continuous_bernoulli"])
def test_cpu_falls_back_to_eager_bit_for_bit(reconstruction):
    assert not fused_available("cpu")
    torch.manual_seed(0)
    x, out, mu, logvar = _inputs(3, 10, 4)
    fused, ref = _both(x, out, mu, logvar, beta=2.0, reconstruction=reconstruction)
    assert not _is_fused(fused)
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
    weights = (torch.tensor(1.5), None, None)
    for a, b in zip(_grads(fused, (out, mu, logvar), weights), _grads(ref, (out, mu, logvar), weights)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reconstruction", ["bernoulli", "gaussian"])
def test_float64_inputs_run_the_eager_loss_and_stay_float64(reconstruction):
    """As fused_vae_loss's Returns says: not fp32 where the eager reference runs instead."""
    x, out, mu, logvar = (t.detach().double() for t in _inputs(3, 10, 4))
    fused, ref = _both(x, out, mu, logvar, beta=2.0, reconstruction=reconstruction)
    assert all(t.dtype == torch.float64 for t in fused) and all(torch.equal(a, b) for a, b in zip(fused, ref))


@pytest.mark.parametrize(
    "kwargs, shapes, match",
    [
        (dict(reduction="avg"), ((2, 3), (2, 3), (2, 4)), "reduction must be one of"),
        (dict(reconstruction="poisson"), ((2, 3), (2, 3), (2, 4)), "reconstruction must be one of"),
        ({}, ((2, 3), (2, 5), (2, 4)), r"x has shape \(2, 3\) but logits has shape \(2, 5\)"),
        ({}, ((2, 3), (2, 3), (3, 4)), "x has batch size 2 but mu has batch size 3"),
        (dict(reconstruction="gaussian", gaussian_logvar=-90.0), ((2, 3), (2, 3), (2, 4)),
         r"logvar must be a finite number >= -80 and <= 80, got -90.0"),
    ],
)
def test_errors_are_the_eager_errors(kwargs, shapes, match):
    x = torch.rand(shapes[0])
    with pytest.raises(ValueError, match=match):
        fused_vae_loss(x, torch.zeros(shapes[1]), torch.zeros(shapes[2]), torch.zeros(shapes[2]), **kwargs)


@pytest.mark.skipif(CHILD or NATIVE, reason="the interpreter's kernels are not compiled; a GPU runs them for real")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_kernels_compile_for_a_hopper_gpu(dtype):
    """The three loss kernels, compiled ahead of time for sm_90 on any machine (a change
    that only a GPU compile would refuse shows here), for each constexpr branch."""
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    data = f"*{dtype}"
    fwd = {"dec_ptr": data, "x_ptr": "*fp32", "grad_ptr": data, "part_ptr": "*fp32", "mu_ptr": data, "lv_ptr": data,
           "gmu_ptr": data, "glv_ptr": data, "kl_ptr": "*fp32", "D": "i32", "d": "i32", "chunk": "i32", "split": "i32",
           "gauss_logvar": "fp32", "inv_n": "fp32", "beta_ptr": "*fp32", "beta_value": "fp32"}
    fin = {"part_ptr": "*fp32", "kl_ptr": "*fp32", "beta_ptr": "*fp32", "beta_value": "fp32", "loss_ptr": "*fp32",
           "rec_ptr": "*fp32", "kl_out_ptr": "*fp32", "B": "i32", "split": "i32", "denom": "fp32"}
    bwd = {"grad_ptr": data, "gmu_ptr": data, "glv_ptr": data, "gl_ptr": "*fp32", "gr_ptr": "*fp32", "gk_ptr": "*fp32",
           "gl_stride": "i32", "gr_stride": "i32", "gk_stride": "i32", "beta_ptr": "*fp32", "beta_value": "fp32",
           "D": "i32", "d": "i32", "chunk": "i32"}
    for gaussian, kl_beta, beta_ptr in ((False, False, False), (True, False, True), (False, True, True),
                                        (True, True, False)):
        assert compile_for_hopper(kernels._fwd_kernel, fwd, dict(GAUSSIAN=gaussian, WRITE_GRAD=True, WRITE_KL_GRAD=True,
                                                                 KL_BETA=kl_beta, BETA_PTR=beta_ptr, BLOCK=2048,
                                                                 BLOCK_D=32))
    assert compile_for_hopper(kernels._fwd_kernel, fwd, dict(GAUSSIAN=False, WRITE_GRAD=False, WRITE_KL_GRAD=False,
                                                             KL_BETA=False, BETA_PTR=False, BLOCK=1024, BLOCK_D=16))
    for reduce, beta_ptr in ((True, True), (False, False)):
        assert compile_for_hopper(kernels._finalize_kernel, fin, dict(REDUCE=reduce, BETA_PTR=beta_ptr, BLOCK_B=1,
                                                                      BLOCK_S=4))
    for flags in ((True, True, True, True, True, True), (True, False, False, False, True, False)):
        names = ("HAS_GL", "HAS_GR", "HAS_GK", "BETA_PTR", "SCALE_REC", "SCALE_KL")
        assert compile_for_hopper(kernels._bwd_kernel, bwd, dict(zip(names, flags), BLOCK=2048, BLOCK_D=32))


@pytest.mark.skipif(CHILD or NATIVE, reason="the interpreter's kernels are not compiled; a GPU runs them for real")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_sample_kernels_compile_for_a_hopper_gpu(dtype):
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    data = f"*{dtype}"
    fwd = {"head_ptr": data, "eps_ptr": "*fp32", "mu_ptr": data, "lv_ptr": data, "z_ptr": "*fp32", "n": "i32",
           "d": "i32", "limit": "fp32"}
    bwd = {"head_ptr": data, "eps_ptr": "*fp32", "gz_ptr": "*fp32", "gmu_ptr": data, "glv_ptr": data,
           "ghead_ptr": data, "n": "i32", "d": "i32", "limit": "fp32"}
    assert compile_for_hopper(kernels._sample_fwd_kernel, fwd, dict(BLOCK=1024))
    for flags in ((True, True, True), (True, False, False), (False, True, True)):
        assert compile_for_hopper(kernels._sample_bwd_kernel, bwd, dict(zip(("GZ", "GMU", "GLV"), flags), BLOCK=1024))


def test_the_posterior_sample_is_encode_params_and_the_reparameterisation():
    """The eager reference: VAE.encode_params's (mu, logvar) from its head, and
    z = mu + sigma * eps, as torch.distributions' Normal.rsample computes it."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), latent_dim=3, hidden=(8,), logvar_limit=2.0))
    x, eps = torch.rand(5, 6), torch.randn(5, 3)
    mu, logvar, z = posterior_sample(model.encoder_head(x), eps, 2.0)
    mu_ref, logvar_ref = model.encode_params(x)
    assert torch.equal(mu, mu_ref) and torch.equal(logvar, logvar_ref)
    assert float(logvar.detach().abs().max()) < 2.0
    normal = torch.distributions.Normal(mu_ref, torch.exp(0.5 * logvar_ref))
    torch.testing.assert_close(z, normal.loc + normal.scale * eps)


def _posterior_inputs(B, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = (8 * _cpu_randn((B, 2 * d), generator=g)).to(dtype)
    special = torch.tensor([0.0, 1e-6, -200.0, 200.0, 3.0], dtype=dtype)[:d]  # 0, tiny, saturated
    head[0, d: d + len(special)] = special
    return head.requires_grad_(), _cpu_randn((B, d), generator=g)


@interpreted
@pytest.mark.parametrize("B, d", [(1, 1), (37, 5), (130, 20)])
@pytest.mark.parametrize("used", [(1, 1, 1), (0, 0, 1), (1, 0, 0), (0, 1, 1)])
def test_fused_posterior_sample_matches_float64(B, d, used):
    """Values and the head's gradient (through any of mu, logvar, z) against the eager
    formulas in float64: float32 rounding, also where tanh saturates and near 0."""
    head, eps = _posterior_inputs(B, d, torch.float32)
    fused = fused_posterior_sample(head, eps, 12.0)
    assert "_FusedPosteriorSample" in type(fused[2].grad_fn).__name__
    head64 = head.detach().double().requires_grad_()
    ref = posterior_sample(head64, eps.double(), 12.0)
    # z = mu + sigma eps sums terms up to ~1e3 (sigma up to e^6) that may cancel: each
    # output within float32 rounding of the size of what it sums
    sizes = (ref[0].abs(), ref[1].abs(), ref[0].abs() + (ref[2] - ref[0]).abs())
    for a, b, size in zip(fused, ref, sizes):
        assert a.dtype == torch.float32 and a.shape == (B, d)
        err = (a.double() - b).abs()
        assert bool((err <= 1e-6 * size + 1e-7).all()), float((err / (size + 1e-7)).max())
    g = torch.Generator().manual_seed(1)
    weights = [_cpu_randn((B, d), generator=g) if u else None for u in used]
    (got,) = _grads(fused, [head], weights)
    (want,) = _grads(ref, [head64], [w.double() if w is not None else None for w in weights])
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-5)


@interpreted
def test_fused_posterior_sample_in_bfloat16_is_the_float32_formula_rounded():
    """A bf16 head (bf16 autocast): mu and logvar come out in bf16, z in float32 (as the
    eager formulas' dtypes); each is the float32 computation from the same bf16 inputs,
    rounded once (to 1 bf16 unit here: Triton's interpreter truncates where a GPU rounds
    to nearest), not the eager chain of bf16 roundings."""
    head, eps = _posterior_inputs(33, 4, torch.bfloat16)
    mu, logvar, z = fused_posterior_sample(head, eps, 12.0)
    eager = posterior_sample(head, eps, 12.0)
    assert [t.dtype for t in (mu, logvar, z)] == [t.dtype for t in eager] == [torch.bfloat16, torch.bfloat16,
                                                                              torch.float32]
    ref = posterior_sample(head.detach().double(), eps.double(), 12.0)
    assert torch.equal(mu, head.detach()[:, :4])
    torch.testing.assert_close(logvar.double(), ref[1], rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(z.double(), ref[2], rtol=2e-6, atol=1e-5)


@interpreted
def test_fused_posterior_sample_falls_back_where_it_cannot_serve():
    head, eps = _posterior_inputs(4, 3, torch.float32)
    for h, e in ((head.detach().double().requires_grad_(), eps.double()),  # float64
                 (head.detach().unsqueeze(0).requires_grad_(), eps),  # not [B, 2d]
                 (head, eps[:1]),  # noise that broadcasts over the batch
                 (head, eps.expand(2, *eps.shape)),  # noise of two samples an example
                 (head, eps.clone().requires_grad_())):  # noise that wants a gradient
        out = fused_posterior_sample(h, e, 12.0)
        assert "_FusedPosteriorSample" not in type(out[2].grad_fn).__name__
        ref = posterior_sample(h, e, 12.0)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.skipif(CHILD or NATIVE, reason="the interpreter's kernels are not compiled; a GPU runs them for real")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_bias_gradient_kernel_compiles_for_a_hopper_gpu(dtype):
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    data = f"*{dtype}"
    sig = {"gy_ptr": data, "y_ptr": data, "g_ptr": data, "gb_ptr": data, "B": "i32", "N": "i32"}
    for relu in (False, True):
        assert compile_for_hopper(kernels._bias_grad_kernel, sig, dict(RELU=relu, BLOCK_B=128, BLOCK_N=32))


def _layer_inputs(B, n_in, n_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _cpu_randn((B, n_in), generator=g).to(dtype)
    w = (_cpu_randn((n_out, n_in), generator=g) / n_in**0.5).to(dtype)
    b = _cpu_randn((n_out,), generator=g).to(dtype)
    return x, w, b


def test_fused_linear_backward_passes_gradcheck():
    """The layer's backward formulas (the masked gradient, the bias gradient as its column
    sums, the two products) against finite differences in float64, where the bias
    gradient is the eager reference; ReLU's kink kept away from the test points."""
    x, w, b = (t.double().requires_grad_() for t in _layer_inputs(6, 5, 7))
    with torch.no_grad():
        y = torch.addmm(b, x, w.t())
        b += torch.where(y.abs().min(0).values < 0.05, 0.1, 0.0)  # no output within 0.05 of the kink
    for relu in (False, True):
        assert torch.autograd.gradcheck(lambda x, w, b: fused_linear(x, w, b, relu), (x, w, b))


def test_fused_linear_refuses_a_second_derivative_in_words():
    """Its backward has no graph: create_graph=True gave a gradient cut from the inputs, and
    a gradient penalty through it failed far away ("element 0 of tensors does not require
    grad") or came out 0."""
    x, w, b = (t.double().requires_grad_() for t in _layer_inputs(4, 3, 5))
    with pytest.raises(RuntimeError, match=r"^fused_linear can be differentiated once: its gradient has no graph "
                                           r"\(create_graph=True\); for second derivatives use torch\.nn\.functional\.linear$"):
        torch.autograd.grad(fused_linear(x, w, b, True).square().sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(fused_linear(x, w, b, True).square().sum(), x)  # first order: as F.linear's
    (ref,) = torch.autograd.grad(torch.relu(torch.nn.functional.linear(x, w, b)).square().sum(), x)
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relu", [False, True])
def test_fused_linear_is_linear_and_relu(relu):
    """Values and gradients as nn.Linear (+ nn.ReLU): the same products, so equal where
    the bias gradient is the eager column sum (here: no Triton path on a CPU process)."""
    x, w, b = _layer_inputs(9, 6, 5)
    lin = torch.nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = fused_linear(xa, lin.weight, lin.bias, relu)
    want = torch.relu(lin(xb)) if relu else lin(xb)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    gy = torch.randn(9, 5)
    ga = torch.autograd.grad(got, [xa, lin.weight, lin.bias], gy)
    gb = torch.autograd.grad(want, [xb, lin.weight, lin.bias], gy)
    for a, c in zip(ga, gb):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", ["float32", "bfloat16 copies"])
def test_fused_linear_under_autocast_is_what_autocast_computes(weights):
    """Under bf16 autocast: the layer's values and all three gradients (float32 leaves
    through the casts, or bfloat16 leaves as the static step's weight copies) equal
    autocast's nn.Linear + ReLU."""
    x, w, b = _layer_inputs(6, 5, 4)
    if weights != "float32":
        w, b = w.to(torch.bfloat16), b.to(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    twins = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear(*leaves, True)
        want = torch.relu(torch.nn.functional.linear(*twins))
    assert "FusedLinear" in type(got.grad_fn).__name__
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    gy = torch.randn(6, 4).to(torch.bfloat16)
    for a, c in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, twins, gy)):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, rtol=2**-7, atol=1e-6)  # the bias gradient: one bf16 sum order


def test_fused_linear_leaves_odd_inputs_to_f_linear():
    x, w, b = _layer_inputs(4, 3, 2)
    w.requires_grad_()
    for args in ((x.unsqueeze(0), w, b), (x, w, None)):
        y = fused_linear(*args, relu=True)
        assert "FusedLinear" not in type(y.grad_fn).__name__
        assert torch.equal(y, torch.relu(torch.nn.functional.linear(*args)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64: autocast casts none of it, nor do we
        args = (x.double(), w.double(), b.double())
        y = fused_linear(*args, relu=True)
        assert y.dtype == torch.float64 and torch.equal(y, torch.relu(torch.nn.functional.linear(*args)))
    with pytest.raises(RuntimeError, match="dtype"):  # F.linear's own error
        fused_linear(x.double(), w, b)


class _LoggedStream:
    """Stands for a CUDA stream on a CPU: logs the fork and the join."""

    def __init__(self, log, name, device="cpu"):
        self.log, self.name, self.device = log, name, torch.device(device)

    def wait_stream(self, other):
        self.log.append((self.name, "waits for", other.name))


def _mlp_grads(aside_stream=None, accumulate=False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)]
    x = torch.randn(4, 5)
    if accumulate:
        for lin in layers:
            lin.weight.grad = torch.ones_like(lin.weight)
    with kernels.weight_grads_aside(aside_stream):
        y = fused_linear(fused_linear(x, layers[0].weight, layers[0].bias, True), layers[1].weight, layers[1].bias)
        (y * torch.arange(3.0)).sum().backward()
    return [(lin.weight.grad, lin.bias.grad) for lin in layers]


@pytest.mark.parametrize("accumulate", [False, True])
def test_weight_gradients_aside_are_the_same_gradients(monkeypatch, accumulate):
    """Inside weight_grads_aside each layer writes its weight's gradient itself (on the
    aside stream, after it has waited for the current one) and returns none, so autograd
    adds nothing twice; the streams join on leaving. CUDA streams are stood in for on a
    CPU (the GPU tests run the real ones, captured)."""
    log = []
    current = _LoggedStream(log, "current")
    monkeypatch.setattr(kernels, "_current_stream", lambda device: current)
    monkeypatch.setattr(kernels, "_on_stream", lambda stream: (log.append(("on", stream.name)), contextlib.nullcontext())[1])
    want = _mlp_grads(accumulate=accumulate)
    assert log == []  # no stream: the plain backward
    got = _mlp_grads(_LoggedStream(log, "aside"), accumulate=accumulate)
    for (gw, gb), (ww, wb) in zip(got, want):
        torch.testing.assert_close(gw, ww, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gb, wb, rtol=1e-6, atol=1e-7)
    fork, product = ("aside", "waits for", "current"), ("on", "aside")
    assert log == [fork, product, fork, product, ("current", "waits for", "aside")]
    assert getattr(kernels._local, "aside", None) is None


def test_only_layers_made_inside_send_their_weight_gradients_aside(monkeypatch):
    """A layer whose forward pass ran outside the context returns its weight's gradient to
    autograd as usual, even when its backward pass runs inside; an error inside the
    context still joins the streams and is the one raised."""
    log = []
    monkeypatch.setattr(kernels, "_current_stream", lambda device: _LoggedStream(log, "current"))
    monkeypatch.setattr(kernels, "_on_stream", lambda stream: (log.append(("on", stream.name)), contextlib.nullcontext())[1])
    lin = torch.nn.Linear(3, 2)
    y = fused_linear(torch.randn(4, 3), lin.weight, lin.bias, True)
    with kernels.weight_grads_aside(_LoggedStream(log, "aside")):
        y.sum().backward()
    assert ("on", "aside") not in log and lin.weight.grad is not None
    log.clear()
    with pytest.raises(KeyError, match="raised inside"):
        with kernels.weight_grads_aside(_LoggedStream(log, "aside")):
            raise KeyError("raised inside")
    assert log == [("current", "waits for", "aside")] and getattr(kernels._local, "aside", None) is None


def test_the_relu_mask_is_relus_own_where_outputs_are_nan():
    """ReLU's backward zeroes the gradient where the output is <= 0 and passes it where
    the output is NaN; so does the fused layer's (eagerly here; the kernel in the
    interpreter's test below)."""
    x, w, b = _layer_inputs(5, 3, 4)
    x[1, 0] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    twins = [t.clone().requires_grad_() for t in (x, w, b)]
    got = fused_linear(*leaves, True)
    want = torch.relu(torch.nn.functional.linear(*twins))
    assert bool(got[1].isnan().all()) and torch.equal(got.isnan(), want.isnan())
    gy = torch.randn(5, 4)
    for a, c in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, twins, gy)):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA streams (run by benchmarks/gpu.sh)")
def test_weight_gradients_aside_on_a_cuda_stream(monkeypatch):
    """The real streams, with the aside stream held back (a sleep before each product):
    without the join, or with the tensors it reads freed early, the gradients read after
    the context would be wrong or incomplete."""
    on_stream = kernels._on_stream

    @contextlib.contextmanager
    def late(stream):
        with on_stream(stream):
            torch.cuda._sleep(20_000_000)  # ~10 ms of the aside stream before the product
            yield

    monkeypatch.setattr(kernels, "_on_stream", late)
    torch.cuda.synchronize()
    with torch.device("cuda"):
        want = _mlp_grads()
        got = _mlp_grads(torch.cuda.Stream())
        torch.randn(1 << 20).mul_(2)  # new allocations on the current stream after the context
    for a, b in zip(got, want):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@interpreted
@pytest.mark.parametrize("B, N", [(1, 1), (37, 45), (128, 40), (130, 17)])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_bias_grad_matches_float64(B, N, relu):
    """The masked gradient exactly, its column sums within float32 rounding of float64,
    over row and column counts that do and do not fill the kernel's blocks; ReLU outputs
    of exactly 0 mask (as ReLU's own backward, which masks y <= 0)."""
    g = torch.Generator().manual_seed(B + N)
    gy = _cpu_randn((B, N), generator=g) * 3
    y = torch.relu(_cpu_randn((B, N), generator=g)) if relu else None
    masked, gb = fused_bias_grad(gy, y)
    want = gy if y is None else torch.where(y > 0, gy, torch.zeros_like(gy))
    assert torch.equal(masked, want)
    ref = want.double().sum(0)
    size = want.double().abs().sum(0)
    assert gb.dtype == gy.dtype and gb.shape == (N,)
    assert bool(((gb.double() - ref).abs() <= 2e-7 * size + 1e-12).all())
    eager = bias_grad(gy, y)
    torch.testing.assert_close(gb, eager[1], rtol=1e-5, atol=1e-5)


@interpreted
def test_fused_bias_grad_masks_as_relus_backward():
    """Zero where the ReLU output is <= 0 (an exact 0 included), the gradient kept where it
    is NaN, as ReLU's own backward."""
    gy = _cpu_randn((6, 5), generator=torch.Generator().manual_seed(7))
    y = torch.relu(_cpu_randn((6, 5), generator=torch.Generator().manual_seed(8)))
    y[0, :3] = float("nan")
    masked, gb = fused_bias_grad(gy, y)
    want = torch.ops.aten.threshold_backward(gy, y, 0.0)
    assert torch.equal(masked, want)
    torch.testing.assert_close(gb, want.sum(0), rtol=1e-6, atol=1e-6)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_bias_grad_masks_negative_outputs_and_minus_zero_in_every_dtype(dtype):
    """y <= 0 compared as a number in every dtype (the interpreter compared bfloat16 by its
    bits: a negative output, or -0.0, passed its gradient)."""
    gy = _cpu_randn((5, 4), generator=torch.Generator().manual_seed(3)).to(dtype)
    y = _cpu_randn((5, 4), generator=torch.Generator().manual_seed(4)).to(dtype)
    y[0, 0], y[1, 1] = -0.0, 0.0
    masked, gb = fused_bias_grad(gy, y)
    want = torch.ops.aten.threshold_backward(gy, y, 0.0)
    assert torch.equal(masked, want)
    torch.testing.assert_close(gb.float(), want.float().sum(0), rtol=1e-2, atol=1e-2)


@interpreted
def test_fp16_gradients_survive_a_loss_scale_as_in_eager():
    """fp16 logits under a GradScaler-like factor: the forward's saved gradients stay in
    float32 until the factor reaches them (stored in fp16 and times 1/B first, the small
    ones were flushed to 0: sigmoid(-14) / 128 is below fp16's smallest subnormal)."""
    x = torch.zeros(128, 1, dtype=torch.float16)
    mu, logvar = torch.zeros(128, 1), torch.zeros(128, 1)
    grads = []
    for loss_fn in (fused_vae_loss, lambda *a: VAELoss()(*a)):
        out = torch.full((128, 1), -14.0, dtype=torch.float16).requires_grad_()
        (loss_fn(x, out, mu, logvar).loss * 65536).backward()
        grads.append(out.grad)
    assert grads[0].dtype == torch.float16 and torch.equal(grads[0], grads[1])
    want = torch.sigmoid(torch.tensor(-14.0, dtype=torch.float64)) / 128 * 65536
    torch.testing.assert_close(grads[0].double(), torch.full((128, 1), float(want), dtype=torch.float64), rtol=1e-3,
                               atol=0)


@interpreted
def test_a_loss_the_kernels_cannot_take_falls_back_in_the_static_step():
    """A Gaussian decoder whose fixed log-variance is a NumPy float: the step's loss goes to
    the eager reference (the kernels take Python numbers), and the step still trains what
    the eager step trains."""
    import copy

    import numpy as np

    from vaekit.fast import StaticStep
    from vaekit.losses import gaussian_kl
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(8,), likelihood="gaussian",
                            fixed_logvar=np.log(0.5)))
    twin = copy.deepcopy(model)
    device = torch.empty(0).device
    kw = {"capturable": True, "lr": torch.tensor(1e-2)} if device.type == "cuda" else {"lr": 1e-2}
    opt, opt_twin = torch.optim.Adam(model.parameters(), **kw), torch.optim.Adam(twin.parameters(), lr=1e-2)
    step = StaticStep(model, opt, batch_size=4)
    assert step._fused
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, eps = _cpu_rand((4, 6), generator=g), _cpu_randn((4, 2), generator=g)
        step.run(x, eps, 1e-2, 1.0)
        mu, logvar = twin.encode_params(x)
        loss = (twin.nll(twin.decode(mu + torch.exp(0.5 * logvar) * eps), x) + gaussian_kl(mu, logvar)).mean()
        opt_twin.zero_grad()
        loss.backward()
        opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@interpreted
def test_fused_bias_grad_in_bfloat16_sums_in_float32():
    g = torch.Generator().manual_seed(3)
    gy = _cpu_randn((64, 24), generator=g).to(torch.bfloat16)
    y = torch.relu(_cpu_randn((64, 24), generator=g)).to(torch.bfloat16)
    masked, gb = fused_bias_grad(gy, y)
    assert masked.dtype == gb.dtype == torch.bfloat16
    assert torch.equal(masked, torch.where(y > 0, gy, torch.zeros_like(gy)))
    ref = masked.double().sum(0)
    torch.testing.assert_close(gb.double(), ref, rtol=2**-7, atol=1e-6)  # one bf16 rounding of the float32 sum


@interpreted
@pytest.mark.parametrize("relu", [False, True])
def test_fused_linear_matches_float64(relu):
    """The whole layer where Triton runs: values and the three gradients against the
    layer in float64."""
    x, w, b = _layer_inputs(37, 20, 45, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = fused_linear(*leaves, relu)
    assert "FusedLinear" in type(y.grad_fn).__name__
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    y64 = torch.nn.functional.linear(*leaves64)
    y64 = torch.relu(y64) if relu else y64
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    gy = _cpu_randn(tuple(y.shape), generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(y64, leaves64, gy.double())
    for a, c in zip(got, want):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5)


@interpreted
def test_fused_bias_grad_falls_back_where_it_cannot_serve():
    gy = _cpu_randn((5, 4), generator=torch.Generator().manual_seed(0))
    for args in ((gy.double(), None), (gy.unsqueeze(0), None), (gy, gy[:4])):
        if args[0].dim() == 2 and args[1] is not None:
            with pytest.raises(RuntimeError):  # the reference's own error for mismatched shapes
                fused_bias_grad(*args)
            continue
        got, want = fused_bias_grad(*args), bias_grad(*args)
        assert all(torch.equal(a, c) for a, c in zip(got, want))


@pytest.mark.skipif(CHILD, reason="this is the child process")
@pytest.mark.skipif(NATIVE, reason="CUDA is here: the Triton-path tests ran on the GPU in this process")
def test_triton_interpreter():
    run_file_interpreted(__file__)


# ------------------------------------------------------------------ Triton path (child only)

# D is never a multiple of a block size; B=64 costs the interpreter ~1 s per call (one
# Python-level program per row), so it gets one likelihood and one reduction each.
CASES = [
    (rec, *shape)
    for rec in ("bernoulli", "gaussian")
    for shape in [(1, 1, 1), (3, 7, 5), (1, 1000, 32), (3, 784, 1)]
] + [("bernoulli", 64, 784, 5), ("gaussian", 64, 7, 32)]


@interpreted
@pytest.mark.parametrize("reconstruction, B, D, d", CASES)
def test_values_and_grads_match_eager(reconstruction, B, D, d):
    reductions = REDUCTIONS if B < 64 else [REDUCTIONS[(D + len(reconstruction)) % 3]]
    for i, reduction in enumerate(reductions):
        x, out, mu, logvar = _inputs(B, D, d, seed=i)
        beta = 0.3 + i if i % 2 else torch.tensor(2.5)
        fused, ref = _both(x, out, mu, logvar, beta=beta, reconstruction=reconstruction, reduction=reduction)
        assert _is_fused(fused)
        _assert_same(fused, ref)
        # random upstream gradients into all three outputs: the in-place rescale path
        g = torch.Generator().manual_seed(10 + i)
        weights = [_cpu_rand(ref.loss.shape, generator=g) for _ in range(3)]
        inputs = (out, mu, logvar)
        _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


def _loss_and_grads(fn, x, out, mu, logvar, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (out, mu, logvar)]
    res = fn(x, *leaves, **kw)
    return res, torch.autograd.grad(res.loss, leaves)


@interpreted
@pytest.mark.parametrize("reconstruction", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("beta", [0.25, "tensor"])
def test_loss_grads_from_the_forward_are_the_backward_gradients(reconstruction, reduction, beta):
    """fused_vae_loss_grads: the same values as fused_vae_loss (the same kernels), and
    the gradients its autograd backward gives, the KL's already times beta."""
    x, out, mu, logvar = _inputs(5, 70, 4)
    beta = torch.tensor(3.5) if beta == "tensor" else beta
    kw = dict(beta=beta, reconstruction=reconstruction, reduction=reduction, gaussian_logvar=GAUSS_LOGVAR)
    res, grads = fused_vae_loss_grads(x, out.detach(), mu.detach(), logvar.detach(), **kw)
    ref, want = _loss_and_grads(fused_vae_loss, x, out, mu, logvar, **kw)
    for a, b in zip(res, ref):
        assert torch.equal(a, b.detach()) and not a.requires_grad
    for a, b in zip(grads, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_loss_grads_fall_back_without_touching_the_graph_above():
    """In the fallback the gradients are taken with respect to copies: the graph that made
    decoder_out, mu and logvar (here out depends on mu, as in a VAE through z) is neither
    run nor freed, and one backward from the three with these gradients gives what
    loss.backward() gives."""
    torch.manual_seed(0)
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 12, dtype=torch.float64)

    def graph():
        mu, logvar = h[:, :3] * 1.5, h[:, 3:] * 0.5
        out = (torch.cat([mu, logvar], 1) @ w)
        return out, mu, logvar

    x = torch.rand(4, 12, dtype=torch.float64).round()
    out, mu, logvar = graph()
    res, grads = fused_vae_loss_grads(x, out, mu, logvar, beta=2.0)
    torch.autograd.backward((out, mu, logvar), grads)
    got, h.grad = h.grad, None
    out, mu, logvar = graph()
    VAELoss(2.0, "bernoulli", "mean")(x, out, mu, logvar).loss.backward()
    torch.testing.assert_close(got, h.grad, rtol=1e-12, atol=1e-12)


def test_loss_grads_fall_back_to_autograd_of_the_reference():
    """Where no kernel runs (here: a CPU process without the interpreter, or float64),
    the eager VAELoss and autograd; a vector loss is refused."""
    x, out, mu, logvar = (t.double() for t in _inputs(4, 12, 3))
    kw = dict(beta=2.0, reconstruction="bernoulli", reduction="mean")
    res, grads = fused_vae_loss_grads(x, out.detach(), mu.detach(), logvar.detach(), **kw)
    ref, want = _loss_and_grads(VAELoss(2.0, "bernoulli", "mean"), x, out, mu, logvar)
    assert all(torch.equal(a, b.detach()) for a, b in zip(res, ref))
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fused_vae_loss_grads(x, out, mu, logvar, reduction="none")


@interpreted
@pytest.mark.parametrize("reconstruction, B, D, d", [("bernoulli", 3, 784, 5), ("gaussian", 2, 1000, 3),
                                                     ("bernoulli", 1, 17, 2), ("gaussian", 1, 2100, 3)])
def test_tile_plan_matches_eager(reconstruction, B, D, d, monkeypatch):
    # PLAN="tiles": one program per block of a row's columns (benchmarks/loss_bench.py
    # times it against "rows"); the same values and gradients, whatever the warps
    monkeypatch.setattr(kernels, "PLAN", "tiles")
    monkeypatch.setattr(kernels, "NUM_WARPS", 2)
    split, chunk, _, _ = kernels._plan(B, D, torch.empty(0).device)
    assert split == -(-D // chunk) and (split > 1) == (D > kernels.TILE)
    for reduction in REDUCTIONS:
        x, out, mu, logvar = _inputs(B, D, d, seed=3)
        fused, ref = _both(x, out, mu, logvar, beta=0.7, reconstruction=reconstruction, reduction=reduction)
        assert _is_fused(fused)
        _assert_same(fused, ref)
        weights = (_cpu_rand(ref.loss.shape, generator=torch.Generator().manual_seed(1)), None, None)
        inputs = (out, mu, logvar)
        _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


@pytest.mark.parametrize("knob, value, match", [
    ("PLAN", "diagonal", "PLAN must be 'rows' or 'tiles', got 'diagonal'"),
    ("TILE", 1000, "TILE must be a power of 2 >= 16, got 1000"),
    ("NUM_WARPS", 3, "NUM_WARPS must be None or a power of 2 up to 32, got 3"),
])
def test_an_unknown_plan_is_refused(monkeypatch, knob, value, match):
    monkeypatch.setattr(kernels, knob, value)
    with pytest.raises(ValueError, match=match):
        kernels._plan(4, 100, torch.device("cpu"))


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unit_upstream_gradient_skips_the_rescale(reduction):
    # loss.backward() (or loss.sum() for "none") hands the kernel a multiplier of exactly 1
    x, out, mu, logvar = _inputs(3, 50, 6)
    fused, ref = _both(x, out, mu, logvar, beta=1.0, reduction=reduction)
    weights = (torch.ones(ref.loss.shape), None, None)
    inputs = (out, mu, logvar)
    _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


@interpreted
@pytest.mark.parametrize("which", [(1, None, None), (None, 1, None), (None, None, 1), (None, 2, 3)])
def test_gradients_through_any_output(which):
    x, out, mu, logvar = _inputs(3, 20, 4)
    fused, ref = _both(x, out, mu, logvar, beta=torch.tensor(0.25), reduction="none")
    weights = [None if w is None else torch.full((3,), float(w)) for w in which]
    inputs = (out, mu, logvar)
    _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


@interpreted
def test_column_split_is_exercised_and_correct():
    D = 20000 if NATIVE else 1000  # a chunk is at least 4096 columns on a GPU, 64 interpreted
    assert kernels._plan(1, D, torch.empty(0).device)[0] > 1
    x, out, mu, logvar = _inputs(1, D, 3)
    fused, ref = _both(x, out, mu, logvar, reduction="sum")
    _assert_same(fused, ref)
    weights = (torch.tensor(0.5), None, None)
    inputs = (out, mu, logvar)
    _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


@interpreted
def test_extreme_logits_stay_finite_and_exact():
    out = torch.tensor([[1e4, -1e4, 1e4, -1e4, 30.0, -30.0, 0.0]]).repeat(2, 1).requires_grad_()
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.7]])
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.tensor([[0.0, 1e-7, -1e-4], [2e-3, -0.4, 0.6]], requires_grad=True)
    fused, ref = _both(x, out, mu, logvar, reduction="none")
    assert all(bool(torch.isfinite(t).all()) for t in fused)
    _assert_same(fused, ref, rtol=1e-6, atol=1e-6)
    inputs = (out, mu, logvar)
    weights = (torch.tensor([1.0, 3.0]), None, None)
    _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


@interpreted
def test_confident_logits_keep_their_tiny_loss():
    # log1p(e^-|l|) ~ e^-|l| far below fp32's epsilon of 1: must not round to 0
    out = torch.tensor([[17.0, -20.0, 25.0, -40.0, 60.0], [-18.0, 22.0, -30.0, 50.0, -88.0]])
    x = (out > 0).float()
    mu, logvar = torch.zeros(2, 1), torch.zeros(2, 1)
    fused = fused_vae_loss(x, out, mu, logvar, reduction="none")
    exact = VAELoss(reduction="none")(x.double(), out.double(), mu.double(), logvar.double())
    torch.testing.assert_close(fused.reconstruction.double(), exact.reconstruction, rtol=1e-5, atol=0)


@interpreted
def test_kl_near_the_prior_matches_float64():
    # exp(v) - 1 - v cancels for small v: the kernel's series must keep the digits
    v = torch.tensor([[0.0, 1e-8, -1e-6, 1e-4, -3e-3, 0.2, -0.49, 0.51, -2.0, 5.0]])
    mu = torch.zeros_like(v)
    x, out = torch.full((1, 2), 0.5), torch.zeros(1, 2)
    fused = fused_vae_loss(x, out, mu, v, reduction="none")
    v64 = v.double()
    exact = (0.5 * (torch.expm1(v64) - v64)).sum(-1)
    torch.testing.assert_close(fused.kl.double(), exact, rtol=2e-6, atol=1e-12)
    for value in v[0]:  # each term alone: non-negative and accurate
        one = fused_vae_loss(x, out, torch.zeros(1, 1), value.reshape(1, 1), reduction="sum").kl
        ref = 0.5 * (torch.expm1(value.double()) - value.double())
        assert float(one) >= 0
        assert abs(float(one) - float(ref)) <= 2e-6 * float(ref) + 1e-15


@interpreted
@pytest.mark.parametrize("reconstruction", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extreme_and_tiny_logvars_match_float64(reconstruction, reduction):
    """logvar +-80 (exp(80) = 5.5e34, near float32's top; exp(-80) below its epsilon) and
    +-1e-7 (exp(v) - 1 - v cancels; the gradient expm1(v) / 2 too, in float32's exp(v) - 1)
    against the formulas in float64: losses and every gradient, element by element. Row 1
    has only tiny log-variances and mu = 0, so its KL (about v^2 / 4) is theirs alone."""
    x, out, mu, _ = _inputs(3, 67, 6, seed=5)
    g = torch.Generator().manual_seed(6)
    tiny = 1e-7 * _cpu_randn((3, 6), generator=g)
    logvar = torch.stack([torch.tensor([80.0, -80.0, 80.0, -80.0, 0.0, 0.0], device=tiny.device) + tiny[0],
                          tiny[1], torch.full((6,), -80.0, device=tiny.device)]).requires_grad_()
    mu = mu.detach().clone()
    mu[1] = 0.0
    mu.requires_grad_()
    fused = fused_vae_loss(x, out, mu, logvar, beta=1.5, reconstruction=reconstruction, reduction=reduction,
                           gaussian_logvar=GAUSS_LOGVAR)
    assert _is_fused(fused)
    x64 = x.double()
    o64, m64, v64 = (t.detach().double().requires_grad_() for t in (out, mu, logvar))
    if reconstruction == "bernoulli":
        rec = o64.clamp(min=0) - o64 * x64 + torch.log1p(torch.exp(-o64.abs()))
    else:
        rec = 0.5 * (math.log(2 * math.pi) + GAUSS_LOGVAR + (x64 - o64) ** 2 * math.exp(-GAUSS_LOGVAR))
    rec, kl = rec.sum(1), (0.5 * (torch.expm1(v64) - v64 + m64**2)).sum(1)
    if reduction == "mean":
        rec, kl = rec.mean(), kl.mean()
    ref = (rec + 1.5 * kl, rec, kl)
    for a, b in zip(fused, ref):  # (a GPU's exp(80) is a few float32 ulps off)
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=0)
    weights = [_cpu_rand(ref[0].shape, generator=g) + 0.5 for _ in range(3)]
    gout, gmu, glv = _grads(fused, (out, mu, logvar), weights)
    want = _grads(ref, (o64, m64, v64), [w.double() for w in weights])
    torch.testing.assert_close(gout.double(), want[0], rtol=1e-5, atol=1e-7)
    for a, b in zip((gmu, glv), want[1:]):  # each element to its own size, the tiny ones too
        assert bool(((a.double() - b).abs() <= 1e-5 * b.abs()).all()), ((a.double() - b) / b).abs().max()


def _half_ulp(exact: torch.Tensor, dtype) -> torch.Tensor:
    """Half the spacing of ``dtype``'s numbers around each float64 value of ``exact``: the
    most one rounding to ``dtype`` can move it (normal numbers; fp16's subnormal spacing
    as its floor)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]  # significand bits, the implicit one included
    _, e = torch.frexp(exact)  # |exact| = m 2^e, m in [0.5, 1)
    spacing = torch.pow(2.0, (e - bits).to(torch.float64))
    return 0.5 * (spacing.clamp_min(2.0**-24) if dtype == torch.float16 else spacing)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_half_precision_logits(dtype, reduction):
    """Half-precision inputs: the terms in float32; each gradient rounded to the half dtype
    once, from float32: within half a unit in the last place of the float64 gradient (with
    beta, 1/B and the incoming gradients scaling them), give or take float32's own error
    (sigmoid(l) - x cancels where x is 0 or 1: a float32 ulp of the largest gradient). The
    bfloat16 buffers were stored in bfloat16, then scaled: rounded twice, 1-2 ulps off."""
    x, out, mu, logvar = _inputs(3, 300, 5, dtype=dtype)
    mu_h, logvar_h = mu.detach().to(dtype).requires_grad_(), logvar.detach().to(dtype).requires_grad_()
    fused, ref = _both(x, out, mu_h, logvar_h, beta=2.5, reduction=reduction)
    assert fused.loss.dtype == torch.float32
    _assert_same(fused, ref, rtol=1e-5, atol=1e-3)
    weights = (torch.tensor(1.0), torch.tensor(0.3), torch.tensor(0.7))
    ga = _grads(fused, (out, mu_h, logvar_h), weights)
    inputs64 = [t.detach().double().requires_grad_() for t in (out, mu_h, logvar_h)]
    exact = _grads(VAELoss(2.5, "bernoulli", reduction)(x.double(), *inputs64), inputs64,
                   [w.double() for w in weights])
    for name, a, b in zip(("logits", "mu", "logvar"), ga, exact):
        assert a.dtype == dtype, name
        off = (a.double() - b).abs()
        bound = _half_ulp(b, dtype) * (1 + 1e-4) + 2.0**-23 * b.abs().max()
        assert bool((off <= bound).all()), (name, float((off / (2 * _half_ulp(b, dtype))).max()))


@interpreted
def test_beta_tensor_is_read_from_memory_and_keeps_the_dtype_like_eager():
    x, out, mu, logvar = _inputs(3, 30, 4)
    beta = torch.tensor(0.5, dtype=torch.float64)
    first = fused_vae_loss(x, out, mu, logvar, beta=beta).loss.detach()
    beta.fill_(4.0)  # an in-place schedule update
    fused, ref = _both(x, out, mu, logvar, beta=beta)
    assert fused.loss.dtype == ref.loss.dtype == torch.float32  # the terms' dtype, not beta's
    _assert_same(fused, ref)
    assert not torch.allclose(first, fused.loss.detach())
    weights = (torch.tensor(0.7, dtype=torch.float64), None, torch.tensor(0.2))
    inputs = (out, mu, logvar)
    _assert_grads_same(_grads(fused, inputs, weights), _grads(ref, inputs, weights))


@interpreted
def test_image_shaped_and_non_contiguous_inputs():
    x, out, mu, logvar = _inputs(4, 2 * 5 * 6, 3)
    x_img = x.reshape(4, 2, 5, 6).transpose(2, 3)
    out_img = out.detach().reshape(4, 2, 5, 6).transpose(2, 3).requires_grad_()
    fused, ref = _both(x_img, out_img, mu, logvar, reduction="none")
    assert _is_fused(fused)
    _assert_same(fused, ref)
    weights = (torch.rand(4), None, None)
    _assert_grads_same(_grads(fused, (out_img, mu, logvar), weights), _grads(ref, (out_img, mu, logvar), weights))


@interpreted
def test_forward_only_and_partial_requires_grad():
    x, out, mu, logvar = _inputs(3, 40, 4)
    with torch.no_grad():
        fused, ref = _both(x, out, mu, logvar, reduction="none")
    _assert_same(fused, ref)
    out.requires_grad_(False)
    fused, ref = _both(x, out, mu, logvar)
    assert _is_fused(fused)
    weights = (torch.tensor(2.0), None, None)
    _assert_grads_same(_grads(fused, (mu, logvar), weights), _grads(ref, (mu, logvar), weights))


@interpreted
def test_second_backward_through_the_graph_raises():
    x, out, mu, logvar = _inputs(2, 10, 3)
    fused = fused_vae_loss(x, out, mu, logvar)
    fused.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        fused.loss.backward()


@interpreted
def test_the_fused_functions_refuse_a_second_derivative_in_words():
    x, out, mu, logvar = _inputs(2, 10, 3)
    with pytest.raises(RuntimeError, match=r"^fused_vae_loss can be differentiated once: .* use vaekit\.losses\.VAELoss$"):
        torch.autograd.grad(fused_vae_loss(x, out, mu, logvar).loss, mu, create_graph=True)
    head, eps = _posterior_inputs(3, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"^fused_posterior_sample can be differentiated once: .* "
                                           r"use vaekit\.kernels\.posterior_sample$"):
        torch.autograd.grad(fused_posterior_sample(head, eps, 5.0)[2].sum(), head, create_graph=True)


@interpreted
def test_value_checks_follow_validate_args():
    x, out, mu, logvar = _inputs(2, 10, 3)
    x[0, 0] = 1.5
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        fused_vae_loss(x, out, mu, logvar)
    fused = fused_vae_loss(x, out, mu, logvar, validate_args=False)
    assert _is_fused(fused) and bool(torch.isfinite(fused.loss))


@interpreted
@pytest.mark.parametrize("beta, error, message", [
    (torch.tensor([1.5]), ValueError, "beta must be a scalar"),
    (torch.tensor(2), TypeError, "beta must be a floating-point tensor"),
])
def test_a_bad_beta_tensor_is_refused_as_eager_refuses_it(beta, error, message):
    x, out, mu, logvar = _inputs(2, 6, 3)
    for validate in (True, False):
        with pytest.raises(error, match=message):
            fused_vae_loss(x, out, mu, logvar, beta=beta.to(x.device), validate_args=validate)


@interpreted
def test_an_empty_batch_is_scored_as_eager_scores_it():
    x, out, mu, logvar = _inputs(2, 6, 3)
    empty = [t.detach()[:0] for t in (x, out, mu, logvar)]
    for reduction in ("sum", "none"):
        fused, ref = _both(*empty, reduction=reduction)
        _assert_same(fused, ref)
    with pytest.raises(ValueError, match="empty batch"):
        fused_vae_loss(*empty, reduction="mean")


@interpreted
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize(
    "case",
    ["mse", "learned_logvar", "float64", "x_requires_grad", "beta_requires_grad", "latent_3d", "no_triton"],
)
def test_fallback_conditions_run_the_reference(case, monkeypatch):
    x, out, mu, logvar = _inputs(2, 6, 3)
    kw = dict(beta=1.5, reconstruction="bernoulli")
    args = [x, out, mu, logvar]
    if case == "mse":
        kw["reconstruction"] = "mse"
    elif case == "learned_logvar":
        kw["reconstruction"], args[1] = "gaussian", (out, torch.zeros(2, 6))
    elif case == "float64":
        args[1] = out.detach().double().requires_grad_()
    elif case == "x_requires_grad":
        args[0] = x.clone().requires_grad_()
    elif case == "beta_requires_grad":
        kw["beta"] = torch.tensor(1.5, requires_grad=True)
    elif case == "latent_3d":
        args[2], args[3] = mu.detach()[:, None], logvar.detach()[:, None]
    elif case == "no_triton":
        monkeypatch.setattr(kernels, "triton", None)
    result = fused_vae_loss(*args, **kw)
    assert not _is_fused(result)
    ref = VAELoss(kw["beta"], kw["reconstruction"])(*args)
    for a, b in zip(result, ref):
        assert torch.equal(a, b)


@interpreted
@pytest.mark.parametrize("likelihood, fused_linear", [("bernoulli", False), ("gaussian", False), ("bernoulli", True)])
def test_the_static_step_with_the_fused_sample_and_loss_is_the_eager_step(likelihood, fused_linear, monkeypatch):
    """StaticStep where Triton runs: the posterior's sample and the loss each fused (on
    CUDA captured after its warm-up), and the linear layers too, against the eager
    formulas step by step. The loss's gradients come from its forward kernels: its
    backward kernel never runs."""
    monkeypatch.setattr(kernels, "_bwd_kernel", None)  # a call would fail
    import copy

    from vaekit.fast import StaticStep
    from vaekit.losses import gaussian_kl
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(12,), latent_dim=3, hidden=(16,), likelihood=likelihood,
                            logvar_limit=3.0))
    twin = copy.deepcopy(model)
    device = torch.empty(0).device
    kw = {"capturable": True, "lr": torch.tensor(1e-2)} if device.type == "cuda" else {"lr": 1e-2}
    opt, opt_twin = torch.optim.Adam(model.parameters(), **kw), torch.optim.Adam(twin.parameters(), lr=1e-2)
    step = StaticStep(model, opt, batch_size=8, fused_sample=True, fused_linear=fused_linear)
    assert step._fused_sample and step._fused and (step._plan is not None) == fused_linear
    assert not StaticStep(copy.deepcopy(model), opt, batch_size=8)._fused_sample  # off by default, for now
    g = torch.Generator().manual_seed(4)
    for i in range(6):
        x = _cpu_rand((8, 12), generator=g)
        if likelihood == "bernoulli":
            x = x.round()
        eps = _cpu_randn((8, 3), generator=g)
        step.run(x, eps, 1e-2, 0.5 + i)
        mu, logvar = twin.encode_params(x)
        out = twin.decode(mu + torch.exp(0.5 * logvar) * eps)
        loss = (twin.nll(out, x) + (0.5 + i) * gaussian_kl(mu, logvar)).mean()
        opt_twin.zero_grad()
        loss.backward()
        opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert float(step.sums[3]) == 48.0 and int(step.skipped) == 0


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: posterior_sample(torch.randn(4, 5), torch.randn(4, 2), 12.0), ValueError,
     r"head must be \[B, 2d\] .* got head of shape \(4, 5\) and eps of shape \(4, 2\)"),
    (lambda: posterior_sample(torch.randn(4, 6), torch.randn(4, 2), 12.0), ValueError, r"eps of shape \(4, 2\)"),
    (lambda: posterior_sample(torch.randn(4, 6), torch.randn(4, 3), 0.0), ValueError,  # was NaN
     r"limit must be a finite number > 0, got 0\.0"),
    (lambda: posterior_sample(torch.randn(4, 6), torch.randn(4, 3), -1.0), ValueError,  # was a sign-flipped logvar
     r"limit must be a finite number > 0, got -1\.0"),
    (lambda: fused_posterior_sample([1.0, 2.0], torch.randn(1, 1), 1.0), TypeError, r"head must be a torch\.Tensor"),
    (lambda: fused_vae_loss_grads(torch.rand(4, 10), [1.0], torch.zeros(4, 3), torch.zeros(4, 3)), TypeError,
     r"decoder_out must be a torch\.Tensor .* got list"),
    (lambda: fused_vae_loss_grads(torch.rand(4, 10), torch.rand(4, 10), None, torch.zeros(4, 3)), TypeError,
     r"mu must be a torch\.Tensor, got NoneType"),
])
def test_the_fused_pieces_name_a_bad_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
