"""Seconds per epoch of the classic MNIST VAE (784-400-20, ReLU, Bernoulli, Adam lr 1e-3,
batch 128, the 60,000 training images statically binarized), in one run, for:

  (a) classic       the tutorial recipe, the baseline: DataLoader(TensorDataset, shuffle),
                    F.binary_cross_entropy(sigmoid(logits), x, reduction="sum") + the KL
                    formula, loss.item() every step
  (b) vaekit eager  the eager step of vaekit.train.fit, from vaekit's public pieces:
                    vaekit.models.VAE, data kept on the device by BatchIterator,
                    objective_loss with step-keyed noise and the value checks off,
                    backward, clip_grad_norm_, finiteness check (a sync), Adam, epoch sums
  (c) vaekit static the static step fit takes by default on CUDA: vaekit.fast.StaticStep
                    (fused loss, capturable fused Adam, one CUDA-graph replay per step; run
                    uncaptured on a CPU), counters read every 50 steps
  (c') CUDA only    the same with the capturable unfused Adam, a non-finite step undone
                    from copies inside the graph (fit's choice until the fourth session)
  (c'') CUDA only   (c) with 32 steps captured in one graph (StaticStep.run_block, what
                    fit does with graph_steps=32): the host's work per step 32x smaller
  (d) pythae        pythae 0.1.2's VAE and BaseTrainer.train_step (if importable)
  (e) matmul floor  the same four Linear layers and ReLUs, loss = sum of the outputs,
                    backward and a fused Adam (Adam(fused=True)), on contiguous pre-sliced
                    batches: no sampling, no likelihood, no data pipeline
  (f) vaekit fit    vaekit.train.fit itself for 1 + --epochs epochs (validation on 1,000
                    images and a checkpoint after each): per-epoch times from its metrics;
                    "fast=compile": fit with TrainConfig(fast="compile"); on CUDA also
                    "graph_steps=32": 32 steps a captured graph, uncompiled and compiled,
                    and "TF32": fit with TrainConfig(amp="tf32")
  (g) vaekit compiled  the static step with its forward pass and loss compiled by
                    torch.compile (StaticStep(compile=True): TrainConfig(fast="compile"),
                    vaekit's CPU fast path; on CUDA the compiled step is also captured);
                    the compilation happens in the warm-up
  (g'') CUDA only   (g) with 32 steps captured in one graph: fewer kernels a step and the
                    host's work per step 32x smaller, both
  (c+), (g+) CUDA   (c) and (g) with the step's tail (gradient norm, non-finite rule, Adam,
                    counters) as vaekit.adam_tail's three Triton kernels
                    (StaticStep(adam_kernel=True)), uncompiled also with the fused posterior
                    sample (fused_sample=True); each also with TF32 matrix products,
                    and under bf16 autocast, where the tail keeps bfloat16 copies of the
                    weights (no casts); and (f) with it and TF32 (TrainConfig(adam_kernel=
                    True, amp="tf32")) and with it under bf16, uncompiled and compiled
  (c++) CUDA        (c+) with the linear layers as vaekit.kernels.fused_linear (bias and
                    ReLU in the product's epilogue, the bias gradient and ReLU's mask in
                    one Triton kernel: StaticStep(fused_linear=True)), fp32, TF32 and bf16
                    with the tail's weight copies

--dynamic: the images stay grey and every contender but the floor and pythae binarizes
each batch afresh (dynamic binarization, what vaekit's MNIST presets train on): the
classic recipe with torch.bernoulli on each batch, vaekit through BatchIterator(
dynamic_binarize=True), fit with DataConfig(binarize="dynamic"). pythae has no dynamic
binarization and is left out.

--amp picks the precision of (b), (e), (f) and (g): "none" (fp32 only), "bf16" (bf16 only) or
"both" (each twice, the bf16 rows labelled ", bf16 autocast"). bf16 means what
TrainConfig(amp="bf16") does: the forward and the loss under torch.autocast(bfloat16),
the backward and Adam on the float32 weights; (f) runs with TrainConfig(amp="bf16").
(a), (c) and (d) always run in fp32. Default: "both" on a CPU, "none" on CUDA (where
benchmarks/gpu.sh runs this script under a time limit).

Contenders (a)-(e) are built once, warmed up for --warmup steps, then timed one epoch
each in turn, --epochs times (interleaved, so that load from other processes hits all of
them alike); the median is reported. --threads takes a list: on a CPU the whole set is
run once per thread count. "classic/this" is always against the fp32 classic recipe
(a), "pythae/this" against pythae (d) where it ran; "this/floor" is against the floor (e)
of the row's own precision where it was run (the column after it says which floor). The
32-step block rows (CUDA) warm up for at least 96 steps, whole blocks.

  python benchmarks/epoch_bench.py --device cpu --threads 1,2 --epochs 3
  python benchmarks/epoch_bench.py --device cpu --threads 2 --amp none   # fp32 rows only
  /tmp/pythae-venv/bin/python benchmarks/epoch_bench.py      # with the pythae contender
  python benchmarks/epoch_bench.py --device cuda --data synthetic
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pythae_compare import (  # noqa: E402  (shared benchmark helpers)
    DEFAULT_DATA, MLPEncoder, device_arg, import_pythae, load_mnist, mlp_decoder, pythae_dataset, pythae_trainer,
    pythae_vae, quiet, sync, warm_up_torch, write_npz,
)

BATCH, HIDDEN, LATENT, LR = 128, 400, 20, 1e-3
BF16 = ", bf16 autocast"  # appended to the label of a contender run under bf16 autocast
AMP_CHOICES = {"none": (False,), "bf16": (True,), "both": (False, True)}


def autocast(device, amp: bool):
    """What fit wraps the forward in: torch.autocast(bfloat16) for TrainConfig(amp="bf16"),
    else nothing (the fp32 rows run exactly the code they ran before --amp existed)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


