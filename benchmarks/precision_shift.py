"""How far reduced precision moves a run's importance-weighted test NLL: the same model,
images and noise scored with ``iw_nll(..., precision="fp32")`` (full float32) and with
each reduced precision (``"tf32"`` on CUDA, ``"bf16"``), paired image by image, with the
time of each. Issue #6 allows reduced precision only where the estimate moves by less than
0.01 nats; this checks a trained run (e.g. a PixelCNN decoder, whose convolutions PyTorch
would otherwise run in TF32 by default).

  python benchmarks/precision_shift.py RUN --k 5000 --limit 1000        # on a CUDA machine

RUN: a run directory written by ``vaekit train`` whose config names its data (``--data-dir``
overrides where they are). On a CPU only bf16 is compared (TF32 does not exist there).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--k", type=int, default=5000, help="importance samples")
    parser.add_argument("--limit", type=int, default=1000, help="the first N test images (0: all)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--precision", default="tf32,bf16", help="comma list of reduced precisions to compare")
    parser.add_argument("--data-dir", default=None, help="where the run's data are, if not where it says")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from vaekit.cli import _load_run
    from vaekit.data import load_dataset
    from vaekit.evaluate import iw_nll

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = [p for p in args.precision.split(",") if p and (device.type == "cuda" or p != "tf32")]
    _, config, model = _load_run(args.run)
    if args.data_dir:
        config.data = dataclasses.replace(config.data, data_dir=args.data_dir)
    model.to(device)
    x = load_dataset(config.data).test
    x = (x[: args.limit] if args.limit else x).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; run {args.run}; {x.shape[0]} test images, k = {args.k}")

    def score(precision: str):
        g = torch.Generator(device=device).manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = iw_nll(model, x, args.k, batch_size=args.batch_size, generator=g, precision=precision).double().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    for precision in ["fp32", *reduced]:  # warm-up: kernels, allocator
        iw_nll(model, x[:8], 2, precision=precision)
    ref, t_ref = score("fp32")
    print(f"fp32: mean NLL {float(ref.mean()):.4f} nats, {t_ref:.1f} s")
    for precision in reduced:
        got, t = score(precision)
        d = got - ref
        se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
        bound = abs(float(d.mean())) + 2 * se  # the shift, with two standard errors of its estimate
        print(f"{precision}: mean NLL {float(got.mean()):.4f} nats, {t:.1f} s ({t_ref / t:.2f}x fp32's speed)")
        print(f"SUMMARY precision_shift {precision}: same noise, {d.numel()} images: the mean NLL moves by "
              f"{float(d.mean()):+.5f} nats (s.e. {se:.5f}, largest per image {float(d.abs().max()):.4f}): "
              f"{'within' if bound < 0.01 else 'NOT shown within'} the 0.01 nats allowed (|shift| + 2 s.e. = "
              f"{bound:.4f}); {t_ref:.1f} s fp32, "
              f"{t:.1f} s {precision}")


if __name__ == "__main__":
    main()
