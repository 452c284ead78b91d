"""The static (graph-capturable) training step computes what the eager step computes.

On a CPU the step runs uncaptured; on CUDA (benchmarks/gpu.sh) the same tests capture it.
The Triton-path tests (every fast option at once) run on the GPU where there is CUDA,
elsewhere under Triton's interpreter in a subprocess that runs only them
(tests/triton_harness.py).
"""

import contextlib
import copy
import dataclasses
import math

import pytest
import torch
from triton_harness import CHILD, NATIVE, interpreted, run_file_interpreted, triton_path_device  # noqa: F401

from vaekit.cli import build_config
from vaekit.fast import FastPathError, StaticStep, _aligned_slots
from vaekit.io import load_checkpoint
from vaekit.losses import gaussian_kl
from vaekit.models import VAE, ModelConfig
from vaekit.train import fit

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# A fused Adam skips a non-finite step itself (found_inf); any other optimiser is undone
# from backups (captured) or checked on the host (uncaptured).
OPTIMIZERS = ["fused", "unfused"]


@pytest.fixture(autouse=True)
def _triton_path_only_in_the_child(request):
    """The interpreter's child process runs this file's Triton-path tests only: the others
    ran in the parent (under the interpreter each fit would take minutes)."""
    if CHILD and not request.node.get_closest_marker("triton_path"):
        pytest.skip("run by the parent process")


def _adam(params, device, kind, lr=1e-2):
    kw = {"capturable": True, "lr": torch.tensor(lr, device=device)} if device == "cuda" else {"lr": lr}
    return torch.optim.Adam(params, fused=kind == "fused", **kw)


def _tiny(fast: str, **train):
    return build_config(overrides={
        "train.epochs": 3, "train.fast": fast, "train.progress": False, "model.hidden": (32,),
        "model.latent_dim": 3, "train.grad_clip": 50.0, **{f"train.{k}": v for k, v in train.items()},
    })


def _fits_agree(tmp_path, fast: str, epochs: int, rtol: float, atol: float, device: str = "auto",
                loss_rel: float = 1e-5):
    """Train the tiny config eagerly and with ``fast``; weights (``rtol``, ``atol``) and
    losses (``loss_rel``) agree. Returns the eager run's history."""
    torch.set_num_threads(1)
    eager = fit(_tiny("off", epochs=epochs, device=device), tmp_path / "eager")
    other = fit(_tiny(fast, epochs=epochs, device=device), tmp_path / fast)
    a = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / fast / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)
    for ra, rb in zip(eager.history, other.history):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=loss_rel)
    return eager.history


def test_static_fit_equals_eager_fit(tmp_path):
    # On CUDA the static step's loss is the Triton kernel (other rounding than the eager
    # functions), compounded over 3 epochs of Adam steps: a float32 tolerance, not 1e-5
    # (the losses drift as the weights do).
    cuda = torch.cuda.is_available()
    _fits_agree(tmp_path, "static", 3, rtol=1e-4 if cuda else 1e-5, atol=1e-5 if cuda else 1e-6,
                loss_rel=1e-4 if cuda else 1e-5)


def test_static_fit_with_fused_linear_layers_equals_eager_fit(tmp_path, monkeypatch):
    """fit reads vaekit.fast.FUSED_LINEAR when it builds its static step."""
    from vaekit import fast

    monkeypatch.setattr(fast, "FUSED_LINEAR", True)
    built = []
    monkeypatch.setattr(fast.StaticStep, "_forward_loss", lambda self, *a, _f=fast.StaticStep._forward_loss:
                        built.append(self._plan is not None) or _f(self, *a))
    cuda = torch.cuda.is_available()
    _fits_agree(tmp_path, "static", 2, rtol=1e-4 if cuda else 1e-5, atol=1e-5 if cuda else 1e-6,
                loss_rel=1e-4 if cuda else 1e-5)
    assert built and all(built)


def test_compiled_fit_equals_eager_fit(tmp_path):
    """fast="compile": the same step with its forward pass and loss compiled (inductor's
    C++ on a CPU), within float tolerance of the eager step; bf16 autocast compiles too.
    On the CPU everywhere: it is the CPU fast path (and a GPU compile takes minutes)."""
    history = _fits_agree(tmp_path, "compile", 2, rtol=1e-4, atol=1e-5, device="cpu")
    bf16 = fit(_tiny("compile", epochs=1, amp="bf16", device="cpu"), tmp_path / "bf16")
    assert bf16.history[0]["loss"] == pytest.approx(history[0]["loss"], rel=2e-2)


def _model_and_twin(device, kind):
    """A small MLP VAE with fit's Adam of ``kind``, and its copy with a plain Adam (for
    :func:`_manual_step`)."""
    model = VAE(ModelConfig(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,))).to(device)
    twin = copy.deepcopy(model)
    return model, twin, _adam(model.parameters(), device, kind), torch.optim.Adam(twin.parameters(), lr=1e-2)