class ClassicVAE(nn.Module):
    """The tutorial model: fc1, fc21/fc22 (mu, logvar), fc3, fc4 (logits)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, HIDDEN), nn.Linear(HIDDEN, LATENT), nn.Linear(HIDDEN, LATENT)
        self.fc3, self.fc4 = nn.Linear(LATENT, HIDDEN), nn.Linear(HIDDEN, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def classic(x, device, dynamic: bool = False):
    model = ClassicVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=BATCH, shuffle=True)

    def run(max_steps=None):
        model.train()
        total = 0.0
        for i, (xb,) in enumerate(loader):
            if max_steps is not None and i >= max_steps:
                break
            xb = xb.to(device)
            if dynamic:
                xb = torch.bernoulli(xb)
            logits, mu, logvar = model(xb)
            bce = F.binary_cross_entropy(torch.sigmoid(logits), xb, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = bce + kld
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sync(device)

    return run


def vaekit_loop(x, device, static: bool, amp: bool = False, compiled: bool = False, fused_adam: bool = True,
                adam_kernel: bool = False, tf32: bool = False,
                dynamic: bool = False, block: int = 1, fused_linear: bool = False):
    """The loop vaekit.train.fit runs, from vaekit's public pieces: data on the device in a
    BatchIterator, noise from a generator re-seeded from the step, the losses' value checks
    off (fit checks the data once, up front). Eager: objective_loss (under bf16 autocast
    with ``amp``, as fit runs it), backward, clip_grad_norm_, finiteness check (a sync),
    Adam, epoch sums. Static: vaekit.fast.
    StaticStep (one CUDA graph replay per step on CUDA, uncaptured elsewhere) with its
    counters read every 50 steps; the short last batch takes the eager step off CUDA and a
    captured step of its own on CUDA, as in fit.
    Compiled: the static step with ``compile=True`` (its forward and loss under bf16
    autocast with ``amp``; captured on CUDA, as fit runs it). On CUDA the static step's Adam is fit's (capturable,
    fused: the kernel skips a non-finite step); ``fused_adam=False`` gives the capturable
    unfused Adam, whose non-finite steps the captured graph undoes from copies. ``block``
    > 1 (static only): ``block`` steps a call of ``StaticStep.run_block`` (on CUDA one
    captured graph of that many steps), the noise drawn once a block. ``adam_kernel``: the
    static step's tail as vaekit.adam_tail's Triton kernels (StaticStep(adam_kernel=True));
    ``tf32``: every step (warm-up and capture too) with TF32 matrix products, as
    TrainConfig(amp="tf32") trains. ``fused_linear``: the linear layers as
    vaekit.kernels.fused_linear (StaticStep(fused_linear=True))."""
    from vaekit import VAE, ModelConfig, ObjectiveConfig
    from vaekit.batching import BatchIterator, mix_seed
    from vaekit.fast import OTHER_WARMUP, StaticStep
    from vaekit.latents import tf32_flags
    from vaekit.losses import set_validate_args
    from vaekit.objectives import objective_loss

    model = VAE(ModelConfig(arch="mlp", input_shape=(784,), hidden=(HIDDEN,), latent_dim=LATENT,
                            activation="relu", likelihood="bernoulli")).to(device)
    from vaekit.config import TrainConfig
    from vaekit.steps import _adam

    if static and device.type == "cuda":
        if fused_adam:  # as fit builds it for a captured step
            opt = _adam(model, TrainConfig(lr=LR), captured_on=device)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(LR, device=device), capturable=True)
    else:  # as fit builds it: fused where torch has the kernel for the device
        opt = _adam(model, TrainConfig(lr=LR))
    batches = BatchIterator(x, BATCH, shuffle=True, seed=0, device=device, dynamic_binarize=dynamic)
    step_fn = None
    if static:
        step_fn = StaticStep(model, opt, batch_size=BATCH, amp=amp and (compiled or adam_kernel), compile=compiled,
                             adam_kernel=adam_kernel, fused_sample=adam_kernel,  # the (c+) rows: both new kernels
                             fused_linear=fused_linear)
    config, n = ObjectiveConfig(), x.shape[0]
    gen = torch.Generator(device=device)
    state = {"step": 0, "epoch": 0}

    def noise(shape):
        gen.manual_seed(mix_seed(0, 1, state["step"]))
        return torch.randn(shape, generator=gen, device=device)

    def eager(xb, sums):
        for g in opt.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(LR)
            else:
                g["lr"] = LR
        with autocast(device, amp):
            out = objective_loss(model, xb, config, state["step"], dataset_size=n, noise=noise)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        if bool(torch.isfinite(out.loss) & torch.isfinite(gnorm)):
            opt.step()
            b = xb.shape[0]
            sums += torch.stack([out.loss.detach() * b, out.reconstruction.detach() * b,
                                 out.kl.detach() * b, torch.tensor(b, device=device)]).double()
        if step_fn is not None:
            step_fn.resync()

    def run(max_steps=None):
        if tf32:
            with tf32_flags(True):
                return run_epoch(max_steps)
        return run_epoch(max_steps)

    def run_epoch(max_steps=None):
        set_validate_args(False)
        torch.distributions.Distribution.set_default_validate_args(False)
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        batches.set_epoch(state["epoch"])
        pending = []  # block > 1: full batches waiting for their block
        for i, xb in enumerate(batches):
            if max_steps is not None and i >= max_steps:
                break
            if step_fn is not None and xb.shape[0] == BATCH and block > 1:
                pending.append(xb)
                if len(pending) == block:  # one draw of noise for the block, as fit draws it
                    gen.manual_seed(mix_seed(0, 1, state["step"] // block))
                    step_fn.run_block(torch.stack(pending), torch.randn((block, BATCH, LATENT), generator=gen,
                                                                        device=device), [LR] * block, [1.0] * block)
                    pending = []
                    int(step_fn.skipped)  # fit reads the device counters every 50 steps
            elif step_fn is not None and step_fn.serves(xb.shape[0]):  # on CUDA the short last batch too
                step_fn.run(xb, noise((xb.shape[0], LATENT)), LR, 1.0)
                if state["step"] % 50 == 49:
                    int(step_fn.skipped)  # fit reads the device counters this often
            else:
                for xp in pending:  # the batches short of a whole block: one step each
                    step_fn.run(xp, noise((BATCH, LATENT)), LR, 1.0)
                pending = []
                eager(xb, sums)
            state["step"] += 1
        for xp in pending:
            step_fn.run(xp, noise((BATCH, LATENT)), LR, 1.0)
        short = len(x) % BATCH
        if max_steps is not None and step_fn is not None and short and step_fn.serves(short):
            # the warm-up: the short last batch's own step warms up and is captured here, not
            # in the timed epochs (untimed steps, like the warm-up's others)
            for _ in range(OTHER_WARMUP + 1):
                step_fn.run(x[:short].to(device), noise((short, LATENT)), LR, 1.0)
        state["epoch"] += 1
        float(sums[3])
        sync(device)
        set_validate_args(True)
        torch.distributions.Distribution.set_default_validate_args(True)

    return run


def pythae_contender(x, device, pythae, workdir):
    model = pythae_vae(pythae, MLPEncoder((HIDDEN,), LATENT, "relu"), mlp_decoder((HIDDEN,), LATENT, "relu"), LATENT)
    with quiet():
        trainer = pythae_trainer(model, pythae_dataset(x.cpu(), False), None, batch=BATCH, lr=LR, epochs=1000,
                                 device=device, seed=0, out_dir=workdir)
        trainer.prepare_training()
    state = {"epoch": 1}

    def run(max_steps=None):
        if max_steps is not None:  # warm-up: the same calls train_step makes, fewer of them
            trainer.model.train()
            for i, inputs in enumerate(trainer.train_loader):
                if i >= max_steps:
                    break
                out = trainer.model(trainer._set_inputs_to_device(inputs), epoch=1, dataset_size=len(x),
                                    uses_ddp=False)
                trainer._optimizers_step(out)
                out.loss.item()
        else:
            with quiet():
                trainer.train_step(state["epoch"])
            state["epoch"] += 1
        sync(device)

    return run


def matmul_floor(x, device, amp: bool = False):
    enc, head = nn.Linear(784, HIDDEN).to(device), nn.Linear(HIDDEN, 2 * LATENT).to(device)
    dec1, dec2 = nn.Linear(LATENT, HIDDEN).to(device), nn.Linear(HIDDEN, 784).to(device)
    params = [p for m in (enc, head, dec1, dec2) for p in m.parameters()]
    try:  # the cheapest Adam torch has: one fused kernel per step (CPU and CUDA, torch >= 2.4)
        opt = torch.optim.Adam(params, lr=LR, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(params, lr=LR)
    xd = x.to(device)
    steps = math.ceil(xd.shape[0] / BATCH)

    def run(max_steps=None):
        for i in range(steps if max_steps is None else min(steps, max_steps)):
            xb = xd[i * BATCH:(i + 1) * BATCH]
            with autocast(device, amp):
                h = head(F.relu(enc(xb)))
                out = dec2(F.relu(dec1(h[:, :LATENT])))
                loss = out.sum() + h.sum()  # h.sum(): every parameter gets a gradient
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)

    return run


def vaekit_fit(x_u8, x_val_u8, epochs, device, threads, workdir, amp: bool | str = False, fast: str = "auto",
               dynamic: bool = False, graph_steps: int = 1, adam_kernel: bool = False):
    """Per-epoch seconds of vaekit.train.fit: the first, and those of the rest. ``amp``:
    True for bf16 autocast, or TrainConfig.amp itself ("tf32"); ``adam_kernel``:
    TrainConfig(adam_kernel=True), the Triton Adam tail (uncompiled with the fused sample and
    linear layers: vaekit.fast.FUSED_SAMPLE and FUSED_LINEAR)."""
    from vaekit import DataConfig, ModelConfig, RunConfig, TrainConfig, fit

    npz = Path(workdir) / "fit-data.npz"
    if not npz.exists():  # the same data for every thread count and precision
        write_npz(npz, x_u8, x_val_u8, x_val_u8)
    config = RunConfig(
        model=ModelConfig(arch="mlp", input_shape=(784,), hidden=(HIDDEN,), latent_dim=LATENT, activation="relu"),
        data=DataConfig(dataset="array", data_dir=str(npz), binarize="dynamic" if dynamic else "none",
                        val_size=len(x_val_u8), split="tail"),
        train=TrainConfig(epochs=1 + epochs, batch_size=BATCH, lr=LR, device=str(device), num_threads=threads,
                          amp=amp if isinstance(amp, str) else "bf16" if amp else "none", fast=fast,
                          graph_steps=graph_steps, progress=False, adam_kernel=adam_kernel),
    )
    name = (f"fit-run-{threads}-{amp if isinstance(amp, str) else 'bf16' if amp else 'fp32'}-{fast}-{dynamic}-"
            f"{graph_steps}-{adam_kernel}")
    import vaekit.fast as vaekit_fast

    kept = vaekit_fast.FUSED_SAMPLE, vaekit_fast.FUSED_LINEAR
    # the rows with the Triton tail also take the fused sample and linear layers (uncompiled)
    vaekit_fast.FUSED_SAMPLE = vaekit_fast.FUSED_LINEAR = adam_kernel
    try:
        history = fit(config, Path(workdir) / name).history
    finally:
        vaekit_fast.FUSED_SAMPLE, vaekit_fast.FUSED_LINEAR = kept
    ends = [row["seconds"] for row in history if row["split"] == "train"]
    return ends[0], [b - a for a, b in zip(ends, ends[1:])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default="1,2", help="comma list of torch thread counts (CPU only)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per contender")
    parser.add_argument("--warmup", type=int, default=30, help="untimed warm-up steps per contender")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST .npz or 'synthetic'")
    parser.add_argument("--n-train", type=int, default=60000, help="training images (fewer: a quick check)")
    parser.add_argument("--skip", default="", help="comma list of contenders to leave out: "
                        "classic,eager,static,static-unfused,static-block,pythae,floor,compiled,compiled-block,fit,fit-compile,"
                        "fit-block,fit-compile-block,fit-tf32 (CUDA: fit with TrainConfig(amp='tf32')),"
                        "static-tail,static-tail-tf32,static-tail-bf16,compiled-tail,compiled-tail-tf32,compiled-tail-bf16,"
                        "fit-tail,fit-tail-bf16 (CUDA: the Triton Adam tail; fit-tail: fit with it and TF32, "
                        "fit-tail-bf16: with it under bf16 autocast, its weight copies; uncompiled and compiled),"
                        "static-linear,static-linear-tf32,static-linear-bf16 (CUDA: (c+) with the fused linear "
                        "layers)")
    parser.add_argument("--amp", choices=sorted(AMP_CHOICES), default=None,
                        help="precision of (b), (e) and (f): fp32 (none), bf16 autocast (bf16) or both; "
                        "default: both on a CPU, none on CUDA")
    parser.add_argument("--dynamic", action="store_true",
                        help="grey images, binarized afresh in every batch (pythae left out)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amps = AMP_CHOICES[args.amp or ("none" if device.type == "cuda" else "both")]
    skip = set(filter(None, args.skip.split(",")))
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    x_u8, xt_u8, source = load_mnist(args.data)
    x_u8 = x_u8[: args.n_train]
    dyn = args.dynamic
    if dyn:
        skip.add("pythae")
        val_u8 = xt_u8[:1000]
    else:  # static binarization: x / 255 > 0.5
        x_u8, val_u8 = (x_u8 > 127).astype(np.uint8) * 255, (xt_u8[:1000] > 127).astype(np.uint8) * 255
    x = torch.from_numpy(x_u8.astype(np.float32) / 255.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precisions = " and ".join("bf16 autocast" if amp else "fp32" for amp in amps)
    print(f"device {name}; torch {torch.__version__}; data: {source}, {len(x)} images, "
          f"{'binarized afresh in each batch' if dyn else 'statically binarized'}; "
          f"784-{HIDDEN}-{LATENT} ReLU, batch {BATCH}, Adam lr {LR}; {args.epochs} timed epochs after "
          f"{args.warmup} warm-up steps; (b), (e), (f) in {precisions}")
    warm_up_torch()
    pythae, reason = import_pythae()
    if pythae is None and "pythae" not in skip:
        print(f"(d) pythae: skipped: {reason}")
    results = []  # (threads, label, bf16?, median s, all s)
    with tempfile.TemporaryDirectory() as work:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            torch.manual_seed(0)
            makers = [  # (label, --skip key, bf16?, maker); a default argument binds each amp
                ("(a) classic", "classic", False, lambda: classic(x, device, dyn)),
                *[(f"(b) vaekit eager step{BF16 if amp else ''}", "eager", amp,
                   lambda amp=amp: vaekit_loop(x, device, static=False, amp=amp, dynamic=dyn)) for amp in amps],
                ("(c) vaekit static step", "static", False, lambda: vaekit_loop(x, device, static=True, dynamic=dyn)),
                *([("(c') static step, unfused Adam + undo copies", "static-unfused", False,
                    lambda: vaekit_loop(x, device, static=True, fused_adam=False, dynamic=dyn)),
                   ("(c'') static step, 32 steps a captured graph", "static-block", False,
                    lambda: vaekit_loop(x, device, static=True, dynamic=dyn, block=32)),
                   ("(c+) static step, Triton Adam tail + fused sample", "static-tail", False,
                    lambda: vaekit_loop(x, device, static=True, adam_kernel=True, dynamic=dyn)),
                   ("(c+) static step, Triton Adam tail + fused sample, TF32", "static-tail-tf32", False,
                    lambda: vaekit_loop(x, device, static=True, adam_kernel=True, tf32=True, dynamic=dyn)),
                   (f"(c+) static step, Triton Adam tail + fused sample + bf16 weight copies{BF16}", "static-tail-bf16", True,
                    lambda: vaekit_loop(x, device, static=True, amp=True, adam_kernel=True, dynamic=dyn)),
                   ("(c++) static step, Triton Adam tail + fused sample + fused linear layers", "static-linear", False,
                    lambda: vaekit_loop(x, device, static=True, adam_kernel=True, fused_linear=True, dynamic=dyn)),
                   ("(c++) static step, Triton Adam tail + fused sample + fused linear layers, TF32",
                    "static-linear-tf32", False,
                    lambda: vaekit_loop(x, device, static=True, adam_kernel=True, fused_linear=True, tf32=True,
                                        dynamic=dyn)),
                   (f"(c++) static step, Triton Adam tail + fused sample + fused linear layers + bf16 weight "
                    f"copies{BF16}", "static-linear-bf16", True,
                    lambda: vaekit_loop(x, device, static=True, amp=True, adam_kernel=True, fused_linear=True,
                                        dynamic=dyn))]
                  if device.type == "cuda" else []),
                ("(d) pythae 0.1.2", "pythae", False, lambda: pythae_contender(x, device, pythae, work)),
                *[(f"(e) matmul floor{BF16 if amp else ''}", "floor", amp,
                   lambda amp=amp: matmul_floor(x, device, amp)) for amp in amps],
                *[(f"(g) vaekit compiled step{BF16 if amp else ''}", "compiled", amp,
                   lambda amp=amp: vaekit_loop(x, device, static=True, amp=amp, compiled=True, dynamic=dyn))
                  for amp in amps],
                *([("(g'') compiled step, 32 steps a captured graph", "compiled-block", False,
                    lambda: vaekit_loop(x, device, static=True, compiled=True, dynamic=dyn, block=32)),
                   ("(g+) compiled step, Triton Adam tail", "compiled-tail", False,
                    lambda: vaekit_loop(x, device, static=True, compiled=True, adam_kernel=True, dynamic=dyn)),
                   ("(g+) compiled step, Triton Adam tail, TF32", "compiled-tail-tf32", False,
                    lambda: vaekit_loop(x, device, static=True, compiled=True, adam_kernel=True, tf32=True,
                                        dynamic=dyn)),
                   (f"(g+) compiled step, Triton Adam tail + bf16 weight copies{BF16}", "compiled-tail-bf16", True,
                    lambda: vaekit_loop(x, device, static=True, compiled=True, amp=True, adam_kernel=True,
                                        dynamic=dyn))]
                  if device.type == "cuda" else []),
            ]
            runs = {}
            for label, key, amp, make in makers:
                if key not in skip and not (key == "pythae" and pythae is None):
                    run = guarded(label, device, make)
                    # a 32-step block row warms up on whole blocks (its uncaptured first block
                    # and its capture happen there, as the other rows' first steps do)
                    warm = max(args.warmup, 3 * 32) if key.endswith("block") else args.warmup
                    if run is not None and guarded(label, device, lambda: run(max_steps=warm) or True):
                        runs[(label, amp)] = run
            times = {row: [] for row in runs}
            for epoch in range(args.epochs):
                for row, run in list(runs.items()):
                    t0 = time.perf_counter()
                    if guarded(row[0], device, lambda: run() or True) is None:
                        del runs[row], times[row]  # one failed row costs that row only
                        continue
                    times[row].append(time.perf_counter() - t0)
                # as it goes: a run cut short by a time limit still tells what it measured
                print(f"timed epoch {epoch + 1}, threads={n_threads}: "
                      + ", ".join(f"{label} {t[-1]:.3f} s" for (label, _), t in times.items()), flush=True)
            results += [(n_threads, label, amp, statistics.median(t), t) for (label, amp), t in times.items()]
            kinds = [("auto", 1, "fit"), ("compile", 1, "fit-compile")]
            if device.type == "cuda":
                kinds += [("auto", 32, "fit-block"), ("compile", 32, "fit-compile-block")]
            fits = [(fast, steps, amp, False) for fast, steps, key in kinds if key not in skip for amp in amps]
            if device.type == "cuda" and "fit-tf32" not in skip:
                fits.append(("auto", 1, "tf32", False))  # TrainConfig(amp="tf32"): against the fp32 floor
            if device.type == "cuda" and "fit-tail" not in skip:  # the Triton Adam tail, uncompiled and compiled
                fits += [("auto", 1, "tf32", True), ("compile", 1, "tf32", True)]
            if device.type == "cuda" and "fit-tail-bf16" not in skip:  # with it the bfloat16 weight copies
                fits += [("auto", 1, True, True), ("compile", 1, True, True)]
            for fast, steps, amp, tail in fits:
                how = ((", fast=compile" if fast == "compile" else "") + (f", graph_steps={steps}" if steps > 1 else "")
                       + ((", Triton Adam tail" + (" + fused sample + fused linear layers" if fast != "compile"
                                                   else "")) if tail else ""))
                label = f"(f) vaekit fit, epoch incl. val+ckpt{how}{', TF32' if amp == 'tf32' else BF16 if amp else ''}"
                got = guarded(label, device, lambda: vaekit_fit(x_u8, val_u8, args.epochs, device, n_threads, work,
                                                                amp, fast, dyn, steps, tail))
                if got is not None:
                    first, rest = got
                    results.append((n_threads, label, amp is True, statistics.median(rest), rest))
                    print(f"{label}, threads={n_threads}: first epoch (warm-up) {first:.2f} s")
    report(results, device, len(x))


def guarded(label: str, device, work):
    """``work()``, or None after printing why it failed (one line): a contender that fails
    (a capture that does not go through, say) costs its own row, not the table. A failed
    CUDA-graph capture can leave the process on the capture's stream: it is put back."""
    try:
        return work()
    except Exception as e:  # noqa: BLE001  (a benchmark reports any failure and goes on)
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"{label}: FAILED: {type(e).__name__}: {first}", flush=True)
        if device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.default_stream(device))
        return None


