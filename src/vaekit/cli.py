"""The command line: ``vaekit train | evaluate | sample`` (also ``python -m vaekit``).

The commands themselves are plain Python functions over the config dataclasses, in
:mod:`vaekit.commands` (re-exported here); this module is the view of them: it turns flags
into their arguments, prints what they return, and maps what they raise to an exit
status. For ``train`` the precedence is preset < ``--config`` file (TOML or JSON) < flags.

Exit statuses, the contract scripts rely on:

* 0: done, a finished run resumed without ``--epochs`` included (it says there is
  nothing to train);
* 1: training diverged, or the fast step asked for could not be built; one line,
  ``vaekit: error: ...``;
* 2: bad input (a flag, a config file, a run directory, missing data) or a file that
  cannot be read or written; one line, ``vaekit: error: ...``, and no usage dump;
* 130: interrupted. A signal inside the training loop saves a checkpoint first and says
  how to resume; Ctrl-C anywhere else prints ``vaekit: interrupted``.

With ``VAEKIT_DEBUG=1`` the errors and the Ctrl-C outside the loop raise instead, to
show their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from .commands import _new_run_dir, _remove_if_unused, evaluate_command, metrics_name, sample_command, train_command
# importable from here as before the commands had a module of their own
# (benchmarks/precision_shift.py reads runs with _load_run)
from .commands import _MAX_SEED, _check_writable, _evaluate, _load_run  # noqa: F401
from .flags import UsageError, _add_config_flags, _flag_names, _read_config_file, _said_as_set, build_config
from .presets import DEFAULT_PRESET, PRESETS

__all__ = ["main", "train_command", "evaluate_command", "sample_command", "PRESETS", "build_config", "UsageError"]


def _version_line() -> str:
    import torch

    from . import __version__

    return f"vaekit {__version__} (torch {torch.__version__})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        # Whole flags only: argparse would take `sample --n 16` for `--nrow 16`.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, status 2, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Once(argparse.Action):
    """A flag given at most once: a second ``--config`` would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(namespace, self.dest, None)
        if first is not None:
            raise argparse.ArgumentError(self, f"given twice ({first}, then {values}); give one file (flags "
                                               f"override its values)")
        setattr(namespace, self.dest, values)


# -- train's --config and --time-budget, checked before the run ------------------------

MAX_TIME_BUDGET = 365 * 24 * 3600  # seconds: a budget beyond it is a typo, not a plan


def _check_input_shape(config, config_file: str | None) -> None:
    """A ``[model] input_shape`` in ``--config`` must be the data's: the run takes its
    input shape from the data, and replacing the one asked for would hide a mistake."""
    from .data import load_dataset

    model = _read_config_file(config_file).get("model") if config_file else None
    if not isinstance(model, dict) or "input_shape" not in model:
        return
    # the shape only: two sprites render in no time where the whole set takes seconds
    probe = dataclasses.replace(config.data, val_size=0, binarize="none",
                                sprites_count=2 if config.data.dataset == "sprites" else config.data.sprites_count)
    shape = tuple(load_dataset(probe).train.shape[1:])
    if tuple(config.model.input_shape) != shape:
        raise UsageError(f"--config {config_file}: [model] input_shape {list(config.model.input_shape)} is not the "
                         f"shape of the data, {list(shape)} (dataset {config.data.dataset!r}); the run takes it from "
                         f"the data: remove the key")


def _epochs_given(args, overrides: dict) -> str | None:
    """Where the user gave a number of epochs, which --time-budget would replace: the flag
    (``"--epochs"``), the ``--config`` file (``"--config FILE"``), or None."""
    if "train.epochs" in overrides:
        return "--epochs"
    section = _read_config_file(args.config).get("train") if args.config else None
    return f"--config {args.config}" if isinstance(section, dict) and "epochs" in section else None