def _manual_step(model, opt, x, eps, beta):
    mu, logvar = model.encode_params(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    loss = (model.nll(model.decode(z), x) + beta * gaussian_kl(mu, logvar)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("fused_linear", [False, True])
@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("device", DEVICES)
def test_static_step_matches_a_hand_written_step(device, kind, fused_linear, monkeypatch):
    torch.manual_seed(0)
    model, twin, opt, opt_twin = _model_and_twin(device, kind)
    step = StaticStep(model, opt, batch_size=8, fused_linear=fused_linear)
    assert (step._plan is not None) == fused_linear
    if fused_linear:  # no layer runs as nn.Linear: each one goes through fused_linear, once
        calls = []
        monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.append(self) or x @ 0)
        from vaekit import fast

        monkeypatch.setattr(fast, "fused_linear", lambda *a, _f=fast.fused_linear: calls.append(a) or _f(*a))
    for i in range(6):  # crosses warm-up and capture on CUDA
        x = torch.rand(8, 1, 6, 6, device=device).bernoulli()
        eps = torch.randn(8, 2, device=device)
        beta = 0.5 + i
        step.run(x, eps, 1e-2, beta)
        if fused_linear and i == 0:
            assert [type(c).__name__ for c in calls] == ["tuple"] * 4  # 2 encoder layers (with the head), 2 decoder
            monkeypatch.undo()
        ref = _manual_step(twin, opt_twin, x, eps, beta)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert int(step.skipped) == 0 and float(step.sums[3]) == 48.0
    assert torch.isfinite(ref)


def test_fused_linear_layers_only_where_the_forward_is_the_vae_mlps():
    """StaticStep(fused_linear=True) runs the layers itself only for VAE's own MLP (any of
    its activations; a ReLU goes with its layer), uncompiled and without autocast."""
    from vaekit.fast import _linear_plan

    def plan(step_kw=None, **model_kw):
        model = VAE(ModelConfig(**{"input_shape": (1, 6, 6), "latent_dim": 2, "hidden": (16, 8), **model_kw}))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return StaticStep(model, opt, batch_size=4, fused_linear=True, **(step_kw or {}))._plan

    encoder, decoder = plan()
    assert [type(m).__name__ for m in encoder] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in decoder] == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "Unflatten"]
    assert plan(activation="tanh") is not None
    for kw in ({"arch": "conv", "hidden": (4,)}, {"pixelcnn_layers": 1}, {"likelihood": "gaussian",
               "decoder_variance": "learned"}, {"likelihood": "discretized_logistic"}):
        assert plan(**kw) is None, kw
    assert plan({"amp": True}) is None and plan({"compile": True}) is None
    assert StaticStep(VAE(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,))), torch.optim.Adam(
        [torch.nn.Parameter(torch.zeros(1))]), batch_size=2)._plan is None  # off by default, for now

    class Other(VAE):
        def decode(self, z, x=None):
            return super().decode(z, x) * 2

    assert _linear_plan(Other(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)))) is None


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_step_is_undone_without_a_sync(device, kind):
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,), likelihood="gaussian")).to(device)
    opt = _adam(model.parameters(), device, kind)
    step = StaticStep(model, opt, batch_size=4)
    assert (step._found_inf is not None) == (kind == "fused")
    good = torch.rand(4, 4, device=device)
    for _ in range(5):
        step.run(good, torch.randn(4, 2, device=device), 1e-2, 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    bad = good.clone()
    bad[0, 0] = float("nan")
    step.run(bad, torch.randn(4, 2, device=device), 1e-2, 1.0)
    step.run(bad, torch.randn(4, 2, device=device), 1e-2, 1.0)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for k, v in opt.state[next(model.parameters())].items():
        assert torch.equal(v, state_before[k]), k
    assert int(step.skipped) == 2 and int(step.bad_run) == 2
    step.run(good, torch.randn(4, 2, device=device), 1e-2, 1.0)
    assert int(step.bad_run) == 0 and int(step.skipped) == 2
    assert not torch.equal(next(model.parameters()), before[0])
    # the flag was lent to the static step's step() only: an eager step of the same
    # optimiser after a skipped one is taken
    step.run(bad, torch.randn(4, 2, device=device), 1e-2, 1.0)
    assert not hasattr(opt, "found_inf")
    p = next(model.parameters())
    kept = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p, kept)


def test_a_compile_failure_names_the_option_and_the_way_out(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise OSError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)))
    step = StaticStep(model, torch.optim.Adam(model.parameters()), batch_size=2, compile=True, capture=False)
    with pytest.raises(RuntimeError, match=r"fast='compile'.*OSError: no C\+\+ compiler found\).*'auto' or 'off'"):
        step.run(torch.rand(2, 1, 4, 4).bernoulli(), torch.randn(2, 2), 1e-3, 1.0)
    # A short batch first (its own step runs uncompiled) does not count as the compiled
    # forward's first call: the failure still comes as FastPathError.
    step = StaticStep(model, torch.optim.Adam(model.parameters()), batch_size=2, compile=True, capture=False,
                      other_sizes=True)
    step.run(torch.rand(1, 1, 4, 4).bernoulli(), torch.randn(1, 2), 1e-3, 1.0)
    with pytest.raises(FastPathError, match=r"fast='compile'.*no C\+\+ compiler found"):
        step.run(torch.rand(2, 1, 4, 4).bernoulli(), torch.randn(2, 2), 1e-3, 1.0)


