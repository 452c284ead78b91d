"""Time the VAE loss, forward + backward: the classic recipe vs vaekit's eager and fused losses.

Recipes (all with a summed reduction, as the classic recipe has it):

  (a) classic   sigmoid -> F.binary_cross_entropy(reduction="sum") plus
                -0.5 * sum(1 + logvar - mu^2 - exp(logvar))       (the baseline)
  (b) compiled  (a) under torch.compile
  (c) VAELoss   vaekit.losses.VAELoss, eager, value checks off
  (d) fused     vaekit.kernels.fused_vae_loss, value checks off
  (d') tiles    the same with vaekit.kernels.PLAN = "tiles" (one program per 1,024-column
                block of a row instead of one per row looping over its columns); GPU only
  --sweep       the fused kernel over plans, tile sizes and warps per program (GPU)

Each is timed as loss + torch.autograd.grad(loss, (logits, mu, logvar)): median of
--repeats runs after --warmup runs, with CUDA events on a GPU. The device's copy bandwidth
(a large device-to-device copy: bytes read + written per second) is measured in the same
run, and (d) is reported as a fraction of it, counting only the minimum traffic of
3 passes over [B, D] (read logits, read x, write the logits' gradient).

On a GPU two more columns say how much of a time is the host's: "host ms/call" is the
host's time to issue one forward + backward (the loop runs without a sync, so when it is
above the events' time the GPU waited for the host and the events measured the host), and
"graph ms" times the same forward + backward captured once in a CUDA graph and replayed,
which is how the training step runs it (vaekit.fast): the GPU's time alone.

  python benchmarks/loss_bench.py                        # B=4096, D=3*64*64, d=128, fp32
  python benchmarks/loss_bench.py --dtype bf16
  python benchmarks/loss_bench.py --device cpu --batch 64 --dim 784 --latent 16 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vaekit import kernels
from vaekit.kernels import fused_available, fused_vae_loss
from vaekit.losses import VAELoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pythae_compare import device_arg  # noqa: E402  (shared benchmark helpers)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def classic_loss(x, logits, mu, logvar, beta):
    """The tutorial recipe, kept here as the baseline (probabilities, then their log)."""
    recon = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return recon + beta * kl


def median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def host_ms(fn, device: torch.device, repeats: int) -> float:
    """The host's time per call of ``fn`` issued back to back without a sync."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    issued = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return 1e3 * issued / repeats


