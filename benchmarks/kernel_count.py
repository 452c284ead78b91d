"""How many kernels one static training step launches, counted on a CPU.

The 60 ms GPU epoch of issue #6 leaves 128 us a step, and on a GPU a captured step's
kernels each cost about 2-3 us even when tiny (docs/benchmarks.md: the graph replays its
kernels back to back, 0.2-0.3 us a node beyond their own time), so the count is the first
thing to know about a step. This script counts, for the step that step_profile.py times
on a GPU (vaekit.fast.StaticStep on the 784-400-20 ReLU MLP VAE, Bernoulli likelihood,
batch 128, fit's Adam), what one step would launch on CUDA:

* the aten operations that compute (views, allocations, metadata and the profiler's
  ranges left out), caught by a TorchDispatchMode: on CUDA each is a kernel;
* the Triton kernels, run here by Triton's interpreter (TRITON_INTERPRET=1, which this
  script sets for itself): each call is one launch; the interpreter's own tensor traffic
  inside a call is not counted.

Uncaptured on a CPU, a step with the Triton tail also does what a captured one does not:
it refills the tail's address table when the gradients move (`copy_`), and a number
learning rate is written into a tensor (`fill_`); both are listed and left out of the
total. PyTorch's multi-tensor operations (`_foreach_*`, the fused Adam) count as one here
and may launch more than one kernel on CUDA. Variants
(the names of step_profile.py): static (fit's default step), static-tail
(adam_kernel=True, fused_sample=True), static-linear (the same with fused_linear=True),
static-linear-bf16 (that under bf16 autocast with the tail's weight copies). What cuBLAS
does with a product on a GPU (one kernel or two: `_addmm_activation` falls back to a
product and a ReLU where cuBLASLt cannot take the epilogue) is not seen here.

  python benchmarks/kernel_count.py                      # all variants
  python benchmarks/kernel_count.py --variants static,static-linear
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before vaekit.kernels is imported: the kernels run on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_bench import HIDDEN, LATENT, LR  # noqa: E402

VARIANTS = ("static", "static-tail", "static-linear", "static-linear-bf16")
# aten operations that launch no kernel on CUDA
_NO_KERNEL = ("view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "slice",
              "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk", "unflatten",
              "as_strided", "alias", "detach", "empty", "empty_strided", "empty_like", "new_empty",
              "new_empty_strided", "lift_fresh", "set_", "is_same_size", "promote_types", "_record_function_enter_new",
              "_record_function_exit")
# what an uncaptured step with the Triton tail does that a captured one does not (see the
# module's text)
_UNCAPTURED = {"copy_": 1, "fill_": 1}


def _name(func) -> str:
    return str(func).split(".")[1] if str(func).startswith(("aten.", "profiler.")) else str(func)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton and _name(func) not in _NO_KERNEL:
            self.ops[_name(func)] += 1
        return func(*args, **(kwargs or {}))


def count(variant: str) -> collections.Counter:
    """Operations and Triton launches of one step of ``variant`` (after a first step)."""
    import triton.runtime.interpreter as interpreter

    from vaekit import VAE, ModelConfig
    from vaekit.config import TrainConfig
    from vaekit.fast import StaticStep
    from vaekit.steps import _adam

    torch.manual_seed(0)
    model = VAE(ModelConfig(arch="mlp", input_shape=(784,), hidden=(HIDDEN,), latent_dim=LATENT,
                            activation="relu", likelihood="bernoulli"))
    opt = _adam(model, TrainConfig(lr=LR))
    fused = variant != "static"
    step = StaticStep(model, opt, batch_size=128, capture=False, amp=variant.endswith("-bf16"), adam_kernel=fused,
                      fused_sample=fused, fused_linear=variant.startswith("static-linear"))
    x, eps = torch.rand(128, 784).round(), torch.randn(128, LATENT)
    step.run(x, eps, LR, 1.0)  # the optimiser's state and the tail's tables exist from here on
    mode = _Count()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        mode.ops["triton:" + self.fn.__name__] += 1
        mode.inside_triton += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside_triton -= 1

    interpreter.InterpretedFunction.run = counted
    try:
        with mode:
            step.run(x, eps, LR, 1.0)
    finally:
        interpreter.InterpretedFunction.run = run
    mode.ops["copy_"] -= 2  # run()'s copies of the batch and the noise into the buffers, outside the graph
    return +mode.ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"kernel_count: torch {torch.__version__}; one uncaptured step, batch 128, 784-{HIDDEN}-{LATENT}")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"kernel_count: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        ops = count(variant)
        uncaptured = _UNCAPTURED if variant != "static" else {}
        kept = {k: v - uncaptured.get(k, 0) for k, v in ops.items()}
        print(f"\n== {variant}")
        for name, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n:3d}  {name}{'  (uncaptured only)' if kept[name] < n else ''}")
        print(f"SUMMARY kernel_count {variant}: {sum(kept.values())} kernels a captured step "
              f"({sum(v for k, v in kept.items() if k.startswith('triton:'))} Triton)")


if __name__ == "__main__":
    main()