def test_a_capture_failure_names_the_way_out(monkeypatch):
    """On CUDA a step that cannot be captured says which option runs it uncaptured, and
    the process is back on the stream it was on (torch.cuda.graph leaves its capture
    stream only when the capture ends cleanly). Faked here: the capture context moves to
    its stream and raises."""
    streams = {"now": "default"}

    class FailingCapture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            streams["now"] = "capture"
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: streams["now"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: streams.update(now=stream))
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)))
    step = StaticStep(model, torch.optim.Adam(model.parameters(), fused=True), batch_size=2, capture=True, warmup=0)
    with pytest.raises(RuntimeError, match=r"could not be captured in a CUDA graph \(RuntimeError: operation not "
                                            r"permitted when stream is capturing\); train with fast='off'"):
        step.run(torch.rand(2, 1, 4, 4).bernoulli(), torch.randn(2, 2), 1e-3, 1.0)
    assert streams["now"] == "default"
    compiled = StaticStep(model, torch.optim.Adam(model.parameters(), fused=True), batch_size=2, capture=True,
                          warmup=0, compile=True)
    with pytest.raises(RuntimeError, match=r"could not be captured .*train with fast='auto' .* or fast='off'"):
        compiled.run(torch.rand(2, 1, 4, 4).bernoulli(), torch.randn(2, 2), 1e-3, 1.0)


