"""AdamTail (norm, clip, non-finite rule, Adam, counters in three Triton kernels) against
PyTorch's Adam and clip_grad_norm_, and against Adam in float64.

The Triton-path tests run on the GPU where there is CUDA (there the static step is
captured in a CUDA graph), elsewhere under Triton's interpreter in a subprocess
(tests/triton_harness.py).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from triton_harness import (CHILD, NATIVE, compile_for_hopper, interpreted, run_file_interpreted,  # noqa: F401
                            triton_path_device)

from vaekit import adam_tail
from vaekit.adam_tail import AdamTail, adam_tail_unsupported
from vaekit.cli import build_config
from vaekit.config import TrainConfig
from vaekit.fast import StaticStep
from vaekit.io import load_checkpoint
from vaekit.models import VAE, ModelConfig
from vaekit.train import fit


def _device() -> str:
    return torch.empty(0).device.type


def _adam(params, *, lr=1e-2, fused=None, **kw):
    """The Adam a static step is built with: capturable with a tensor lr on CUDA."""
    if _device() == "cuda":
        kw.update(capturable=True, lr=torch.tensor(lr, device="cuda"))
        return torch.optim.Adam(params, fused=fused, **kw)
    return torch.optim.Adam(params, lr=lr, **kw)


def _counters():
    return (torch.zeros(4, dtype=torch.float64), torch.zeros((), dtype=torch.int64),
            torch.zeros((), dtype=torch.int64))


# ------------------------------------------------------------------ always run


@pytest.mark.skipif(CHILD or NATIVE, reason="here the kernels can run")
def test_refused_where_the_kernels_cannot_run():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    assert "cannot run on cpu" in adam_tail_unsupported(opt, model.parameters())
    with pytest.raises(ValueError, match="AdamTail cannot serve this optimiser: the Triton kernels cannot run on cpu"):
        AdamTail(opt, list(model.parameters()))
    vae = VAE(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)))
    with pytest.raises(ValueError, match="cannot run on cpu"):
        StaticStep(vae, torch.optim.Adam(vae.parameters()), batch_size=2, adam_kernel=True)


def _tiny(**train):
    return build_config(overrides={
        "train.epochs": 1, "train.progress": False, "model.hidden": (32,), "model.latent_dim": 3,
        **{f"train.{k}": v for k, v in train.items()},
    })


def test_train_config_refuses_the_kernel_tail_without_the_static_step():
    with pytest.raises(ValueError, match="adam_kernel must be false with fast 'off'"):
        TrainConfig(fast="off", adam_kernel=True)
    with pytest.raises(ValueError, match="adam_kernel must be true or false, got 'yes'"):
        TrainConfig(adam_kernel="yes")


@pytest.mark.skipif(CHILD or NATIVE, reason="here the kernels can run")
def test_fit_refuses_the_kernel_tail_where_it_cannot_run(tmp_path):
    for fast, why in (("auto", "this run takes the eager step"), ("static", "the Triton kernels cannot run on cpu")):
        with pytest.raises(ValueError, match=f"train.adam_kernel=True .* cannot serve this run: {why}"):
            fit(_tiny(fast=fast, adam_kernel=True, device="cpu"), tmp_path / fast)
        assert not (tmp_path / fast).exists()  # refused before the run directory is made


@pytest.mark.skipif(CHILD or NATIVE, reason="the interpreter's kernels are not compiled; a GPU runs them for real")
@pytest.mark.parametrize("ptr", ["fp32", "bf16"])
def test_the_kernels_compile_for_a_hopper_gpu(ptr):
    """Compiled ahead of time for sm_90 (H100, H200) by the ptxas that Triton ships, on any
    machine: what the interpreter cannot show (types, pointer casts, the float64 sums)."""
    tables = {"table": "*i64", "tids": "*i32", "starts": "*i32", "numels": "*i32", "partials": "*fp32"}
    scalars = {"beta2": "fp32", "one_minus_beta1": "fp32", "one_minus_beta2": "fp32", "log_beta1": "fp32",
               "log_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32", "clip": "fp32"}
    losses = {"loss_ptr": f"*{ptr}", "rec_ptr": f"*{ptr}", "kl_ptr": f"*{ptr}"}
    cases = [
        *[(adam_tail._sumsq_kernel, {**tables, "n_tensors": "i32"}, {"BLOCK": 2048, "SHADOW": shadow})
          for shadow in (False, True)],
        *[(adam_tail._adam_kernel, {**tables, "n_partials": "i32", "n_tensors": "i32", "loss_ptr": f"*{ptr}",
                                    "lr_ptr": "*fp32", **scalars},
           {"DECAY": decay, "DECOUPLED": decoupled, "BLOCK": 2048, "NP": 512, "SHADOW": shadow})
          for decay, decoupled, shadow in ((False, False, False), (True, False, False), (True, True, False),
                                           (False, False, True), (True, True, True))],
        *[(adam_tail._finish_kernel, {"table": "*i64", "n_tensors": "i32", "partials": "*fp32", "n_partials": "i32",
                                      **losses, "sums_ptr": "*fp64", "skipped_ptr": "*i64", "bad_run_ptr": "*i64",
                                      "b": "fp32", "clip": "fp32"}, {"NP": np2, "NT": nt})
          for np2, nt in ((512, 16), (1, 1))],
    ]
    for fn, signature, constexprs in cases:
        for aligned in (False, True):
            assert compile_for_hopper(fn, signature, {**constexprs, "ALIGNED": aligned}
                                      if "ALIGNED" in fn.arg_names else constexprs)


@pytest.mark.skipif(CHILD or NATIVE, reason="the interpreter's kernels are not compiled; a GPU runs them for real")
@pytest.mark.parametrize("shadow", [False, True])
def test_aligned_tensors_move_16_bytes_an_instruction(shadow):
    """The address tables hide the tensors' alignment from the compiler; with ALIGNED (all
    sizes multiples of 8, all buffers on 16-byte boundaries) the sum of squares and Adam
    load and store 16-byte vectors, read off the PTX; without, one element at a time."""
    tables = {"table": "*i64", "tids": "*i32", "starts": "*i32", "numels": "*i32", "partials": "*fp32"}
    scalars = dict.fromkeys(("beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2", "eps",
                             "weight_decay", "clip"), "fp32")
    adam = {**tables, "n_partials": "i32", "n_tensors": "i32", "loss_ptr": "*fp32", "lr_ptr": "*fp32", **scalars}
    for aligned in (False, True):
        kw = {"BLOCK": 2048, "SHADOW": shadow, "ALIGNED": aligned}
        sumsq = compile_for_hopper(adam_tail._sumsq_kernel, {**tables, "n_tensors": "i32"}, kw, asm="ptx")
        step = compile_for_hopper(adam_tail._adam_kernel, adam,
                                  {**kw, "DECAY": True, "DECOUPLED": False, "NP": 512}, asm="ptx")
        widths = {(name, op): set(re.findall(rf"{op}\.global\.(?:v4\.)?b\d+", text))
                  for name, text in (("sumsq", sumsq), ("adam", step)) for op in ("ld", "st")}
        if aligned:  # every gradient, parameter and moment access is a vector of four words
            assert "ld.global.v4.b32" in widths["sumsq", "ld"], widths
            assert "ld.global.v4.b32" in widths["adam", "ld"] and "st.global.v4.b32" in widths["adam", "st"], widths
            assert "st.global.b32" not in widths["adam", "st"] and "st.global.b16" not in widths["adam", "st"], widths
        else:
            assert not any("v4" in w for ws in widths.values() for w in ws), widths


@pytest.mark.skipif(CHILD, reason="this is the child process")
@pytest.mark.skipif(NATIVE, reason="CUDA is here: the Triton-path tests ran on the GPU in this process")
def test_triton_interpreter():
    run_file_interpreted(__file__)


# ------------------------------------------------------------------ Triton path


@interpreted
@pytest.mark.parametrize("make, match", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1), "is a SGD, not a torch.optim.Adam or AdamW"),
    (lambda ps: _adam(ps, amsgrad=True), "amsgrad=True"),
    (lambda ps: _adam(ps, maximize=True), "maximize=True"),
    (lambda ps: _adam([{"params": ps[:1]}, {"params": ps[1:]}]), "2 parameter groups, not one"),
    (lambda ps: _adam(ps, betas=(torch.tensor(0.9), torch.tensor(0.999))),
     "betas, eps and weight_decay must be numbers"),
])
def test_unsupported_optimisers_are_named(make, match):
    params = list(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match=match):
        AdamTail(make(params), params)


@interpreted
def test_unsupported_parameters_are_named():
    lin = torch.nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="dense contiguous float32 tensor.*torch.float64"):
        AdamTail(_adam(lin.parameters()), list(lin.parameters()))
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not the step's"):
        AdamTail(_adam(a.parameters()), list(b.parameters()))
    with pytest.raises(ValueError, match="block must be a power of 2 >= 16, got 24"):
        AdamTail(_adam(a.parameters()), list(a.parameters()), block=24)


@interpreted
def test_a_missing_gradient_is_an_error():
    lin = torch.nn.Linear(3, 2)
    tail = AdamTail(_adam(lin.parameters()), list(lin.parameters()))
    lin(torch.randn(4, 3)).sum().backward()
    lin.bias.grad = None
    loss = torch.zeros(())
    with pytest.raises(RuntimeError, match="a parameter has no gradient"):
        tail(loss, loss, loss, *_counters(), 4)


def _adam_float64(p, grads, *, lr, betas, eps, wd, decoupled, clip):
    """Adam after clip_grad_norm_, step by step in float64 (``grads``: one list of tensors
    per step, all parameters); returns the parameters, moments and step count."""
    p = [t.double().clone() for t in p]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    b1, b2 = betas
    for step, gs in enumerate(grads, start=1):
        gs = [g.double() for g in gs]
        norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
        scale = min(clip / (norm + 1e-6), 1.0)
        for i, g in enumerate(gs):
            g = g * scale
            if decoupled:
                p[i] = p[i] * (1 - lr * wd)
            else:
                g = g + wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = v[i].sqrt() / math.sqrt(1 - b2**step) + eps
            p[i] = p[i] - lr / (1 - b1**step) * m[i] / denom
    return p, m, v


@interpreted
@pytest.mark.parametrize("wd, decoupled, clip, betas", [
    (0.0, False, math.inf, (0.9, 0.999)),
    (0.05, False, 0.3, (0.9, 0.999)),
    (0.05, True, 0.3, (0.5, 0.9)),
    (0.0, False, 0.3, (0.3, 0.9)),  # 1 - beta1 > 1/2: torch's lerp takes its other form
    (0.05, False, 0.3, (0.3, 0.99)),  # the same with L2 decay, which enters the moment
    (0.05, True, math.inf, (0.2, 0.99)),  # and with decoupled decay, unclipped
    (0.0, False, 1e9, (0.0, 0.99)),  # beta1 = 0: no momentum; a clip that never bites
])
@pytest.mark.parametrize("shapes, aligned", [
    ([(7, 33), (33,), (1,), (3, 5, 2)], False),  # span several programs, end mid-block, a single element
    ([(8, 32), (40,), (8,), (3, 8, 2)], True),  # the same with sizes by 8: the kernels' vector loads
])
def test_steps_match_adam_in_float64(wd, decoupled, clip, betas, shapes, aligned):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cpu").to(_device())) for s in shapes]
    start = [p.detach().clone() for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    kw = dict(lr=torch.tensor(0.05, device="cuda"), capturable=True) if _device() == "cuda" else dict(lr=0.05)
    opt = cls(params, betas=betas, eps=1e-6, weight_decay=wd, **kw)
    tail = AdamTail(opt, params, grad_clip=0.0 if math.isinf(clip) else clip, block=16)
    sums, skipped, bad_run = _counters()
    history = []
    for i in range(5):
        grads = [torch.randn(s, generator=g, device="cpu").to(_device()) * (1 + i) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        assert tail._aligned(tail._addresses()) is aligned
        history.append(grads)
        loss = torch.tensor(1.0 + i)
        tail(loss, 2 * loss, 3 * loss, sums, skipped, bad_run, 8)
    _assert_adam_as_float64(opt, params, _adam_float64(start, history, lr=0.05, betas=betas, eps=1e-6, wd=wd,
                                                      decoupled=decoupled, clip=clip), steps=5)
    # sums of [loss, rec, kl, 1] * b over the five steps: 8 * (1+2+3+4+5) = 120
    assert sums.tolist() == [120.0, 240.0, 360.0, 40.0]
    assert int(skipped) == 0 and int(bad_run) == 0


def _assert_adam_as_float64(opt, params, reference, steps: int) -> None:
    """The parameters and Adam's moments as ``reference`` (:func:`_adam_float64`) has
    them, and ``steps`` steps taken."""
    for p, rp, rm, rv in zip(params, *reference):
        st = opt.state[p]
        torch.testing.assert_close(p.detach().double(), rp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["exp_avg"].double(), rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["exp_avg_sq"].double(), rv, rtol=1e-5, atol=1e-6)
        assert float(st["step"]) == steps


@interpreted
@pytest.mark.parametrize("bad", [(0, 1), (4, 5)], ids=["first", "last"])
def test_non_finite_first_or_last_steps_match_adam_in_float64(bad):
    """The non-finite steps (a NaN gradient, an infinite loss) are the very first ones,
    before any step is taken (the first one taken has step 1's bias corrections), or the
    last ones (bad_run ends at 2): the rest is Adam in float64 over the finite steps
    alone, and the sums count only them."""
    shapes = [(7, 33), (33,), (1,)]
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cpu").to(_device())) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = _adam(params, lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    tail = AdamTail(opt, params, grad_clip=0.3, block=16)
    sums, skipped, bad_run = _counters()
    history, want = [], [0.0] * 4
    for i in range(6):
        grads = [torch.randn(s, generator=g, device="cpu").to(_device()) * (1 + i) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        if i == bad[0]:
            params[0].grad[3, 5] = float("nan")
        loss = torch.tensor(float("inf") if i == bad[1] else 1.0 + i)
        tail(loss, 2 * loss, 3 * loss, sums, skipped, bad_run, 8)
        if i not in bad:
            history.append(grads)
            want = [a + 8 * b for a, b in zip(want, (1.0 + i, 2.0 + 2 * i, 3.0 + 3 * i, 1.0))]
    _assert_adam_as_float64(opt, params, _adam_float64(start, history, lr=0.05, betas=(0.9, 0.999), eps=1e-6,
                                                      wd=0.05, decoupled=False, clip=0.3), steps=4)
    assert sums.tolist() == want
    assert (int(skipped), int(bad_run)) == (2, 2 if bad[0] == 4 else 0)


@interpreted
def test_vectors_only_where_every_buffer_is_aligned():
    """Sizes by 8 are not enough: a parameter or gradient that starts off a 16-byte
    boundary (a view into a larger tensor) sends the step to the kernels' element-wise
    loads; so does a size that is not a multiple of 8."""
    base = torch.zeros(80)

    def aligned(params, grads):
        tail = AdamTail(_adam(params), params)
        for p, gr in zip(params, grads):
            p.grad = gr
        return tail._aligned(tail._addresses())

    assert aligned([torch.nn.Parameter(base[:40]), torch.nn.Parameter(torch.zeros(16))],
                   [torch.ones(40), torch.ones(16)])
    assert not aligned([torch.nn.Parameter(base[:40]), torch.nn.Parameter(torch.zeros(16))],
                       [torch.ones(40), torch.ones(18)[2:]])  # a gradient 8 bytes past a boundary
    assert not aligned([torch.nn.Parameter(base[2:42]), torch.nn.Parameter(torch.zeros(16))],
                       [torch.ones(40), torch.ones(16)])  # a parameter 8 bytes past one
    assert not aligned([torch.nn.Parameter(torch.zeros(12))], [torch.ones(12)])  # 12 is not a multiple of 8


@interpreted
@pytest.mark.parametrize("where", ["grad_nan", "grad_inf", "loss_inf", "loss_nan"])
def test_a_non_finite_step_changes_nothing_but_the_counters(where):
    lin = torch.nn.Linear(5, 3)
    opt = _adam(lin.parameters())
    tail = AdamTail(opt, list(lin.parameters()), block=16)
    sums, skipped, bad_run = _counters()
    x = torch.randn(4, 5)

    def step(bad: bool):
        opt.zero_grad(set_to_none=True)
        loss = lin(x).pow(2).mean()
        loss.backward()
        loss = loss.detach().clone()
        if bad and where.startswith("grad"):
            lin.weight.grad[1, 2] = float("nan") if where == "grad_nan" else float("inf")
        if bad and where.startswith("loss"):
            loss.fill_(float("nan") if where == "loss_nan" else float("inf"))
        tail(loss, loss, loss, sums, skipped, bad_run, 4)

    step(False)
    before = [t.clone() for p in lin.parameters() for t in (p.detach(), *opt.state[p].values())]
    sums_before = sums.clone()
    step(True)
    step(True)
    after = [t for p in lin.parameters() for t in (p.detach(), *opt.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(sums, sums_before)
    assert int(skipped) == 2 and int(bad_run) == 2
    step(False)
    assert int(skipped) == 2 and int(bad_run) == 0
    assert float(opt.state[lin.weight]["step"]) == 2.0 and float(sums[3]) == 8.0


@interpreted
@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.9])
def test_the_first_moment_is_torch_lerp_exactly(beta1):
    # exp_avg.lerp_(grad, 1 - beta1): from weight 1/2 on torch computes it another way, so
    # with beta1 = 0 exp_avg is the gradient itself, whatever came before (3e7 here).
    params = [torch.nn.Parameter(torch.zeros(5))]
    ref = [torch.nn.Parameter(torch.zeros(5))]
    opt, opt_ref = _adam(params, betas=(beta1, 0.999)), _adam(ref, betas=(beta1, 0.999), foreach=False)
    tail = AdamTail(opt, params)
    loss = torch.zeros(())
    for g in (torch.tensor([3e7, -2.5, 1e-3, 7.0, 0.1]), torch.tensor([1.0, 1.0, -1e-3, 3.0, 0.2])):
        params[0].grad, ref[0].grad = g.clone(), g.clone()
        tail(loss, loss, loss, *_counters(), 1)
        opt_ref.step()
    got, want = opt.state[params[0]]["exp_avg"], opt_ref.state[ref[0]]["exp_avg"]
    if beta1 == 0:
        assert torch.equal(got, want)  # the weight-1 form: exactly the last gradient
    else:  # torch's lerp is one fused multiply-add (the interpreter rounds twice)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@interpreted
def test_eager_adam_steps_in_between_share_the_state():
    # A short last batch takes PyTorch's Adam on the same optimiser: five steps, two of
    # them PyTorch's, equal five of PyTorch's.
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 2))
    b = copy.deepcopy(a)
    oa, ob = _adam(a.parameters()), _adam(b.parameters())
    tail = AdamTail(ob, list(b.parameters()))
    counters = _counters()
    for i in range(5):
        x = torch.randn(8, 6)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad(set_to_none=True)
            loss = model(x).pow(2).mean()
            loss.backward()
            if model is a or i in (1, 3):
                opt.step()
            else:
                tail(loss.detach(), loss.detach(), loss.detach(), *counters, 8)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(oa.state[p]["exp_avg_sq"], ob.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(ob.state[q]["step"]) == 5.0


def _eager_loss_in_the_interpreter(monkeypatch):
    """Under the interpreter the static step's loss runs eagerly (the fused loss kernel, one
    interpreted program per row, has its own tests): the tail is what these fits test."""
    if CHILD:
        from vaekit import fast

        monkeypatch.setattr(fast, "fused_available", lambda device: False)


def _vae():
    torch.manual_seed(0)
    return VAE(ModelConfig(input_shape=(1, 6, 6), latent_dim=3, hidden=(20,)))


@interpreted
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_static_step_with_the_kernel_tail_equals_the_default(clip):
    # On CUDA both steps are captured in a CUDA graph after three warm-up steps; a NaN
    # batch at step 5 is skipped by both.
    models = [_vae(), _vae()]
    opts = [_adam(m.parameters(), weight_decay=1e-3) for m in models]
    steps = [StaticStep(m, o, batch_size=8, grad_clip=clip, adam_kernel=k)
             for m, o, k in zip(models, opts, (False, True))]
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        x = torch.rand((8, 1, 6, 6), generator=g, device="cpu").bernoulli().to(_device())
        if i == 5:
            x[0, 0, 0, 0] = float("nan")
        eps = torch.randn((8, 3), generator=g, device="cpu").to(_device())
        for s in steps:
            s.run(x, eps, 1e-2 * (1 + i % 3), 0.5 + i)
    ref, tail = steps
    assert tail._tail is not None and ref._tail is None
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opts[1].state[q][key], opts[0].state[p][key], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(tail.sums, ref.sums, rtol=1e-5, atol=0)
    assert int(tail.skipped) == int(ref.skipped) == 1 and float(tail.sums[3]) == 56.0
    assert int(tail.bad_run) == int(ref.bad_run) == 0


def _casts_in_a_step(step, x, eps) -> list:
    """The shapes of the tensors cast to bfloat16 during one ``step.run``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    with Casts() as mode:
        step.run(x, eps, 1e-2, 1.0)
    return mode.shapes


