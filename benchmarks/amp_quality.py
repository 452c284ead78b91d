"""Does bf16 autocast cost likelihood? vaekit.train.fit on MNIST, fp32 against bf16.

Two runs of fit with the mnist-burda preset (784-200-200-50 tanh, Bernoulli decoder,
dynamically binarized MNIST, the last 10,000 training images as validation set, batch
100, Adam 1e-3 with a cosine schedule over the run), identical but for
TrainConfig.amp: "none" (fp32) and "bf16" (the forward and the loss under
torch.autocast(bfloat16), the backward and Adam on float32 weights). Same seed: the same
initial weights, data order, binarization draws and reparameterisation noise, so what
differs is the rounding.

Each run keeps the model of its best validation ELBO, as fit does. Both models are
then scored in float32 with the same estimator and the same noise: the ELBO on the 10,000
validation images (val and test binarized once, with the seed, as vaekit does), and, as
the final report only, the ELBO on the 10,000 test images and with --iw-samples k > 0
the k-sample importance-weighted test NLL (vaekit.evaluate.iw_nll). Nothing is tuned on
the test set. Differences bf16 - fp32 are paired by image; their standard error covers
the images and the evaluation noise, not the spread between training runs (rerun with
another --seed to see that). Wall times are those of the whole fit call (it also
validates, checkpoints and draws pictures) and per epoch (median, including validation
and checkpoint): indicative only on a shared machine.

  python benchmarks/amp_quality.py --epochs 5
  python benchmarks/amp_quality.py --epochs 3 --iw-samples 100 --data path/to/mnist.npz
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pythae_compare import DEFAULT_DATA, device_arg, load_mnist, warm_up_torch, write_npz  # noqa: E402  (shared helpers)

PRESET = "mnist-burda"
N_VAL = 10000  # the preset's split: the tail of the 60,000 training images
EVAL_BATCH = 500


def train(npz: Path, amp: str, args, workdir: Path):
    """fit with the preset and ``amp``; returns (best model, fit history, wall seconds, config)."""
    from vaekit import VAE, fit
    from vaekit.cli import build_config

    config = build_config(PRESET, overrides={
        "data.dataset": "array", "data.data_dir": str(npz), "data.seed": args.seed,
        "train.epochs": args.epochs, "train.amp": amp, "train.seed": args.seed, "train.device": args.device,
        "train.num_threads": args.threads, "train.progress": False,
    })
    t0 = time.perf_counter()
    result = fit(config, workdir / f"run-{amp}")
    wall = time.perf_counter() - t0
    return VAE.from_pretrained(result.run_dir / "model", device=args.device), result.history, wall, config


def per_image(model, x: torch.Tensor, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Float32 scores [N] of one model, with noise from generators seeded by ``seed``: the
    same draws for every model of this architecture."""
    from vaekit.evaluate import elbo_terms, iw_nll

    device = next(model.parameters()).device
    x = x.to(device)
    scores = {"elbo": elbo_terms(model, x, batch_size=EVAL_BATCH,
                                 generator=torch.Generator(device).manual_seed(seed))["elbo"]}
    if k:
        scores["iw_nll"] = iw_nll(model, x, k, batch_size=EVAL_BATCH,
                                  generator=torch.Generator(device).manual_seed(seed + 1))
    return {key: v.double().cpu() for key, v in scores.items()}


def epoch_seconds(history) -> list[float]:
    """Seconds of each epoch from fit's metrics (an epoch's end to the next one's: the
    training pass plus the previous epoch's validation and checkpoint)."""
    ends = [row["seconds"] for row in history if row["split"] == "train"]
    return [b - a for a, b in zip([0.0, *ends], ends)]


def paired(a: torch.Tensor, b: torch.Tensor) -> str:
    d = b - a
    return f"{float(d.mean()):+.3f} +/- {float(d.std()) / math.sqrt(len(d)):.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST .npz (x_train, x_test uint8)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iw-samples", type=int, default=0, help="k for the IW test NLL (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="TrainConfig.num_threads (0: fit picks)")
    args = parser.parse_args(argv)
    x, xt, source = load_mnist(args.data)
    print(f"data: {source}; {len(x) - N_VAL} train / {N_VAL} val (tail) / {len(xt)} test, dynamic binarization")
    print(f"preset {PRESET}: 784-200-200-50 tanh, batch 100, Adam 1e-3 cosine; {args.epochs} epoch(s), "
          f"seed {args.seed}; device {args.device}; torch {torch.__version__}; "
          f"threads {args.threads or 'as fit picks'}\n")
    warm_up_torch()
    from vaekit.data import load_dataset

    runs = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        npz = work / "mnist-flat.npz"
        write_npz(npz, x[:-N_VAL], x[-N_VAL:], xt)
        for amp in ("none", "bf16"):
            model, history, wall, config = train(npz, amp, args, work)
            runs[amp] = {"model": model, "history": history, "wall": wall}
        data = load_dataset(config.data)  # val and test binarized once, the same for both runs
    for amp, run in runs.items():
        run["val"] = per_image(run["model"], data.val, 0, args.seed)
    names = {"none": "fp32", "bf16": "bf16 autocast"}

    print("validation (model selection: the best epoch by fit's validation ELBO)")
    print(f"{'run':<14} {'val ELBO':>9} {'best ep':>7} {'skipped':>7} {'fit wall s':>10} {'s/epoch':>8}  "
          "val ELBO by epoch (fit's own)")
    for amp, run in runs.items():
        vals = [row["elbo"] for row in run["history"] if row["split"] == "val"]
        run["per_epoch"] = statistics.median(epoch_seconds(run["history"]))
        skipped = run["history"][-1]["skipped"]
        print(f"{names[amp]:<14} {float(run['val']['elbo'].mean()):9.3f} {vals.index(max(vals)) + 1:7d} "
              f"{skipped:7d} {run['wall']:10.1f} {run['per_epoch']:8.2f}  " + " ".join(f"{v:.2f}" for v in vals))
    print(f"bf16 - fp32 val ELBO: {paired(runs['none']['val']['elbo'], runs['bf16']['val']['elbo'])} nats "
          f"(paired by image)\n")

    # The final report: the test set, scored once.
    for amp, run in runs.items():
        run["test"] = per_image(run["model"], data.test, args.iw_samples, args.seed)
    keys = ["elbo"] + (["iw_nll"] if args.iw_samples else [])
    heads = {"elbo": "test ELBO", "iw_nll": f"IW NLL k={args.iw_samples}"}
    print("test (final report)")
    print(f"{'run':<14} " + " ".join(f"{heads[k]:>14}" for k in keys))
    for amp, run in runs.items():
        print(f"{names[amp]:<14} " + " ".join(f"{float(run['test'][k].mean()):14.3f}" for k in keys))
    for k in keys:
        gap = paired(runs["none"]["test"][k], runs["bf16"]["test"][k])
        print(f"bf16 - fp32 {heads[k]}: {gap} nats (paired by image)")
    print("\nwall: the whole fit call; s/epoch: median epoch, incl. validation and checkpoint (indicative only)")
    for amp, run in runs.items():
        test = ", ".join(f"{heads[k]} {float(run['test'][k].mean()):.2f}" for k in keys)
        print(f"SUMMARY amp_quality {names[amp]}: val ELBO {float(run['val']['elbo'].mean()):.2f}, {test} "
              f"({PRESET}, {args.epochs} ep); fit {run['wall']:.1f} s, {run['per_epoch']:.2f} s/epoch")


if __name__ == "__main__":
    main()