def _budgeted(config, seconds: float, *, epochs_given: str | None):
    """``config`` with the epochs that fit in ``seconds`` (--time-budget), said before and after
    the calibration; ``epochs_given``: where the user gave epochs too (refused)."""
    import dataclasses
    import math

    from .budget import epochs_for_budget

    if epochs_given == "--epochs":
        raise UsageError("--time-budget sets the number of epochs; give --epochs or --time-budget, not both")
    if epochs_given:
        raise UsageError(f"--time-budget sets the number of epochs, and {epochs_given} sets train.epochs; remove "
                         f"the key from the file, or leave out --time-budget")
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIME_BUDGET):
        raise UsageError(f"--time-budget must be a number of seconds in (0, {MAX_TIME_BUDGET}] (a year), "
                         f"got {seconds:g}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # before the line below, which every rank would print
        raise UsageError("--time-budget is not supported under torchrun (the ranks could time differently); "
                         "give --epochs instead")
    # said first: for a large model its validation alone can take tens of seconds
    print("vaekit: calibration: timing this run's steps and one end of epoch (thrown away)", flush=True)
    epochs, per_epoch = epochs_for_budget(config, seconds)
    print(f"vaekit: calibration: {per_epoch:.3f} s an epoch -> {_epochs(epochs)} for a {seconds:g} s budget", flush=True)
    if per_epoch > seconds:  # the one epoch trained overruns the budget: said, not silent
        print(f"vaekit: --time-budget {seconds:g}: one epoch takes longer than the budget; this run trains one "
              f"epoch (about {per_epoch:.3g} s); --max-steps N trains fewer steps", flush=True)
    config.train = dataclasses.replace(config.train, epochs=epochs)
    return config


# -- argument parsing ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from .evaluate import PRECISIONS

    p = _Parser(prog="vaekit", description="Variational autoencoders: train, evaluate, sample.")
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a VAE (default: the bundled 8x8 digits)",
                       description=f"Train a VAE. With no arguments: the '{DEFAULT_PRESET}' preset, whose values "
                                   "are the defaults shown (another --preset starts from its own; --config FILE "
                                   "and flags change them).")
    t.add_argument("--preset", choices=list(PRESETS), help=f"named starting configuration [default: {DEFAULT_PRESET}]")
    t.add_argument("--config", metavar="FILE", action=_Once,
                   help="TOML or JSON file with [model], [data], [train], [objective] sections")
    t.add_argument("--run-dir", metavar="DIR", help="where to write the run [default: runs/<preset, else dataset>-<time>]")
    t.add_argument("--resume", metavar="RUN",
                   help="continue the run in RUN from its last checkpoint, with its saved configuration; "
                        "only --no-progress, --epochs N and --data-dir DIR go with it. --epochs N extends the "
                        "run to N epochs in all (more than it has done) and saves N in RUN/config.json (not a run "
                        "that stopped early or at its --max-steps, which ends it for good); a "
                        "cosine learning rate then follows the cosine over N epochs from the resume point on. "
                        "--data-dir DIR: the run's data are there now (they must be the same data)")
    t.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train as many epochs as fit in SECONDS of training loop, timed by a calibration "
                        "of a few seconds first (thrown away); sets --epochs, so the cosine schedule ends "
                        "with the budget")
    _add_config_flags(t)

    e = sub.add_parser("evaluate", help="evaluate a trained run",
                       description="Evaluate a trained run on a split. The metrics are printed and written to "
                                   "RUN/metrics-<split>.json; an earlier file there that holds what this evaluation "
                                   "does not (an importance-weighted NLL of more samples, disentanglement scores) is "
                                   "kept as metrics-<split>-earlier<n>.json.")
    e.add_argument("run", metavar="RUN", help="run directory written by 'vaekit train'")
    e.add_argument("--split", default="test", choices=["test", "val", "train"], help="which split [default: test]")
    e.add_argument("--iw-samples", type=int, default=0, metavar="K",
                   help="importance samples for the log-likelihood estimate (0: off; published numbers use 5000) "
                        "[default: 0]")
    e.add_argument("--batch-size", type=int, default=500, help="examples per evaluation batch [default: 500]")
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise [default: 0]")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [default: auto]")
    e.add_argument("--disentanglement", action="store_true", help="also compute MIG, FactorVAE, DCI and beta-VAE scores")
    e.add_argument("--quick", action="store_true",
                   help="with --disentanglement: about ten times smaller metric samples (a rough, fast estimate)")
    e.add_argument("--limit", type=int, default=0, metavar="N",
                   help="score only the split's first N examples (written to metrics-<split>-firstN.json) [default: 0, all]")
    e.add_argument("--num-threads", type=int, default=0, metavar="N",
                   help="CPU threads for PyTorch [default: 0, PyTorch's own choice]")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="arithmetic: full float32, TF32 matrix products and convolutions (CUDA), or bfloat16 "
                        "autocast; the reduced ones are faster [default: fp32]")
    e.add_argument("--data-dir", metavar="DIR",
                   help="where the run's data are, if not where training recorded them (mnist, "
                        "fashion-mnist, array and folder runs; checked against the run's checkpoint: its training "
                        "examples, and the split scored where the checkpoint records it)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar over the batches (shown only on a terminal anyway)")

    s = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Save a grid of samples: z ~ N(0, I), each shown as the mean of p(x|z) "
                                   "(a Bernoulli decoder's probabilities, not 0/1 draws; a PixelCNN head "
                                   "draws its pixels one by one and shows each pixel's probability).")
    s.add_argument("run", metavar="RUN", help="run directory written by 'vaekit train'")
    s.add_argument("-n", type=int, default=64, help="number of samples [default: 64]")
    s.add_argument("-o", "--output", default="samples.png",
                   help="output image file, .png or .jpg; a relative path is taken from the current directory, "
                        "not RUN [default: samples.png, in the current directory]")
    s.add_argument("--seed", type=int, default=0, help="sampling seed [default: 0]")
    s.add_argument("--nrow", type=int, default=8, help="images per row [default: 8]")
    return p


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _trained_more(result, epoch: int, step: int) -> str:
    """A resumed run's training, this call's and in all: "10 more epochs (160 in all)", or
    where an epoch was trained in part, "45 more steps (0.978 epochs; 3 epochs in all)"."""
    last = [r for r in result.history if r["split"] == "train"][-1]
    epochs, steps, per_epoch = last["epoch"] - epoch, last["step"] - step, result.steps_per_epoch
    if per_epoch and steps < epochs * per_epoch:
        return f"{steps} more steps ({steps / per_epoch:.3g} epochs; {result.trained_for()} in all)"
    return f"{epochs} more {'epoch' if epochs == 1 else 'epochs'} ({last['epoch']} in all)"