def report(results, device, n_examples: int) -> None:
    """The table, the floor's matrix-product rate and one SUMMARY line per row. Every
    "classic/this" is against the fp32 classic recipe (a); "this/floor" against the floor
    (e) of the row's own precision, or the other one where that was not run."""
    width = max([38] + [len(r[1]) for r in results])
    print(f"\n{'threads':>7}  {'contender':<{width}} {'s/epoch':>8} {'classic/this':>12} {'pythae/this':>11} "
          f"{'this/floor':>10} {'floor':>5}  epochs (s)")
    for n_threads in dict.fromkeys(r[0] for r in results):
        rows = [r for r in results if r[0] == n_threads]
        base = next((r[3] for r in rows if r[1].startswith("(a)")), None)
        pythae = next((r[3] for r in rows if r[1].startswith("(d)")), None)
        floors = {r[2]: r[3] for r in rows if r[1].startswith("(e)")}
        for _, label, amp, med, all_s in rows:
            which = amp if amp in floors else not amp
            vs_base = f"{base / med:.2f}x" if base else "-"
            vs_pythae = f"{pythae / med:.2f}x" if pythae else "-"
            vs_floor = f"{med / floors[which]:.2f}x" if which in floors else "-"
            floor_name = ("bf16" if which else "fp32") if which in floors else "-"
            print(f"{n_threads:>7}  {label:<{width}} {med:8.3f} {vs_base:>12} {vs_pythae:>11} {vs_floor:>10} "
                  f"{floor_name:>5}  " + " ".join(f"{t:.2f}" for t in all_s))
    # Matrix-product work of one epoch: the forward, every weight gradient, and the input
    # gradients of all layers but the first (x needs none).
    forward = 2 * (784 * HIDDEN + HIDDEN * 2 * LATENT + LATENT * HIDDEN + HIDDEN * 784)
    flops = n_examples * (3 * forward - 2 * 784 * HIDDEN)
    for n_threads, label, amp, med, _ in results:
        if label.startswith("(e)"):
            floor = "the floor under bf16 autocast" if amp else "the floor"
            print(f"matrix products: {flops / 1e9:.1f} GFLOP per epoch; {floor} ran them at "
                  f"{flops / med / 1e9:.0f} GFLOP/s ({n_threads} thread(s))")
    tag = "cuda" if device.type == "cuda" else "cpu"
    for n_threads, label, _, med, _ in results:
        base = next((r[3] for r in results if r[0] == n_threads and r[1].startswith("(a)")), None)
        pythae = next((r[3] for r in results if r[0] == n_threads and r[1].startswith("(d)")), None)
        ratio = (f", {base / med:.2f}x classic" if base else "") + (f", {pythae / med:.2f}x pythae" if pythae else "")
        threads = f" threads={n_threads}" if device.type == "cpu" else ""
        unit = f"{med * 1e3:.1f} ms" if med < 1 else f"{med:.3f} s"
        print(f"SUMMARY epoch_bench {tag}{threads} {label}: {unit}/epoch{ratio}")


if __name__ == "__main__":
    main()