@interpreted
@pytest.mark.parametrize("fused_linear", [False, True])
def test_under_bf16_autocast_the_tail_keeps_bfloat16_copies_of_the_weights(fused_linear):
    """StaticStep(amp=True, adam_kernel=True): the forward pass reads bfloat16 copies that
    the tail writes with each update (rounded as .to(torch.bfloat16) rounds), so no weight
    is cast in a step, and it trains what bf16 autocast with PyTorch's Adam trains; an
    eager step in between moves the weights, and resync() the copies with them. With the
    fused linear layers too (which then take the copies as they are)."""
    models = [_vae(), _vae()]
    opts = [_adam(m.parameters()) for m in models]
    ref, kept = (StaticStep(m, o, batch_size=8, amp=True, adam_kernel=k, fused_linear=k and fused_linear)
                 for m, o, k in zip(models, opts, (False, True)))
    assert kept._shadows is not None and ref._shadows is None and (kept._plan is not None) == fused_linear
    weights = {tuple(p.shape) for p in models[0].parameters()}
    g = torch.Generator().manual_seed(3)
    for i in range(7):
        x = torch.rand((8, 1, 6, 6), generator=g, device="cpu").bernoulli().to(_device())
        eps = torch.randn((8, 3), generator=g, device="cpu").to(_device())
        if i == 4 and _device() == "cpu":  # uncaptured: what each casts can be watched
            assert weights <= set(_casts_in_a_step(ref, x, eps))
            assert not weights & set(_casts_in_a_step(kept, x, eps))
        else:
            ref.run(x, eps, 1e-2, 1.0)
            kept.run(x, eps, 1e-2, 1.0)
        for c, q in zip(kept._shadows, models[1].parameters()):
            assert torch.equal(c, q.detach().to(torch.bfloat16))
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(kept.sums, ref.sums, rtol=1e-3, atol=0)
    for p in models[1].parameters():  # an eager step (fit's short batch off CUDA)
        p.grad = torch.ones_like(p)
    opts[1].step()
    assert not all(torch.equal(c, q.detach().to(torch.bfloat16)) for c, q in zip(kept._shadows, models[1].parameters()))
    kept.resync()
    assert all(torch.equal(c, q.detach().to(torch.bfloat16)) for c, q in zip(kept._shadows, models[1].parameters()))