def _failing_third_step(monkeypatch):
    """StaticStep.run raising FastPathError (what a failed capture raises) at its third call."""
    from vaekit import fast

    calls = {"n": 0}
    real = StaticStep.run

    def run(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise fast.FastPathError("the training step could not be captured in a CUDA graph (RuntimeError: "
                                     "faked); train with fast='off' (vaekit train --fast off) to run it uncaptured")
        return real(self, *args)

    monkeypatch.setattr(StaticStep, "run", run)
    return calls


def test_a_failed_capture_falls_back_to_the_eager_step_when_not_asked_for(tmp_path, monkeypatch, capsys):
    """fast='auto' (the static step was not asked for by name): a step that cannot be
    captured is said once on stderr, and the run goes on eagerly from that batch, training
    what a fast='off' run trains (the two static steps before it compute the same). Faked on
    the CPU: 'auto' takes the static step there, and its third call fails."""
    from vaekit import wiring

    torch.set_num_threads(1)
    eager = fit(_tiny("off", epochs=2, device="cpu"), tmp_path / "eager")
    monkeypatch.setattr(wiring, "_use_static", lambda *args: True)
    calls = _failing_third_step(monkeypatch)
    capsys.readouterr()
    fell_back = fit(_tiny("auto", epochs=2, device="cpu"), tmp_path / "auto")
    err = capsys.readouterr().err
    assert calls["n"] == 3  # never called again
    assert err.count("this run goes on with the eager step") == 1 and "(RuntimeError: faked)" in err
    a = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "auto" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    for ra, rb in zip(eager.history, fell_back.history):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb.get("skipped", 0) == ra.get("skipped", 0)


def test_a_failed_capture_asked_for_by_name_stops_the_run(tmp_path, monkeypatch):
    from vaekit.fast import FastPathError

    _failing_third_step(monkeypatch)
    with pytest.raises(FastPathError, match="faked"):
        fit(_tiny("static", epochs=1, device="cpu"), tmp_path / "static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by benchmarks/gpu.sh)")
def test_compiled_and_captured_step_matches_a_hand_written_step():
    """fast='compile' on CUDA: compiled in the first warm-up step, then captured."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,))).to("cuda")
    twin = copy.deepcopy(model)
    opt = _adam(model.parameters(), "cuda", "fused")
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-2)
    step = StaticStep(model, opt, batch_size=8, compile=True)
    assert step.capture and not step._fused
    for i in range(6):
        x = torch.rand(8, 1, 6, 6, device="cuda").bernoulli()
        eps = torch.randn(8, 2, device="cuda")
        step.run(x, eps, 1e-2, 0.5 + i)
        _manual_step(twin, opt_twin, x, eps, 0.5 + i)
    assert step._graph is not None
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert int(step.skipped) == 0 and float(step.sums[3]) == 48.0


def test_learning_rate_and_beta_are_written_when_they_change_and_after_resync():
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)))
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    step = StaticStep(model, opt, batch_size=2)
    x, eps = torch.rand(2, 4).bernoulli(), torch.randn(2, 2)
    lr_tensor = opt.param_groups[0]["lr"]
    for lr, beta in [(0.1, 1.0), (0.1, 1.0), (0.2, 3.0), (0.2, 3.0)]:
        step.run(x, eps, lr, beta)
        assert float(lr_tensor) == pytest.approx(lr) and float(step.beta) == beta
    lr_tensor.fill_(0.5)  # an eager step of fit's loop writes the learning rate
    step.resync()
    step.run(x, eps, 0.2, 3.0)
    assert float(lr_tensor) == pytest.approx(0.2)
    step.beta.fill_(7.0)  # not the way to change it: the value is what run() last wrote
    step.run(x, eps, 0.2, 3.0)
    assert float(step.beta) == 7.0
    step.run(x, eps, 0.2, 2.0)
    assert float(step.beta) == 2.0


@pytest.mark.parametrize("lr_kind", ["number", "tensor", "compiled"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_block_of_steps_equals_the_steps_one_by_one(device, lr_kind):
    """run_block(K batches) does what K calls of run() do (on CUDA: after the single step
    is captured, as one captured graph of K steps), a non-finite batch inside the block
    included. A step's batch (7 x 25 floats) and noise (7 x 2) are not whole 16-byte units:
    the block's slices are padded to start on 16-byte boundaries as the single step's do."""
    if device == "cuda" and lr_kind == "compiled":
        pytest.skip("a GPU compile takes a minute; the compiled captured step has its own CUDA test")
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 5, 5), latent_dim=2, hidden=(16,))).to(device)
    twin = copy.deepcopy(model)

    def adam(m):
        if device == "cuda":
            return _adam(m.parameters(), device, "fused")
        lr = torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2
        return torch.optim.Adam(m.parameters(), lr=lr)

    compiled = lr_kind == "compiled"  # fed through the single step's buffers
    blocked, single = (StaticStep(m, adam(m), batch_size=7, compile=compiled) for m in (model, twin))
    k = 5
    for block in range(4):  # on CUDA: the first block warms up and captures the single step
        xs = torch.rand(k, 7, 1, 5, 5, device=device).bernoulli()
        if block == 2:
            xs[3, 0, 0, 0, 0] = float("nan")
        eps = torch.randn(k, 7, 2, device=device)
        lrs = [1e-2 * (1 + 0.1 * (block * k + i)) for i in range(k)]
        betas = [0.5 + 0.25 * i for i in range(k)]
        blocked.run_block(xs, eps, lrs, betas)
        for i in range(k):
            single.run(xs[i], eps[i], lrs[i], betas[i])
    # On CUDA a block's batch is a slice of its stacked batches, the single step's its own
    # buffer: other pointer alignments, so cuBLAS may pick another algorithm (other rounding).
    cuda = device == "cuda"
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5 if cuda else 1e-6, atol=1e-6 if cuda else 1e-7)
    torch.testing.assert_close(blocked.sums, single.sums, **({"rtol": 1e-5, "atol": 1e-6} if cuda else {}))
    assert float(blocked.sums[3]) == 7 * 19 and int(blocked.skipped) == int(single.skipped) == 1
    blocked.run(xs[0], eps[0], 0.5, 1.0)  # a single step after a block writes its own lr again
    lr = blocked.opt.param_groups[0]["lr"]
    assert float(lr) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one entry per step"):
        blocked.run_block(xs, eps, lrs[:2], betas)


def test_aligned_slots_start_each_slice_on_16_bytes():
    for dtype, shape in [(torch.float32, (7, 2)), (torch.float32, (3, 5, 5)), (torch.bfloat16, (9,)), (torch.float64, (1,))]:
        like = torch.zeros(shape, dtype=dtype)
        slots = _aligned_slots(6, like)
        assert slots.shape == (6, *shape) and slots.dtype == dtype
        assert all(slots[i].data_ptr() % 16 == 0 and slots[i].is_contiguous() for i in range(6))
        values = torch.randn(6, *shape).to(dtype)
        slots.copy_(values)
        assert torch.equal(slots, values)


@pytest.mark.parametrize("extra", [{}, {"checkpoint_every": 5, "max_steps": 37}])
def test_fit_in_blocks_of_steps_is_the_same_run(tmp_path, extra):
    """TrainConfig(graph_steps=k): the static path k steps a call trains exactly the same
    run, around checkpoints every few steps, a step limit inside a block and the epoch's
    short last batch. On the CPU, bit for bit (the loop's logic; the captured block on CUDA
    is compared with single steps in test_a_block_of_steps_equals_the_steps_one_by_one)."""
    torch.set_num_threads(1)
    runs, blocks = {}, []
    real = StaticStep.run_block

    def spy(self, xs, *args):
        blocks.append(xs.shape[0])
        return real(self, xs, *args)

    for k in (1, 4, 7):
        config = _tiny("static", epochs=3, graph_steps=k, lr_schedule="cosine", device="cpu", **extra)
        config.objective = dataclasses.replace(config.objective, beta_schedule="linear", warmup_steps=30)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(StaticStep, "run_block", spy)
            runs[k] = fit(config, tmp_path / str(k))
        assert runs[k].history
    # a block of 7 always holds a multiple of 5 (a checkpoint inside): those steps run singly
    assert set(blocks) == ({4} if extra else {4, 7})
    ref = load_checkpoint(tmp_path / "1" / "checkpoint.pt")
    for k in (4, 7):
        got = load_checkpoint(tmp_path / str(k) / "checkpoint.pt")
        assert got["step"] == ref["step"]
        for name, v in ref["model"].items():
            assert torch.equal(v, got["model"][name]), (k, name)
        strip = lambda h: [{c: v for c, v in r.items() if c != "seconds"} for r in h]  # noqa: E731
        assert strip(runs[k].history) == strip(runs[1].history)


def test_graph_steps_is_checked():
    with pytest.raises(ValueError, match="graph_steps"):
        _tiny("static", graph_steps=0)
    with pytest.raises(ValueError, match=r"graph_steps must be 1 with fast 'off'.*got 4"):
        _tiny("off", graph_steps=4)


@pytest.mark.parametrize("fast", ["static", "compile"])
@pytest.mark.parametrize("objective", [{"name": "iwae", "iw_samples": 2}, {"free_bits": 0.5}])
def test_a_static_step_asked_for_by_name_is_refused_where_it_cannot_serve(tmp_path, fast, objective):
    """fast='static' or 'compile' for a run the static step does not compute is an error
    before anything is written, not a quiet eager run; 'auto' takes the eager step."""
    config = _tiny(fast, epochs=1)
    config.objective = dataclasses.replace(config.objective, **objective)
    with pytest.raises(ValueError, match=rf"train.fast='{fast}' cannot serve this run: .*use fast='auto' or 'off'"):
        fit(config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    config.train = dataclasses.replace(config.train, fast="auto", device="cpu")
    assert fit(config, tmp_path / "auto").history


@pytest.mark.parametrize("objective", [{"name": "iwae", "iw_samples": 2}, {"free_bits": 0.5}])
def test_blocks_of_static_steps_are_refused_where_the_static_step_cannot_serve(tmp_path, objective):
    """graph_steps > 1 under fast='auto' asks for the static step's blocks: a run it does
    not compute is refused before anything is written (it used to take the eager step a
    step at a time, the setting quietly unused)."""
    config = _tiny("auto", epochs=1, graph_steps=4)
    config.objective = dataclasses.replace(config.objective, **objective)
    with pytest.raises(ValueError, match=r"train.graph_steps=4 \(blocks of static steps\) cannot serve this run: "
                                         r".*use graph_steps=1"):
        fit(config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_fit_in_blocks_resumes_bit_for_bit(tmp_path, monkeypatch):
    import vaekit.train

    torch.set_num_threads(1)
    blobs, save = [], vaekit.train.save_checkpoint

    def keep(path, state, **kw):
        save(path, state, **kw)
        blobs.append((state["step"], path.read_bytes()))

    monkeypatch.setattr(vaekit.train, "save_checkpoint", keep)
    config = _tiny("static", epochs=2, graph_steps=4, checkpoint_every=4, device="cpu")  # bit for bit: on the CPU
    fit(config, tmp_path / "full")
    monkeypatch.setattr(vaekit.train, "save_checkpoint", save)
    final = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    spe = final["step"] // 2
    middle = [(s, b) for s, b in blobs if s % spe not in (0,)][:3]  # mid-epoch checkpoints
    assert len(middle) == 3
    for step, blob in middle:
        rd = tmp_path / f"from-{step}"
        rd.mkdir()
        (rd / "checkpoint.pt").write_bytes(blob)
        fit(config, rd, resume=True)
        got = load_checkpoint(rd / "checkpoint.pt")
        assert got["step"] == final["step"]
        for name, v in final["model"].items():
            assert torch.equal(v, got["model"][name]), (step, name)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_in_blocks_and_resumed_mid_epoch_is_the_same_run(tmp_path, monkeypatch, device):
    """The static path as fit runs it on ``device`` (on CUDA: captured, the fused Adam
    reading its learning rate from a device tensor): 4 steps a block train the run one
    step at a time trains, and a resume from a mid-epoch checkpoint of it continues it
    (the restored optimiser keeps the learning-rate tensor the graphs read), under a
    cosine learning rate and a KL warm-up."""
    import vaekit.train

    torch.set_num_threads(1)

    def config(k):
        c = _tiny("static", epochs=2, graph_steps=k, lr_schedule="cosine", checkpoint_every=8, device=device)
        c.objective = dataclasses.replace(c.objective, beta_schedule="linear", warmup_steps=30)
        return c

    fit(config(1), tmp_path / "single")
    blobs, save = [], vaekit.train.save_checkpoint

    def keep(path, state, **kw):
        save(path, state, **kw)
        blobs.append((state["step"], path.read_bytes()))

    monkeypatch.setattr(vaekit.train, "save_checkpoint", keep)
    fit(config(4), tmp_path / "blocks")
    monkeypatch.setattr(vaekit.train, "save_checkpoint", save)
    single, blocks = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("single", "blocks"))
    per_epoch = blocks["step"] // 2
    step, blob = next((s, b) for s, b in blobs if per_epoch < s < 2 * per_epoch - 8)  # mid second epoch
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "checkpoint.pt").write_bytes(blob)
    fit(config(4), tmp_path / "resumed", resume=True)
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert single["step"] == blocks["step"] == resumed["step"] and step < resumed["step"]
    for name, v in single["model"].items():
        torch.testing.assert_close(blocks["model"][name], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(resumed["model"][name], v, rtol=1e-5, atol=1e-6)


def test_tf32_is_cuda_only_and_its_flags_hold_only_while_training(tmp_path, monkeypatch):
    """train.amp="tf32": refused off CUDA (the run would record an arithmetic it did not
    use); the flags are set while the training loop runs and restored after, also on an
    error; on CUDA a run agrees with float32 training within TF32's rounding."""
    with pytest.raises(ValueError, match=r"train.amp='tf32' is CUDA's arithmetic .* on cpu"):
        fit(_tiny("auto", epochs=1, amp="tf32", device="cpu"), tmp_path / "cpu")
    assert not (tmp_path / "cpu" / "checkpoint.pt").exists()
    import vaekit.train as train_module

    class Run:  # what _tf32 reads of a run
        class tc:
            amp = "tf32"

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with train_module._tf32(Run):
                assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                raise RuntimeError("inside")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        Run.tc.amp = "none"
        with train_module._tf32(Run):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if not torch.cuda.is_available():
        return
    before = torch.backends.cuda.matmul.allow_tf32
    fp32 = fit(_tiny("auto", epochs=2, device="cuda"), tmp_path / "fp32")
    seen = []
    real_validate = train_module._validate

    def watching(*a, **k):  # the loop's flag when an epoch ends (validation itself runs in fp32)
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real_validate(*a, **k)

    monkeypatch.setattr(train_module, "_validate", watching)
    tf32 = fit(_tiny("auto", epochs=2, amp="tf32", device="cuda"), tmp_path / "tf32")
    assert seen == [True, True] and torch.backends.cuda.matmul.allow_tf32 == before
    for a, b in zip(fp32.history, tf32.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)


def test_the_training_loop_and_the_budget_trial_run_inside_the_precision_context(tmp_path, monkeypatch):
    """Where fit and the time-budget calibration enter train._tf32 (what makes
    amp="tf32" reach the steps): the training steps and the validation run inside it."""
    import vaekit.budget as budget
    import vaekit.train as train_module
    from test_cli import tiny_config

    inside, seen = [], []

    @contextlib.contextmanager
    def recorder(run):
        inside.append(run.tc.amp)
        try:
            yield
        finally:
            inside.pop()

    real_validate, real_epoch = train_module._validate, train_module._train_epoch

    def validate(*a, **k):
        seen.append(("validate", bool(inside)))
        return real_validate(*a, **k)

    def epoch(*a, **k):
        seen.append(("train", bool(inside)))
        return real_epoch(*a, **k)

    monkeypatch.setattr(train_module, "_tf32", recorder)
    monkeypatch.setattr(budget, "_tf32", recorder)
    monkeypatch.setattr(train_module, "_validate", validate)
    monkeypatch.setattr(train_module, "_train_epoch", epoch)
    monkeypatch.setattr(budget, "_train_epoch", epoch)
    fit(tiny_config(train__epochs=2), tmp_path / "run")
    assert seen and all(flag for _, flag in seen) and {kind for kind, _ in seen} == {"train", "validate"}
    seen.clear()
    budget.epochs_for_budget(tiny_config(train__epochs=2), 10.0)
    assert seen and all(flag for _, flag in seen)
    assert not inside


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_short_batch_takes_a_static_step_of_its_own(device, kind):
    """other_sizes: a batch of another size (an epoch's short last one) gets buffers of its
    own (on CUDA: warm-up steps, then a graph of its own), between steps of the main size,
    and computes the hand-written step."""
    torch.manual_seed(0)
    model, twin, opt, opt_twin = _model_and_twin(device, kind)
    step = StaticStep(model, opt, batch_size=8, other_sizes=True)
    sizes = [8, 8, 8, 8, 5, 8, 5, 8, 5, 3, 5, 8, 5, 3, 3]  # crosses both sizes' warm-ups and captures
    for i, b in enumerate(sizes):
        x = torch.rand(b, 1, 6, 6, device=device).bernoulli()
        eps = torch.randn(b, 2, device=device)
        step.run(x, eps, 1e-2, 0.5 + i)
        _manual_step(twin, opt_twin, x, eps, 0.5 + i)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert int(step.skipped) == 0 and float(step.sums[3]) == sum(sizes)
    if device == "cuda":
        assert all(step._others[b].graph is not None for b in (5, 3))


def test_other_batch_sizes_are_served_when_capturing_by_default():
    model = VAE(ModelConfig(input_shape=(4,), latent_dim=2, hidden=(8,)))
    step = StaticStep(model, torch.optim.Adam(model.parameters(), lr=1e-2), batch_size=4)
    assert not step.capture and not step.other_sizes
    assert step.serves(4) and not step.serves(3)
    with pytest.raises(ValueError, match=r"takes batches of 4 examples \(and other sizes: other_sizes=True\), got 3"):
        step.run(torch.rand(3, 4), torch.randn(3, 2), 1e-2, 1.0)
    assert StaticStep(model, torch.optim.Adam(model.parameters(), lr=1e-2), batch_size=4,
                      capture=True).other_sizes  # never run: capturing needs CUDA


def _short_batch_static(monkeypatch):
    """fit's static step serving the short last batch on the CPU too (on CUDA it does by
    default); the eager steps counted."""
    import functools

    import vaekit.train
    from vaekit import wiring

    monkeypatch.setattr(wiring, "StaticStep", functools.partial(StaticStep, other_sizes=True))
    eager, real = [], vaekit.train._eager_step

    def counted(run, x, *args):
        eager.append(x.shape[0])
        return real(run, x, *args)

    monkeypatch.setattr(vaekit.train, "_eager_step", counted)
    return eager


def test_fit_takes_the_short_last_batch_in_the_static_step(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    config = _tiny("static", epochs=2, device="cpu")
    ref = fit(config, tmp_path / "eager-short")
    eager = _short_batch_static(monkeypatch)
    got = fit(config, tmp_path / "static-short")
    assert eager == []  # no eager step: the short batches went to the static step
    a = load_checkpoint(tmp_path / "eager-short" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "static-short" / "checkpoint.pt")
    assert ref.history[-1]["step"] == b["step"] and a["step"] == b["step"]
    from vaekit.data import load_dataset
    assert 0 < len(load_dataset(config.data).train) % config.train.batch_size  # the tiny data end short
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    for ra, rb in zip(ref.history, got.history):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_a_short_batch_that_cannot_be_captured_goes_back_to_the_eager_step_alone(tmp_path, monkeypatch, capsys):
    from vaekit.fast import FastPathError

    torch.set_num_threads(1)
    config = _tiny("static", epochs=2, device="cpu")
    ref = fit(config, tmp_path / "ref")
    eager = _short_batch_static(monkeypatch)

    def failing(self, x, *args):
        self._others[x.shape[0]] = None  # what a failed capture leaves
        raise FastPathError(f"the training step on a batch of {x.shape[0]} could not be captured in a CUDA "
                            f"graph (RuntimeError: faked); batches of {x.shape[0]} take the eager step")

    monkeypatch.setattr(StaticStep, "_run_other", failing)
    capsys.readouterr()
    got = fit(config, tmp_path / "fell-back")  # fast='static' by name: still no stop
    err = capsys.readouterr().err
    assert err.count("could not be captured") == 1 and "faked" in err
    assert len(eager) == 2 and all(b < config.train.batch_size for b in eager)  # one short batch an epoch
    for ra, rb in zip(ref.history, got.history):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


@pytest.mark.skipif(CHILD, reason="this is the child process")
@pytest.mark.skipif(NATIVE, reason="CUDA is here: the Triton-path tests ran on the GPU in this process")
def test_triton_interpreter():
    run_file_interpreted(__file__)


# ------------------------------------------------------------------ Triton path


def _float64_step(weights, x, eps, beta, cfg):
    """One step's (loss, reconstruction, KL), batch means, and the weights' gradients for an
    MLP VAE with ReLUs, in float64, written out: the layers in the order of
    ``model.parameters()`` (encoder, head, decoder), the log-variance bounded by
    ``L tanh(raw / L)``, the reparameterised sample, the likelihood and the KL."""
    w = [t.detach().double().requires_grad_() for t in weights]
    layers = list(zip(w[0::2], w[1::2]))
    h = x.double().flatten(1)
    for i, (weight, bias) in enumerate(layers):
        h = h @ weight.T + bias
        if i == len(cfg.hidden):  # the head
            mu, raw = h.chunk(2, 1)
            logvar = cfg.logvar_limit * torch.tanh(raw / cfg.logvar_limit)
            h = mu + torch.exp(logvar / 2) * eps.double()
        elif i < len(layers) - 1:
            h = torch.relu(h)
    xf = x.double().flatten(1)
    if cfg.likelihood == "bernoulli":
        rec = h.clamp(min=0) - h * xf + torch.log1p(torch.exp(-h.abs()))
    else:
        rec = 0.5 * (math.log(2 * math.pi) + cfg.fixed_logvar + (xf - h) ** 2 * math.exp(-cfg.fixed_logvar))
    rec = rec.sum(1).mean()
    kl = (0.5 * (torch.exp(logvar) - 1 - logvar + mu**2)).sum(1).mean()
    loss = rec + beta * kl
    grads = torch.autograd.grad(loss, w)
    return [float(t.detach()) for t in (loss, rec, kl)], grads


@interpreted
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_static_step_with_every_fast_option_matches_a_float64_step(likelihood):
    """The fused loss, sample and linear layers and the Triton Adam tail at once (on CUDA
    captured after the warm-up) against a float64 step written out here: the forward pass
    and loss (:func:`_float64_step`), then clip_grad_norm_ and Adam with L2 weight decay.
    Two NaN batches are skipped and counted, the last one left in bad_run; the sums keep
    the accepted steps' loss, reconstruction and KL times the batch size."""
    device = torch.empty(0).device
    torch.manual_seed(0)
    cfg = ModelConfig(input_shape=(13,), latent_dim=3, hidden=(11, 7), likelihood=likelihood, logvar_limit=4.0,
                      **({"fixed_logvar": -0.7} if likelihood == "gaussian" else {}))
    model = VAE(cfg)
    clip, wd, (b1, b2), adam_eps, B = 0.5, 0.1, (0.9, 0.999), 1e-8, 6
    kw = {"capturable": True, "lr": torch.tensor(1e-2, device=device)} if device.type == "cuda" else {"lr": 1e-2}
    opt = torch.optim.Adam(model.parameters(), weight_decay=wd, **kw)
    step = StaticStep(model, opt, batch_size=B, grad_clip=clip, adam_kernel=True, fused_sample=True,
                      fused_linear=True)
    assert step._fused and step._fused_sample and step._plan is not None and step._tail is not None
    weights = [p.detach().cpu().double() for p in model.parameters()]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    taken, skipped, bad_run, sums = 0, 0, 0, torch.zeros(4, dtype=torch.float64, device="cpu")
    g = torch.Generator().manual_seed(1)
    lrs, betas = [1e-2, 5e-3, 2e-2, 1e-2, 3e-2, 1e-2, 1e-2], [0.0, 0.5, 1.0, 2.0, 1.0, 0.3, 1.0]
    for i, (lr, beta) in enumerate(zip(lrs, betas)):
        x = torch.rand((B, 13), generator=g, device="cpu")
        x = x.round() if likelihood == "bernoulli" else 4 * x - 2
        eps = torch.randn((B, 3), generator=g, device="cpu")
        if i in (2, 6):
            x[1, 2] = float("nan")
        step.run(x.to(device), eps.to(device), lr, beta)
        terms, grads = _float64_step(weights, x, eps, beta, cfg)
        norm = math.sqrt(sum(float((gr * gr).sum()) for gr in grads))
        if not (math.isfinite(terms[0]) and math.isfinite(norm)):
            skipped, bad_run = skipped + 1, bad_run + 1
            continue
        taken, bad_run = taken + 1, 0
        scale = min(clip / (norm + 1e-6), 1.0)
        for j, gr in enumerate(grads):
            gr = gr * scale + wd * weights[j]
            m[j] = b1 * m[j] + (1 - b1) * gr
            v[j] = b2 * v[j] + (1 - b2) * gr * gr
            denom = v[j].sqrt() / math.sqrt(1 - b2**taken) + adam_eps
            weights[j] = weights[j] - lr / (1 - b1**taken) * m[j] / denom
        sums += torch.tensor([*terms, 1.0], dtype=torch.float64, device="cpu") * B
    for p, w in zip(model.parameters(), weights):
        torch.testing.assert_close(p.detach().cpu().double(), w, rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["step"]) == taken == 5
    torch.testing.assert_close(step.sums.cpu(), sums, rtol=2e-6, atol=0)
    assert float(step.sums[3]) == 5 * B
    assert (int(step.skipped), int(step.bad_run)) == (skipped, bad_run) == (2, 1)


# ------------------------------------------------------------------ bf16 autocast, refusals


def test_the_static_step_under_amp_computes_in_bfloat16_on_the_cpu():
    """StaticStep(amp=True) off CUDA really autocasts its forward pass to bfloat16: each
    step's loss and the weights after it are those of the eager step under
    torch.autocast('cpu', bfloat16) (to float32 rounding of the loss's sum), and not those
    of the float32 step, which differ by some 1e-3 nats a step (bfloat16's 8-bit mantissa)."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,)))
    m32, eager = copy.deepcopy(model), copy.deepcopy(model)
    bf16_step = StaticStep(model, _adam(model.parameters(), "cpu", "fused"), batch_size=8, amp=True)
    f32_step = StaticStep(m32, _adam(m32.parameters(), "cpu", "fused"), batch_size=8)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.rand(8, 1, 6, 6, generator=g).bernoulli(generator=g)
        eps = torch.randn(8, 2, generator=g)
        before = float(bf16_step.sums[0]), float(f32_step.sums[0])
        bf16_step.run(x, eps, 1e-2, 1.0)
        f32_step.run(x, eps, 1e-2, 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = float(_manual_step(eager, eager_opt, x, eps, 1.0).detach())
        got, f32 = (float(bf16_step.sums[0]) - before[0]) / 8, (float(f32_step.sums[0]) - before[1]) / 8
        assert got == pytest.approx(want, rel=1e-6, abs=1e-5)
        assert abs(got - f32) > 3e-4
    for p, q, r in zip(model.parameters(), eager.parameters(), m32.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert max(float((p - r).detach().abs().max()) for p, r in zip(model.parameters(), m32.parameters())) > 1e-3


def test_fit_with_amp_bf16_gives_the_static_step_bfloat16_as_the_eager_step_has_it(tmp_path, monkeypatch):
    """fit(fast='static', amp='bf16') on the CPU: the weights and losses of the eager
    bfloat16 run (fast='off', amp='bf16'), not those of the float32 static run."""
    import vaekit.train

    monkeypatch.setattr(vaekit.train, "save_run_pictures", lambda *args, **kw: None)  # seconds of drawing
    monkeypatch.setattr(vaekit.train, "_tensorboard", lambda run_dir: None)
    torch.set_num_threads(1)
    runs = {}
    for name, fast, amp in (("static-bf16", "static", "bf16"), ("eager-bf16", "off", "bf16"),
                            ("static-f32", "static", "none")):
        result = fit(_tiny(fast, epochs=1, max_steps=6, amp=amp, device="cpu"), tmp_path / name)
        runs[name] = result.history[0]["loss"], load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]
    (loss, weights), (eager_loss, eager_weights), (f32_loss, f32_weights) = runs.values()
    assert loss == pytest.approx(eager_loss, rel=1e-7)
    assert abs(loss - f32_loss) > 1e-4
    for k in weights:
        torch.testing.assert_close(weights[k], eager_weights[k], rtol=1e-5, atol=1e-6)
    assert max(float((weights[k] - f32_weights[k]).abs().max()) for k in weights) > 1e-3


def test_the_static_step_refuses_a_decoder_variance_it_does_not_compute(tmp_path):
    """decoder_variance='optimal' (each batch's own maximum-likelihood variance, and the
    evaluation variance tracked in a buffer) is the eager step's alone: fast='static' is
    refused by name before anything is written, and the message says what the run was
    given; fast='auto' takes the eager step."""
    from vaekit.fast import static_step_supported
    from vaekit.objectives import ObjectiveConfig

    config = _tiny("static", epochs=1, max_steps=2, device="cpu")
    config.model = dataclasses.replace(config.model, likelihood="gaussian", decoder_variance="optimal")
    cfg = dataclasses.replace(config.model, input_shape=(1, 8, 8))
    assert not static_step_supported(VAE(cfg), ObjectiveConfig())
    assert static_step_supported(VAE(dataclasses.replace(cfg, decoder_variance="learned")), ObjectiveConfig())
    with pytest.raises(ValueError, match=r"^train\.fast='static' cannot serve this run: it serves the plain ELBO .* "
                                         r"of fixed or learned variance, and this run's objective 'elbo', likelihood "
                                         r"'gaussian', decoder_variance 'optimal' takes the eager step; use "
                                         r"fast='auto' or 'off'$"):
        fit(config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    config.train = dataclasses.replace(config.train, fast="auto")
    assert fit(config, tmp_path / "auto").history
