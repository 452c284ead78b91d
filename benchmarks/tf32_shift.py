"""How far TF32 moves a run's importance-weighted test NLL: the same model, images and
noise scored with ``iw_nll(..., tf32=False)`` (full float32) and ``tf32=True``, paired
image by image, with the time of each. Issue #6 allows reduced precision only where the
estimate moves by less than 0.01 nats; this checks a trained run (e.g. a PixelCNN decoder,
whose convolutions PyTorch would otherwise run in TF32 by default) on a GPU.

  python benchmarks/tf32_shift.py RUN --k 5000 --limit 1000        # on a CUDA machine

RUN: a run directory written by ``vaekit train`` whose config names its data (its
``data_dir`` may be overridden with --data-dir). On a CPU TF32 does not exist: both
passes compute the same thing and the shift is 0 (a check of the script only).
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
    parser.add_argument("--data-dir", default=None, help="where the run's data are, if not where it says")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from vaekit.cli import _load_run
    from vaekit.data import load_dataset
    from vaekit.evaluate import iw_nll

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, config, model = _load_run(args.run)
    if args.data_dir:
        config.data = dataclasses.replace(config.data, data_dir=args.data_dir)
    model.to(device)
    x = load_dataset(config.data).test
    x = (x[: args.limit] if args.limit else x).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; run {args.run}; {x.shape[0]} test images, k = {args.k}")

    def score(tf32: bool):
        g = torch.Generator(device=device).manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = iw_nll(model, x, args.k, batch_size=args.batch_size, generator=g, tf32=tf32).double().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    iw_nll(model, x[:8], 2)  # warm-up: kernels, allocator
    fp32, t_fp32 = score(False)
    tf32, t_tf32 = score(True)
    d = tf32 - fp32
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
    print(f"full float32: mean NLL {float(fp32.mean()):.4f} nats, {t_fp32:.1f} s")
    print(f"TF32:         mean NLL {float(tf32.mean()):.4f} nats, {t_tf32:.1f} s ({t_fp32 / t_tf32:.2f}x faster)")
    moved = abs(float(d.mean()))
    print(f"SUMMARY tf32_shift: same noise, {d.numel()} images: TF32 moves the mean NLL by {float(d.mean()):+.5f} nats "
          f"(s.e. {se:.5f}, largest per image {float(d.abs().max()):.4f}): "
          f"{'within' if moved < 0.01 else 'NOT within'} the 0.01 nats allowed; "
          f"{t_fp32:.1f} s fp32, {t_tf32:.1f} s TF32")


if __name__ == "__main__":
    main()