@interpreted
def test_the_bfloat16_rounding_is_torchs():
    """The copies' rounding (by bits: Triton's interpreter truncates) against
    .to(torch.bfloat16), bit for bit: ties to even both ways, the largest float32 rounding
    to inf, infinities, NaN, subnormals, signed zeros, random values, and 200,000 random
    bit patterns (every exponent), 5,000 of them with low halves at or next to a tie. A
    NaN may come out as another NaN: torch keeps its sign and top payload bits, the copy
    is 0x7FC0 (a NaN weight is a NaN either way)."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(x, y, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + o, adam_tail._to_bf16(tl.load(x + o, mask=o < n)), mask=o < n)

    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
                            0x00000001, 0x00018000, 0x80000000, 0x00000000, 0xBF808000], dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (200_000,), generator=g, dtype=torch.int64, device="cpu").to(torch.int32)
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], dtype=torch.int32, device="cpu").repeat(1000)
    bits[:5000] = (bits[:5000] & ~0xFFFF) | low
    x = torch.cat([special.to(torch.int32).view(torch.float32), torch.randn(500, generator=g, device="cpu"),
                   bits.view(torch.float32)]).to(_device())
    y = torch.empty(x.numel(), dtype=torch.int16, device=x.device)
    round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    got, want = y.view(torch.bfloat16), x.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), (x[~same], got[~same], want[~same])


@interpreted
@pytest.mark.parametrize("amp", [False, True])
def test_a_short_batch_gets_a_step_of_its_own_with_the_kernel_tail(amp):
    """other_sizes with the Triton tail (on CUDA: a second captured graph, its own address
    table) and, under bf16, the weight copies: the same steps as with PyTorch's Adam."""
    models = [_vae(), _vae()]
    opts = [_adam(m.parameters()) for m in models]
    steps = [StaticStep(m, o, batch_size=8, amp=amp, adam_kernel=k, other_sizes=True)
             for m, o, k in zip(models, opts, (False, True))]
    assert (steps[1]._shadows is not None) == amp
    g = torch.Generator().manual_seed(5)
    for b in (8, 8, 8, 8, 5, 8, 5, 8, 5, 8):  # crosses both sizes' warm-ups and captures
        x = torch.rand((b, 1, 6, 6), generator=g, device="cpu").bernoulli().to(_device())
        eps = torch.randn((b, 3), generator=g, device="cpu").to(_device())
        for s in steps:
            s.run(x, eps, 1e-2, 1.0)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3 if amp else 1e-4, atol=1e-4 if amp else 1e-5)
    assert float(steps[1].sums[3]) == float(steps[0].sums[3]) == 71.0
    if amp:
        for c, q in zip(steps[1]._shadows, models[1].parameters()):
            assert torch.equal(c, q.detach().to(torch.bfloat16))


