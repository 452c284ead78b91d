"""Where the time of one static training step goes: kernels, their durations, graph overhead.

The step is the one benchmarks/epoch_bench.py times as (c) and (g): vaekit.fast.StaticStep
on the 784-400-20 ReLU MLP VAE (Bernoulli likelihood, batch 128, fit's Adam: fused, on
CUDA capturable with a tensor learning rate), on random binary data [4096, 784] and noise
drawn up front on the device (timing only: the values do not matter). For each variant
(--variants; static: fp32 as fit runs it; static-bf16: amp=True; static-tf32: fp32 with
torch.backends.cuda.matmul.allow_tf32 on; compiled: compile=True; "-tail": the step's tail
as vaekit.adam_tail's Triton kernels, adam_kernel=True, and uncompiled the posterior's
sample as vaekit.kernels.fused_posterior_sample, fused_sample=True ("static-sample": that
alone); "static-linear-tf32": "static-tail-tf32" with the linear layers as
vaekit.kernels.fused_linear, fused_linear=True, their weight gradients on a stream of their
own ("static-linear-serial-tf32": on the step's stream, fast.WEIGHT_GRADS_ASIDE off;
"static-linear-bf16": under bf16 autocast with the tail's bfloat16 weight copies);
"-tail-bf16": amp=True, so
the tail keeps bfloat16 copies of the weights and nothing casts them) it

  1. profiles --steps uncaptured steps (StaticStep(capture=False), after 5 warm-up steps)
     with torch.profiler: on CUDA the device-side events (kernels, memcpy, memset) a step
     launches, their summed duration and the top 15 by time; on a CPU the outermost aten
     ops instead (those with no aten op above them: what would be a kernel each), by CPU
     time. The profiled steps run on the step's own buffers, so run()'s two input copies
     (outside the graph) are not counted;
  2. times the real step (captured on CUDA): --timed run() calls with new data each, and
     on CUDA --timed bare graph replays back to back (the GPU's time for the graph alone),
     and profiles 20 replays to see whether the profiler reports kernels inside the graph;
  3. on CUDA, times --timed steps fed as fit feeds them (batches gathered on the device by
     a BatchIterator, noise drawn 32 steps at a time), and the share of 64 such steps'
     span in which the device is busy (below 100 %: the host or a sync leaves it idle).

The last line per variant is `SUMMARY step_profile <variant>: ...`; the graph replay time
minus the summed kernel time is the graph's overhead, spread over its nodes. A variant that
fails prints `SUMMARY step_profile <variant>: FAILED (...)` and the others still run.

  python benchmarks/step_profile.py --device cpu --variants static --steps 5 --timed 20
  python benchmarks/step_profile.py                   # on a GPU: all thirteen variants
  python benchmarks/step_profile.py --variants static,compiled --steps 20 --timed 200
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_bench import HIDDEN, LATENT, LR  # noqa: E402  (the benchmarked model's sizes)
from pythae_compare import device_arg, sync, warm_up_torch  # noqa: E402

# The newest unmeasured ones first, with the default step (the baseline) third; then the rest.
VARIANTS = ("static-linear-tf32", "static-linear-bf16", "static-tail-tf32", "static", "static-linear-serial-tf32",
            "static-tail",
            "static-sample", "static-tail-bf16", "compiled-tail-tf32", "compiled-tail-bf16", "static-bf16", "static-tf32",
            "compiled")
TOP = 15


def build(device, variant: str, batch: int, capture: bool | None):
    """A fresh model, fit's Adam for it and a StaticStep of ``variant``."""
    from vaekit import VAE, ModelConfig
    from vaekit import fast
    from vaekit.config import TrainConfig
    from vaekit.fast import StaticStep
    from vaekit.steps import _adam

    model = VAE(ModelConfig(arch="mlp", input_shape=(784,), hidden=(HIDDEN,), latent_dim=LATENT,
                            activation="relu", likelihood="bernoulli")).to(device)
    opt = _adam(model, TrainConfig(lr=LR), captured_on=device if device.type == "cuda" else None)
    linear = variant.startswith("static-linear")  # the tail and the sample fused too
    kept = fast.WEIGHT_GRADS_ASIDE
    fast.WEIGHT_GRADS_ASIDE = "-serial" not in variant
    try:
        return StaticStep(model, opt, batch_size=batch, amp="-bf16" in variant, compile=variant.startswith("compiled"),
                          capture=capture, adam_kernel="-tail" in variant or linear,
                          fused_sample="-tail" in variant or variant == "static-sample" or linear, fused_linear=linear)
    finally:
        fast.WEIGHT_GRADS_ASIDE = kept


