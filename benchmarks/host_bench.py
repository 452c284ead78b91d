"""Host time per step of `fit`'s static path, outside the step itself.

On CUDA the static step is one CUDA-graph replay, and everything else the training loop
does per step runs on the host: the batch, the noise, the copies into the step's buffers,
the schedules, the loop's bookkeeping. At batch 128 an MNIST epoch is 469 steps, so the
issue's 60 ms epoch leaves 128 us a step for all of it, graph included. This script runs
`vaekit.train.fit` (fast="static") with the step's body (forward, backward, Adam) taken
out, on data of MNIST's size but 4 pixels an image (so that the tensors' arithmetic costs
nothing and what is left is dispatch and Python), and prints the time per step: the time
between two epochs' rows of metrics.csv over the epoch's steps, so the epoch's end (the
validation of 100 images, the checkpoint and the model's save) is spread over them too;
the line also gives the epoch's end alone (the median of its milliseconds), so that what
is left is the loop's share a step.
The body left is one tiny kernel (so that on CUDA a graph is still captured and replayed). On
a CPU this is a floor for the host's share of a step; on CUDA (--device cuda, in
benchmarks/gpu.sh) it is that share itself: kernel launches cost the host more than CPU
dispatches do.

--graph-steps (default 1,32): also fit with TrainConfig(graph_steps=K). On CUDA a block of
K steps is one replay, so this is where the host's share should fall K-fold; on a CPU the
K steps of a block still run one by one (uncaptured), and the figure is no smaller.

  python benchmarks/host_bench.py                 # 2 epochs timed after a first one
  python benchmarks/host_bench.py --epochs 4 --binarize none
  python benchmarks/host_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pythae_compare import device_arg  # noqa: E402  (shared benchmark helpers)

STEPS = 469  # an epoch of 60,000 images at batch 128
STEP_BUDGET_US = 60e3 / STEPS  # the 60 ms epoch goal


def host_time_per_step(binarize: str, epochs: int, device: str = "cpu", n: int = 60000,
                       batch: int = 128, graph_steps: int = 1, ends: list | None = None,
                       hidden: tuple = (2,)) -> list[float]:
    """Microseconds per step of each timed epoch (the first epoch is left out). ``ends``:
    a list that gets the milliseconds of each epoch's end (``vaekit.train._end_epoch``:
    the row, the validation, the checkpoint's copy and serialisation), the first one's too.
    ``hidden``: the MLP's hidden widths (what the checkpoint and the model's file weigh)."""
    from vaekit import DataConfig, ModelConfig, RunConfig, TrainConfig, fast, fit, train

    body, end_epoch = fast.StaticStep._body, train._end_epoch
    fast.StaticStep._body = lambda self, *args, **kwargs: self.sums.add_(0.0)  # the graph's part: not what is measured

    def timed_end(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return end_epoch(*args, **kwargs)
        finally:
            if ends is not None:
                ends.append((time.perf_counter() - t0) * 1e3)

    train._end_epoch = timed_end
    try:
        with tempfile.TemporaryDirectory() as work:
            x = (np.random.default_rng(0).random((n + 100, 2, 2)) * 255).astype(np.uint8)
            np.savez(Path(work) / "d.npz", x_train=x, x_test=x[:100])
            config = RunConfig(
                model=ModelConfig(arch="mlp", input_shape=(1, 2, 2), hidden=tuple(hidden), latent_dim=20),
                data=DataConfig(dataset="array", data_dir=str(Path(work) / "d.npz"), binarize=binarize,
                                val_size=100, split="tail"),
                train=TrainConfig(epochs=1 + epochs, batch_size=batch, num_threads=1, fast="static", progress=False,
                                  device=device, graph_steps=graph_steps),
            )
            history = fit(config, Path(work) / "run").history
    finally:
        fast.StaticStep._body, train._end_epoch = body, end_epoch
    ends = [row["seconds"] for row in history if row["split"] == "train"]
    steps = -(-n // batch)
    return [(b - a) / steps * 1e6 for a, b in zip(ends, ends[1:])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one untimed)")
    parser.add_argument("--binarize", default="dynamic,none", help="comma list: dynamic, none")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda")
    parser.add_argument("--hidden", default="2",
                        help="the MLP's hidden widths, comma-separated: 800,400 weighs what 784-400-20 does "
                             "(670,000 parameters against 653,000: a checkpoint of its size)")
    parser.add_argument("--graph-steps", default="1,32",
                        help="comma list of TrainConfig.graph_steps (steps a captured graph on CUDA)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hidden = tuple(int(v) for v in args.hidden.split(","))
    print(f"device {args.device}; torch {torch.__version__}; fit's static path with the step's body taken out, 60,000 examples "
          f"of 4 pixels, hidden widths {hidden}, batch 128 (469 steps an epoch); validation on 100 examples included")
    for binarize, k in itertools.product(args.binarize.split(","), [int(v) for v in args.graph_steps.split(",")]):
        ends = []
        per = host_time_per_step(binarize, args.epochs, args.device, graph_steps=k, ends=ends, hidden=hidden)
        med, end = statistics.median(per), statistics.median(ends[1:])
        print(f"SUMMARY host_bench {args.device} binarize={binarize} graph_steps={k} hidden={args.hidden}: {med:.1f} us/step on the host "
              f"({med / STEP_BUDGET_US:.0%} of the {STEP_BUDGET_US:.0f} us a step of a 60 ms epoch), of which the "
              f"epoch's end {end:.1f} ms ({end * 1e3 / STEPS:.1f} us a step); epochs: " + " ".join(f"{p:.1f}" for p in per))


if __name__ == "__main__":
    main()