@interpreted
def test_no_weight_copies_where_autocast_would_not_cast_every_parameter():
    """A learned decoder log-variance is read in float32 by the likelihood: with it the
    step keeps autocast's casts (and the tail serves as without bf16)."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(8,), likelihood="gaussian",
                            decoder_variance="learned"))
    step = StaticStep(model, _adam(model.parameters()), batch_size=4, amp=True, adam_kernel=True)
    assert step._tail is not None and step._shadows is None
    plain = _vae()
    assert StaticStep(plain, _adam(plain.parameters()), batch_size=4, amp=True, adam_kernel=True)._shadows is not None


@interpreted
def test_bfloat16_copies_are_checked():
    params = [torch.nn.Parameter(torch.zeros(4, 3))]
    with pytest.raises(ValueError, match="shadows must be one contiguous bfloat16 tensor requiring grad per "
                                         "parameter, of its shape and device: got 1 for 1 parameters"):
        AdamTail(_adam(params), params, shadows=[torch.zeros(4, 3, dtype=torch.bfloat16)])  # no grad
    with pytest.raises(ValueError, match="got 0 for 1 parameters"):
        AdamTail(_adam(params), params, shadows=[])


@interpreted
def test_a_block_of_steps_equals_single_steps():
    # run_block (on CUDA: K steps captured in one graph, each with its own address table)
    models = [_vae(), _vae()]
    steps = [StaticStep(m, _adam(m.parameters()), batch_size=4, adam_kernel=True) for m in models]
    g = torch.Generator().manual_seed(2)
    for _ in range(4):  # on CUDA: warm-up and capture of the single step, a warm-up block, a captured block
        xs = torch.rand((3, 4, 1, 6, 6), generator=g, device="cpu").bernoulli().to(_device())
        eps = torch.randn((3, 4, 3), generator=g, device="cpu").to(_device())
        lrs, betas = [1e-2, 2e-2, 1e-2], [1.0, 0.5, 2.0]
        steps[0].run_block(xs, eps, lrs, betas)
        for i in range(3):
            steps[1].run(xs[i], eps[i], lrs[i], betas[i])
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(steps[0].sums, steps[1].sums, rtol=1e-6, atol=0)


def test_block_default_is_a_power_of_two():
    assert adam_tail.BLOCK >= 16 and adam_tail.BLOCK & (adam_tail.BLOCK - 1) == 0


@interpreted
def test_a_big_model_gets_bigger_blocks(monkeypatch):
    # at most _MAX_PROGRAMS programs (each re-adds all partial sums), the block doubling
    monkeypatch.setattr(adam_tail, "_MAX_PROGRAMS", 2)
    monkeypatch.setattr(adam_tail, "BLOCK", 256)
    params = [torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(3))]
    tail = AdamTail(_adam(params), params)
    assert tail.block == 1024 and tail._tids.numel() == 2  # 256 -> 512 -> 1024: 1 + 1 programs
    assert tail._tids.tolist() == [0, 1] and tail._starts.tolist() == [0, 0]


@pytest.mark.skipif(not (CHILD or NATIVE), reason="Triton path: run by the TRITON_INTERPRET=1 subprocess of its file")
@pytest.mark.parametrize("kw, rtol, atol, loss_rel", [
    # fp32: clipped, with weight decay, a cosine schedule; the short last batch takes
    # PyTorch's Adam, eagerly, on the same state (off CUDA)
    (dict(grad_clip=5.0, weight_decay=1e-3, lr_schedule="cosine"), 1e-4, 1e-5, 1e-4),
    # bf16: the step reads the tail's bfloat16 copies of the weights, to bfloat16's
    # resolution (too coarse to see a stale copy after the eager short batch: the static
    # step's test checks the copies bit for bit, resync included)
    (dict(amp="bf16", lr_schedule="constant"), 2e-2, 2e-3, 1e-3),
], ids=["fp32", "bf16-weight-copies"])
def test_fit_with_the_kernel_tail_trains_what_fit_without_it_trains(tmp_path, monkeypatch, kw, rtol, atol, loss_rel):
    """TrainConfig(adam_kernel=True): an epoch of fit against the same fit with PyTorch's Adam."""
    _eager_loss_in_the_interpreter(monkeypatch)
    torch.set_num_threads(1)
    kw = dict(fast="static", epochs=1, batch_size=256, **kw)  # 5 steps and a short one (70 of 1350)
    ref = fit(_tiny(**kw), tmp_path / "torch")
    tail = fit(_tiny(adam_kernel=True, **kw), tmp_path / "triton")
    a = load_checkpoint(tmp_path / "torch" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "triton" / "checkpoint.pt")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=rtol, atol=atol)
    steps = {float(s["step"]) for s in b["optimizer"]["state"].values()}
    assert steps == {float(s["step"]) for s in a["optimizer"]["state"].values()} and len(steps) == 1
    for ra, rb in zip(ref.history, tail.history):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=loss_rel)


@pytest.mark.skipif(not (CHILD or NATIVE), reason="Triton path: run by the TRITON_INTERPRET=1 subprocess of its file")
def test_a_resumed_fit_with_the_kernel_tail_is_the_uninterrupted_one(tmp_path, monkeypatch):
    """The checkpoint's optimiser state is loaded into new tensors before the tail is built
    (its tables point at them): one epoch and a resume to two equal two epochs, bit for bit."""
    _eager_loss_in_the_interpreter(monkeypatch)
    torch.set_num_threads(1)
    kw = dict(fast="static", adam_kernel=True, grad_clip=5.0, lr_schedule="constant",  # cosine follows the new end
              batch_size=256)
    fit(_tiny(epochs=2, **kw), tmp_path / "straight")
    fit(_tiny(epochs=1, **kw), tmp_path / "resumed")
    fit(_tiny(**kw), tmp_path / "resumed", resume=True, epochs=2)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["step"] == b["step"] > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa)