def graph_ms(fn, device: torch.device, warmup: int, repeats: int) -> float | None:
    """Median time of one replay of ``fn`` captured in a CUDA graph (None, with a note,
    when it cannot be captured)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001  (a recipe that cannot be captured is reported, not timed)
        print(f"  (not captured: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]})")
        # torch.cuda.graph does not leave its capture stream when ending the capture fails
        torch.cuda.set_stream(torch.cuda.default_stream(device))
        return None
    return median_ms(graph.replay, device, warmup, repeats)


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def make_inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]
    x = torch.rand(args.batch, args.dim, generator=g).to(device=device, dtype=dtype)
    logits = (2 * torch.randn(args.batch, args.dim, generator=g)).to(device=device, dtype=dtype)
    mu = torch.randn(args.batch, args.latent, generator=g).to(device=device, dtype=dtype)
    logvar = (0.5 * torch.randn(args.batch, args.latent, generator=g)).to(device=device, dtype=dtype)
    return x, logits.requires_grad_(), mu.requires_grad_(), logvar.requires_grad_()


# The fused kernel against the eager VAELoss, relative to the largest |eager| value: fp32
# sums over 4096 x 12288 terms in another order differ by ~1e-6, half-precision gradients
# by their rounding (~5e-3 for bf16); a wrong kernel by far more.
CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check_correctness(x, logits, mu, logvar, beta, plan="rows") -> bool:
    """Print the fused loss's and gradients' differences from the eager VAELoss, and a
    ``CHECK loss_bench`` verdict line; True when every one is within CHECK_RTOL."""
    inputs = (logits, mu, logvar)
    kernels.PLAN = plan
    try:
        fused = fused_vae_loss(x, logits, mu, logvar, beta=beta, reduction="sum", validate_args=False)
    finally:
        kernels.PLAN = "rows"
    eager = VAELoss(beta, "bernoulli", "sum", validate_args=False)(x, logits, mu, logvar)
    print(f"correctness, fused (plan {plan}) vs eager VAELoss (max |difference|, relative to max |eager|):")
    grads = zip(torch.autograd.grad(fused.loss, inputs, retain_graph=False),
                torch.autograd.grad(eager.loss, inputs))
    names = ("loss", "reconstruction", "kl", "d/d logits", "d/d mu", "d/d logvar")
    worst = 0.0
    for name, (a, b) in zip(names, [*zip(fused, eager), *grads]):
        a, b = a.detach().double(), b.detach().double()
        diff = float((a - b).abs().max())
        rel = diff / max(float(b.abs().max()), 1e-30)
        worst = max(worst, rel if rel == rel else float("inf"))  # a NaN is a failure
        print(f"  {name:<15} {diff:.3e}  ({rel:.1e})")
    allowed = CHECK_RTOL[logits.dtype]
    ok = worst <= allowed
    print(f"CHECK loss_bench plan {plan}: {'ok' if ok else 'FAILED'} (largest relative difference {worst:.1e}, "
          f"allowed {allowed:.0e} in {logits.dtype})")
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=3 * 64 * 64)
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of x, logits, mu and logvar (default fp32)")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip (b), torch.compile")
    parser.add_argument("--sweep", action="store_true",
                        help="GPU: also time the fused kernel over work plans, tile sizes and warps "
                        "(vaekit.kernels.PLAN, TILE, NUM_WARPS), each checked against the eager loss first")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; B={args.batch} D={args.dim} d={args.latent} {args.dtype}")
    fused = fused_available(device)
    if not fused:
        print(f"note: the fused path is not available on {device.type}: (d) runs the eager fallback")
    x, logits, mu, logvar = make_inputs(args, device)
    correct = all([check_correctness(x, logits, mu, logvar, args.beta, plan)
                   for plan in (("rows", "tiles") if fused else ("rows",))])

    beta = args.beta
    vae_loss = VAELoss(beta, "bernoulli", "sum", validate_args=False)
    recipes = {"(a) classic": lambda: classic_loss(x, logits, mu, logvar, beta)}
    if not args.no_compile:
        compiled = torch.compile(classic_loss)
        recipes["(b) torch.compile"] = lambda: compiled(x, logits, mu, logvar, beta)
    recipes["(c) VAELoss eager"] = lambda: vae_loss(x, logits, mu, logvar).loss
    recipes["(d) fused"] = lambda: fused_vae_loss(
        x, logits, mu, logvar, beta=beta, reduction="sum", validate_args=False).loss
    if fused:
        def tiles():
            kernels.PLAN = "tiles"  # the forward fixes the geometry; the backward reuses it
            try:
                return fused_vae_loss(x, logits, mu, logvar, beta=beta, reduction="sum", validate_args=False).loss
            finally:
                kernels.PLAN = "rows"

        recipes["(d') fused, tile plan"] = tiles
    inputs = (logits, mu, logvar)

    bandwidth = copy_bandwidth(device, max(64 << 20, 2 * logits.numel() * logits.element_size()),
                               args.warmup, args.repeats)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    min_bytes = 2 * logits.numel() * logits.element_size() + x.numel() * x.element_size()

    rows = []
    cuda = device.type == "cuda"
    for label, loss_fn in recipes.items():
        step = lambda loss_fn=loss_fn: torch.autograd.grad(loss_fn(), inputs)  # noqa: E731
        ms = median_ms(step, device, args.warmup, args.repeats)
        host = host_ms(step, device, args.repeats) if cuda else None
        graph = graph_ms(step, device, args.warmup, args.repeats) if cuda else None
        rows.append((label, ms, host, graph))
        extra = f"; host {host:.3f} ms/call; graph replay {graph:.3f} ms" if graph is not None else ""
        print(f"{label:<20} {ms:9.3f} ms{extra}")

    def bw(ms):
        return f"{min_bytes / (ms * 1e-3) / bandwidth:.0%}" if fused else "n/a (eager fallback)"

    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n{'recipe':<20} {'ms':>9} {'speed-up vs (a)':>16} {'vs (b)':>7} {'of copy BW at 3-pass minimum':>30} "
          f"{'host ms/call':>12} {'graph ms':>9} {'graph: vs (a)':>13} {'graph: vs (b)':>13} "
          f"{'graph: of copy BW':>17}")
    base, base_graph = rows[0][1], rows[0][3]
    comp = next(((ms, graph) for label, ms, _, graph in rows if label.startswith("(b)")), (None, None))
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    for label, ms, host, graph in rows:
        fused_row = label.startswith("(d")
        print(f"{label:<20} {ms:9.3f} {base / ms:15.2f}x {ratio(comp[0], ms):>7} {bw(ms) if fused_row else '-':>30} "
              f"{fmt(host):>12} {fmt(graph):>9} {ratio(base_graph, graph):>13} {ratio(comp[1], graph):>13} "
              f"{bw(graph) if fused_row and graph else '-':>17}")
    print()
    for label, ms, host, graph in rows:
        if label.startswith("(d") and graph:
            vs = f", {base_graph / graph:.2f}x classic (graph)" if base_graph else ""
            vs += f", {comp[1] / graph:.2f}x torch.compile (graph)" if comp[1] else ""
            print(f"SUMMARY loss_bench {label} graph replay: {graph:.3f} ms, {bw(graph)} of copy BW{vs}")
    if args.sweep and fused:
        sweep(x, logits, mu, logvar, beta, device, args, min_bytes, bandwidth, base_graph or base)
    if not correct:
        raise SystemExit("loss_bench: the fused loss disagrees with the eager VAELoss (CHECK lines above)")


SWEEP = [("rows", 1024, w) for w in (4, 8, 16)] + [("tiles", t, w) for t in (512, 1024, 2048, 4096) for w in (4, 8)]


def sweep(x, logits, mu, logvar, beta, device, args, min_bytes, bandwidth, classic_ms) -> None:
    """The fused loss under each (PLAN, TILE, NUM_WARPS) of SWEEP, timed as graph replays
    (``classic_ms``: the classic recipe's, replayed too); a setting whose logits' gradient
    differs from the eager loss's by more than 1e-5 (relative) is reported, not timed."""
    inputs = (logits, mu, logvar)
    ref = torch.autograd.grad(VAELoss(beta, "bernoulli", "sum", validate_args=False)(x, logits, mu, logvar).loss,
                              inputs)[0]
    defaults = (kernels.PLAN, kernels.TILE, kernels.NUM_WARPS)

    def run():
        return torch.autograd.grad(
            fused_vae_loss(x, logits, mu, logvar, beta=beta, reduction="sum", validate_args=False).loss, inputs)

    print("\nsweep of the fused kernel (same shape; BLOCK = TILE for tiles, up to 2048 for rows; "
          "graph replay, the GPU's time alone):")
    print(f"{'plan':<6} {'TILE':>5} {'warps':>5} {'ms':>8} {'of copy BW':>11} {'vs classic':>11}")
    best = None
    for plan, tile, warps in SWEEP:
        kernels.PLAN, kernels.TILE, kernels.NUM_WARPS = plan, tile, warps
        try:
            got = run()[0]
            err = float((got - ref).abs().max() / ref.abs().max())
            if not err < 1e-5:
                print(f"{plan:<6} {tile:>5} {warps:>5}  WRONG: relative error {err:.1e}")
                continue
            ms = graph_ms(run, device, args.warmup, args.repeats)
        finally:
            kernels.PLAN, kernels.TILE, kernels.NUM_WARPS = defaults
        if ms is None:
            continue
        frac = min_bytes / (ms * 1e-3) / bandwidth
        print(f"{plan:<6} {tile:>5} {warps:>5} {ms:8.3f} {frac:>10.0%} {classic_ms / ms:>10.2f}x")
        if best is None or ms < best[0]:
            best = (ms, plan, tile, warps, frac)
    if best:
        ms, plan, tile, warps, frac = best
        print(f"SUMMARY loss_bench sweep best: PLAN={plan} TILE={tile} NUM_WARPS={warps}: {ms:.3f} ms, "
              f"{frac:.0%} of copy BW, {classic_ms / ms:.2f}x classic")


if __name__ == "__main__":
    main()