def dev_us(e) -> float:
    """A device-side event's duration in us, whatever this torch calls it (device_time_total
    since torch 2.4, cuda_time_total before)."""
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(type(e), name) or hasattr(e, name):
            return float(getattr(e, name))
    return float(e.time_range.elapsed_us())


def is_kernel(e) -> bool:
    """A device-side event that is work (kernel, memcpy, memset), not a record_function
    range mirrored on the GPU's timeline."""
    return (e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and getattr(e, "activity_type", None) != "gpu_user_annotation")


def short(name: str) -> str:
    for junk in ("void ", "at::native::", "(anonymous namespace)::"):
        name = name.replace(junk, "")
    return name[:60]


def units(prof, device) -> dict[str, list[float]]:
    """name -> durations (us) of the events that stand for a kernel: device-side events on
    CUDA, outermost aten ops (inclusive CPU time) elsewhere."""
    out = defaultdict(list)
    for e in prof.events():
        if device.type == "cuda":
            if is_kernel(e):
                out[e.name].append(dev_us(e))
            continue
        if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:
            out[e.name].append(float(e.cpu_time_total))
    return out


def report(found: dict[str, list[float]], n: int, what: str) -> tuple[float, float]:
    """Print the per-step count, total and top table; return (count, us) per step."""
    count = sum(len(v) for v in found.values()) / n
    total = sum(sum(v) for v in found.values()) / n
    print(f"  {what}: {count:g} per step, {total:.1f} us per step")
    print(f"  {'name':60s} {'calls/step':>10s} {'avg us':>8s} {'us/step':>8s} {'%':>6s}")
    rows = sorted(found.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in rows[:TOP]:
        per = sum(durs) / n
        print(f"  {short(name):60s} {len(durs) / n:10.2f} {sum(durs) / len(durs):8.2f} {per:8.1f} "
              f"{100 * per / max(total, 1e-9):6.1f}")
    if len(rows) > TOP:
        rest = sum(sum(v) for _, v in rows[TOP:]) / n
        print(f"  ({len(rows) - TOP} more names: {rest:.1f} us per step)")
    return count, total


def timed(device, fn, n: int) -> float:
    """us per call of ``fn(i)`` over ``n`` calls: CUDA events on CUDA, the host clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for i in range(n):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / n
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) * 1e6 / n


def profiled(device, fn, n: int):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(n):
            fn(i)
        sync(device)
    return prof


def fed_steps(device, data, batch: int):
    """``fn(i)``: step ``i`` fed as fit feeds it: a batch formed on the device by a
    BatchIterator (an index gather; epochs roll over), noise drawn 32 steps at a time and
    sliced. Call ``fn.bind(step)`` first."""
    from vaekit.batching import BatchIterator

    batches = BatchIterator(data, batch, shuffle=True, drop_last=True, seed=0, device=device)
    state = {"it": iter(()), "epoch": 0, "noise": None, "step": None}

    def fn(i):
        x = next(state["it"], None)
        if x is None:
            batches.set_epoch(state["epoch"])
            state["epoch"] += 1
            state["it"] = iter(batches)
            x = next(state["it"])
        if i % 32 == 0:
            state["noise"] = torch.randn(32, batch, LATENT, device=device)
        state["step"].run(x, state["noise"][i % 32], LR, 1.0)

    fn.bind = lambda step: state.update(step=step)
    return fn


def busy_share(prof) -> tuple[float, float]:
    """(device-busy us, span us) of the profiled device work: the union of the kernels',
    copies' and sets' intervals against the span from the first start to the last end."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if is_kernel(e))
    if not spans:
        return 0.0, 0.0
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo = busy + hi - lo, a
        hi = max(hi, b)
    busy += hi - lo
    return float(busy), float(spans[-1][1] - spans[0][0])


def run_variant(variant: str, device, args, xs, eps) -> str:
    nb, ne = xs.shape[0], len(eps)
    # 1. uncaptured: every kernel launched on its own, where the profiler sees it.
    step = build(device, variant, args.batch, capture=False)
    for i in range(5):
        step.run(xs[i % nb], eps[i % ne], LR, 1.0)
    sync(device)
    prof = profiled(device, lambda i: step.run(step.x, step.eps, LR, 1.0), args.steps)  # copies: no-ops
    what = "device events (kernels, memcpy, memset)" if device.type == "cuda" else \
        "outermost aten ops (cpu; CPU time, not kernels)"
    count, kern = report(units(prof, device), args.steps, what)
    del step, prof
    # 2. the real thing: captured on CUDA.
    step = build(device, variant, args.batch, capture=None)
    for i in range(10):
        step.run(xs[i % nb], eps[i % ne], LR, 1.0)
    sync(device)
    run_us = timed(device, lambda i: step.run(xs[i % nb], eps[i % ne], LR, 1.0), args.timed)
    if device.type != "cuda" or step._graph is None:
        print(f"  run(): {run_us:.1f} us per step" + ("" if device.type != "cuda" else " (no graph captured)"))
        return f"{count:g} top-level aten ops/step (cpu), aten op time {kern:.1f} us/step, run() {run_us:.1f} us/step"
    graph = step._graph
    graph.replay()
    replay_us = timed(device, lambda i: graph.replay(), args.timed)
    print(f"  run(): {run_us:.1f} us per step; bare graph replay: {replay_us:.1f} us per step")
    try:  # does the profiler see the kernels inside a replayed graph? (CUPTI usually does)
        seen = units(profiled(device, lambda i: graph.replay(), 20), device)
        report(seen, 20, "device events seen in 20 profiled graph replays")
    except Exception as e:  # noqa: BLE001
        print(f"  (profiling graph replays failed: {type(e).__name__}: {first_line(e)})")
    # 3. fed as fit feeds it (a BatchIterator's gather, noise in blocks): what an epoch adds.
    fed = fed_steps(device, xs.reshape(-1, 784), args.batch)
    fed.bind(step)
    fed_us = timed(device, fed, args.timed)
    busy, span = busy_share(profiled(device, fed, 64))
    share = f"device busy {100 * busy / span:.0f} % of the span" if span else "no device events seen"
    print(f"  fed like fit (BatchIterator, noise 32 steps a draw): {fed_us:.1f} us per step; {share}")
    over = replay_us - kern
    return (f"{count:g} kernels/step, kernel time {kern:.1f} us/step, graph replay {replay_us:.1f} us/step, "
            f"run() {run_us:.1f} us/step, fed like fit {fed_us:.1f} us/step ({share}) "
            f"({over:.1f} us of graph overhead, {over / max(count, 1):.2f} us a node)")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)} "
                    "(default: all on CUDA, static on a CPU)")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--timed", type=int, default=200, help="timed steps (and timed graph replays)")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    variants = (args.variants or (",".join(VARIANTS) if device.type == "cuda" else "static")).split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r} (choose from {', '.join(VARIANTS)})")
    from vaekit.losses import set_validate_args
    set_validate_args(False)  # as fit runs the step (the data is checked once, up front)
    torch.distributions.Distribution.set_default_validate_args(False)
    warm_up_torch()
    torch.manual_seed(0)
    data = (torch.rand(4096, 784, device=device) < 0.5).float()
    xs = data[: (4096 // args.batch) * args.batch].view(-1, args.batch, 784)
    eps = [torch.randn(args.batch, LATENT, device=device) for _ in range(4)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"step_profile: torch {torch.__version__}, {name}, batch {args.batch}, {args.steps} profiled steps, "
          f"{args.timed} timed")
    for v in variants:
        print(f"\n== {v}")
        t0 = time.perf_counter()
        try:
            from vaekit.latents import tf32_flags

            with tf32_flags(True) if v.endswith("-tf32") else contextlib.nullcontext():
                line = run_variant(v, device, args, xs, eps)
        except Exception as e:  # noqa: BLE001  (one variant's failure must not lose the others)
            cause = e.__cause__ if e.__cause__ is not None and v == "compiled" else None
            line = f"FAILED ({type(e).__name__}: {first_line(e)})"
            if cause is not None:
                print(f"  cause: {type(cause).__name__}: {first_line(cause)}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
        print(f"SUMMARY step_profile {v}: {line}", flush=True)


if __name__ == "__main__":
    main()
