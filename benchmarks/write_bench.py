"""What fit's files cost an epoch: the model, metrics and checkpoint written in the loop
(``vaekit.train.BACKGROUND_WRITES = False``, how fit wrote them until the twelfth
session) against written by a thread of their own from host copies (the default), in one
run.

The model is the classic MNIST VAE (784-400-20, ReLU, Bernoulli, Adam lr 1e-3, batch
128), trained by ``vaekit.train.fit`` for 1 + --epochs epochs on --n-train images
(statically binarized) with a validation split of 1,000, a checkpoint at each epoch's
end, and, with --checkpoint-every N, every N steps too. The two ways alternate, --repeats
fits each, so that load from other processes hits both alike. For each it prints:

* the end of an epoch as the training loop waits for it (``_end_epoch``: the
  validation, the copies, and the writes themselves only in the loop), median ms;
* an epoch from fit's own metrics (validation and writes included), the first epoch
  left out, median s; and the ratio loop/background.

  python benchmarks/write_bench.py --device cpu --threads 2 --n-train 6000 --epochs 5
  python benchmarks/write_bench.py --device cuda --epochs 5        # what gpu.sh runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pythae_compare import DEFAULT_DATA, device_arg, load_mnist, write_npz  # noqa: E402  (shared benchmark helpers)

BATCH, HIDDEN, LATENT, LR = 128, 400, 20, 1e-3


def one_fit(npz: Path, run_dir: Path, background: bool, args, device: str) -> tuple[list, list]:
    """(end-of-epoch seconds the loop waited, epoch seconds after the first) of one fit."""
    import vaekit.train as train
    from vaekit import DataConfig, ModelConfig, RunConfig, TrainConfig

    ends, end_epoch = [], train._end_epoch

    def timed_end(run, writer):
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        t = time.perf_counter()
        end_epoch(run, writer)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        ends.append(time.perf_counter() - t)

    config = RunConfig(
        model=ModelConfig(arch="mlp", input_shape=(784,), hidden=(HIDDEN,), latent_dim=LATENT, activation="relu"),
        data=DataConfig(dataset="array", data_dir=str(npz), binarize="none", val_size=1000, split="tail"),
        train=TrainConfig(epochs=1 + args.epochs, batch_size=BATCH, lr=LR, device=device, num_threads=args.threads,
                          progress=False, checkpoint_every=args.checkpoint_every),
    )
    saved = train.BACKGROUND_WRITES, train._end_epoch
    train.BACKGROUND_WRITES, train._end_epoch = background, timed_end
    try:
        history = train.fit(config, run_dir).history
    finally:
        train.BACKGROUND_WRITES, train._end_epoch = saved
    marks = [row["seconds"] for row in history if row["split"] == "train"]
    return ends[1:], [b - a for a, b in zip(marks, marks[1:])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as found)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs a fit (after one more)")
    parser.add_argument("--repeats", type=int, default=2, help="fits of each way, alternating")
    parser.add_argument("--n-train", type=int, default=60000, help="training images")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also a checkpoint every N steps")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST .npz or 'synthetic'")
    parser.add_argument("--workdir", default=None, help="where the runs are written (default: a temporary "
                        "directory; the disk under it is what the writes cost)")
    args = parser.parse_args(argv)
    if args.workdir is not None and not Path(args.workdir).is_dir():
        parser.error(f"--workdir {args.workdir}: no such folder (the runs are written in a temporary one under it)")
    x_u8, xt_u8, source = load_mnist(args.data)
    x_u8 = (x_u8[: args.n_train] > 127).astype(np.uint8) * 255
    val_u8 = (xt_u8[:1000] > 127).astype(np.uint8) * 255
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; data: {source}, {len(x_u8)} images; 784-{HIDDEN}-{LATENT}, "
          f"batch {BATCH}; {args.epochs} timed epochs a fit, {args.repeats} fits each way"
          + (f"; a checkpoint every {args.checkpoint_every} steps" if args.checkpoint_every else ""), flush=True)
    got = {False: ([], []), True: ([], [])}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        npz = Path(work) / "data.npz"
        write_npz(npz, x_u8, val_u8, val_u8)
        for r in range(args.repeats):
            for background in (False, True):
                ends, epochs = one_fit(npz, Path(work) / f"run-{r}-{background}", background, args, args.device)
                got[background][0].extend(ends)
                got[background][1].extend(epochs)
                print(f"fit {r + 1}, {'background' if background else 'loop'} writes: end of epoch "
                      + ", ".join(f"{1e3 * t:.1f}" for t in ends) + " ms; epochs "
                      + ", ".join(f"{t:.3f}" for t in epochs) + " s", flush=True)
    (loop_end, loop_epoch), (bg_end, bg_epoch) = got[False], got[True]
    rows = [("fit, files written in the loop", loop_end, loop_epoch),
            ("fit, files written in the background", bg_end, bg_epoch)]
    print("\n| writes | end of epoch, loop waits (ms) | epoch (s) | loop/this |\n| --- | ---: | ---: | ---: |")
    base = statistics.median(loop_epoch)
    for label, ends, epochs in rows:
        e = statistics.median(epochs)
        print(f"| {label} | {1e3 * statistics.median(ends):.1f} | {e:.3f} | {base / e:.2f}x |")
    print(f"SUMMARY write_bench {name}: end of epoch {1e3 * statistics.median(loop_end):.1f} -> "
          f"{1e3 * statistics.median(bg_end):.1f} ms; epoch {base:.3f} -> {statistics.median(bg_epoch):.3f} s "
          f"({base / statistics.median(bg_epoch):.2f}x)")


if __name__ == "__main__":
    main()