def _print_table(metrics: dict) -> None:
    # n is num_examples under its older name (both kept in the metrics file): shown once
    rows = [(k, v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (k == "n" and "num_examples" in metrics)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        line = f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
        if k == "bits_per_dim" and "bits_per_dim_from" in metrics:
            line += f"  (from {metrics['bits_per_dim_from']})"
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Run ``vaekit ARGV``; returns the exit status (2: bad input, 130: interrupted). Under
    torchrun a process that fails leaves at once with its status (see the end)."""
    try:
        status = _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C outside the training loop (which checkpoints and returns 130)
        if os.environ.get("VAEKIT_DEBUG"):
            raise
        print(f"vaekit: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        status = 130
    if status and _in_a_process_group():
        # Every rank refusing at once: the interpreter's teardown with the job's C++ threads
        # still up aborted one now and then ("terminate called without an active
        # exception", status -6 where torchrun should report 2). fit has waited for its
        # files by now; nothing is left to flush but the streams.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _in_a_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _main(argv: list[str] | None) -> int:
    from .io import CheckpointError
    from .fast import FastPathError
    from .train import TrainingDiverged

    args = None  # (an error while parsing has no command to name)
    try:
        args = _parser().parse_args(argv)
        if args.command == "train":
            overrides = {k: v for k, v in vars(args).items() if "." in k}
            _no_empty_paths(("--resume", args.resume), ("--config", args.config), ("--run-dir", args.run_dir),
                            ("--data-dir", overrides.get("data.data_dir")))
            if args.resume is not None:
                progress = overrides.pop("train.progress", True)
                epochs = overrides.pop("train.epochs", None)
                data_dir = overrides.pop("data.data_dir", None)
                names = _flag_names()
                refused = [flag for flag, given in (("--preset", args.preset), ("--config", args.config),
                                                    ("--run-dir", args.run_dir),
                                                    ("--time-budget", args.time_budget is not None)) if given]
                refused += [names[tuple(k.split(".", 1))][0] for k in overrides]
                if refused:
                    raise UsageError("--resume continues a run with its saved configuration; it takes only "
                                     f"--epochs, --data-dir and --no-progress, not {', '.join(refused)}")
                from .config import RunConfig, TrainConfig

                result = train_command(RunConfig(train=TrainConfig(progress=progress)), resume=args.resume,
                                       epochs=epochs, data_dir=data_dir)
            else:
                config = build_config(args.preset, args.config, overrides)
                try:
                    _check_input_shape(config, args.config)
                    run_dir = _new_run_dir(args.run_dir, config, args.preset)  # before a calibration
                    try:
                        if args.time_budget is not None:
                            config = _budgeted(config, args.time_budget, epochs_given=_epochs_given(args, overrides))
                        result = train_command(config, run_dir, preset=args.preset)
                    finally:
                        if args.run_dir is None:  # the name made up and claimed above: not left empty by a refusal
                            _remove_if_unused(run_dir)
                except (ValueError, TypeError) as e:
                    if type(e) not in (ValueError, TypeError):  # (a UsageError names its flag already)
                        raise
                    # the run's own checks name config fields, as for a Python caller: here, flags
                    raise type(e)(_said_as_set(str(e), args.preset, overrides, args.config,
                                               _read_config_file(args.config) if args.config else {})) from None
            if result.interrupted:
                return 130
            if not result.trained:  # a finished run resumed: it said so
                return 0
            val = [r for r in result.history if r["split"] == "val"]
            train = [r for r in result.history if r["split"] == "train"]
            if train and int(os.environ.get("RANK", "0")) == 0:  # one summary line per job under torchrun
                score = (f"best val ELBO {-min(r['loss'] for r in val):.3f} nats" if val else
                         f"no validation split, the last model kept (train ELBO {train[-1]['elbo']:.3f} nats)")
                done = _trained_more(result, *result.resumed_from) if result.resumed_from else result.trained_for()
                print(f"vaekit: trained {done}; {score}; run in {result.run_dir}")
            return 0
        if args.command in ("evaluate", "sample"):
            _no_empty_paths(("RUN", args.run), ("--data-dir", getattr(args, "data_dir", None)),
                            ("-o/--output", getattr(args, "output", None)))
        if args.command == "evaluate":
            metrics = evaluate_command(args.run, split=args.split, iw_samples=args.iw_samples,
                                       batch_size=args.batch_size, seed=args.seed, device=args.device,
                                       disentanglement=args.disentanglement, quick=args.quick, limit=args.limit,
                                       num_threads=args.num_threads, precision=args.precision, data_dir=args.data_dir,
                                       progress=not args.no_progress and sys.stderr.isatty())
            _print_table(metrics)
            limit = args.limit if metrics["n"] == args.limit else 0  # a limit beyond the split: the whole split
            print(f"vaekit: metrics written to {Path(args.run) / metrics_name(args.split, limit)}")
            return 0
        if args.command == "sample":
            path = sample_command(args.run, n=args.n, output=args.output, seed=args.seed, nrow=args.nrow)
            print(f"vaekit: {args.n} samples written to {path}")
            return 0
    except (TrainingDiverged, FastPathError) as e:
        if os.environ.get("VAEKIT_DEBUG"):
            raise
        _say_error(str(e).splitlines()[0])
        return 1
    except (UsageError, ValueError, TypeError, FileNotFoundError, CheckpointError, OSError) as e:
        if os.environ.get("VAEKIT_DEBUG"):
            raise
        _say_error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
    except (MemoryError, RuntimeError) as e:
        from .checks import _out_of_memory

        if os.environ.get("VAEKIT_DEBUG") or not _out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say_error(f"out of memory ({first}); ask for less: {_LESS.get(getattr(args, 'command', None), _LESS[None])}")
        return 2
    return 2


def _no_empty_paths(*given: tuple) -> None:
    """Refuse a path given as an empty string: it would mean the current folder, or nothing."""
    for flag, value in given:
        if isinstance(value, str) and not value.strip():
            raise UsageError(f"{flag} needs a path, got an empty one")


# What each command's out-of-memory line asks the user to make smaller, by its flags.
_LESS = {
    "train": "a smaller --batch-size, model (--hidden, --latent-dim) or --iw-samples",
    "evaluate": "a smaller --batch-size or --iw-samples",
    "sample": "fewer images (-n)",
    None: "a smaller model, batch, data set or sample count",
}


# Under torchrun, how long a process other than a machine's first waits before it says an
# error itself: torchrun stops the job's processes once one of them has exited, and it
# looks every 0.1 s by default, so the first process's line comes alone.
_PEER_GRACE_S = 5.0


def _say_error(message: str) -> None:
    """``vaekit: error: MESSAGE`` on stderr. Under torchrun every process meets the same bad
    input (or, for a file rank 0 writes, rank 0 alone meets it): the first process of each
    machine (``LOCAL_RANK`` 0) says it at once, once per machine rather than once per
    process. Another process that met it first exits only after saying it too, after
    ``_PEER_GRACE_S``: by then torchrun has stopped it if the first process said the line
    (torchrun stops every process when one exits, and a process that exited first could
    stop the first one before it spoke)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(_PEER_GRACE_S)
    print(f"vaekit: error: {message}", file=sys.stderr)
