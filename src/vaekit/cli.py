"""The command line: ``vaekit train | evaluate | sample`` (also ``python -m vaekit``).

Each command is a plain function over the config dataclasses; the flags are a view of
those dataclasses. Precedence: preset < ``--config`` file (TOML or JSON) < flags.
Bad input prints one line, ``vaekit: error: ...``, and exits with status 2; Ctrl-C
outside the training loop (which checkpoints first) prints ``vaekit: interrupted`` and
exits with status 130 (``VAEKIT_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from .flags import UsageError, _add_config_flags, _flag_names, build_config
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


# -- commands --------------------------------------------------------------------------


def train_command(config=None, run_dir=None, *, resume: str | None = None, preset: str | None = None,
                  epochs: int | None = None):
    """Train and return the :class:`vaekit.train.FitResult`. ``resume`` continues a run;
    with ``epochs`` too, it extends the run to that many epochs in all (see
    :func:`vaekit.train.fit`)."""
    from .train import fit

    if epochs is not None and not resume:
        raise UsageError(f"epochs extends the run given by resume; a new run takes config.train.epochs, "
                         f"got epochs={epochs!r} without resume")
    if resume:
        rd = Path(resume)
        if not (rd / "checkpoint.pt").is_file():
            raise UsageError(f"--resume {resume}: no checkpoint.pt there to resume from")
        from .train import RunConfig

        return fit(config or RunConfig(), rd, resume=True, epochs=epochs)
    return fit(config, _new_run_dir(run_dir, config, preset))


def _new_run_dir(run_dir, config, preset: str | None) -> Path:
    """Where a new run goes (``runs/<preset, else dataset>-<time>`` unless given), checked
    before any data are loaded: a new or empty directory that can be created."""
    from .train import holds_a_run

    if run_dir is None:
        stem = preset or config.data.dataset
        run_dir = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory; name a new or empty directory")
    if holds_a_run(run_dir):
        raise UsageError(
            f"--run-dir {run_dir} already exists and is not empty; choose another, or continue it with --resume {run_dir}"
        )
    _check_writable("--run-dir", run_dir, run_dir)
    return run_dir


def _check_writable(flag: str, given, directory: Path) -> None:
    """Refuse ``given`` (the value of ``flag``) unless files can be made in ``directory``,
    or, where it does not exist yet, in the nearest folder above it that does."""
    where = directory
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise UsageError(f"{flag} {given}: {where} is a file, not a directory")
    try:
        # a name holds_a_run passes over: another rank may be checking the same folder now
        tempfile.TemporaryDirectory(prefix=".vaekit-probe-", suffix=".tmp", dir=where).cleanup()
    except OSError as e:
        raise UsageError(f"{flag} {given}: cannot create files in {where} ({e.strerror or e})") from None


def _check_input_shape(config, config_file: str | None) -> None:
    """A ``[model] input_shape`` in ``--config`` must be the data's: the run takes its
    input shape from the data, and replacing the one asked for would hide a mistake."""
    from .data import load_dataset
    from .flags import _read_config_file

    model = _read_config_file(config_file).get("model") if config_file else None
    if not isinstance(model, dict) or "input_shape" not in model:
        return
    # the shape only: two sprites render in no time where the whole set takes seconds
    probe = dataclasses.replace(config.data, sprites_count=2, val_size=0, binarize="none")
    shape = tuple(load_dataset(probe).train.shape[1:])
    if tuple(config.model.input_shape) != shape:
        raise UsageError(f"--config {config_file}: [model] input_shape {list(config.model.input_shape)} is not the "
                         f"shape of the data, {list(shape)} (dataset {config.data.dataset!r}); the run takes it from "
                         f"the data: remove the key")


def _budgeted(config, seconds: float, *, epochs_given: bool):
    """``config`` with the epochs that fit in ``seconds`` (--time-budget), said in one line."""
    import dataclasses
    import math

    from .train import epochs_for_budget

    if epochs_given:
        raise UsageError("--time-budget sets the number of epochs; give --epochs or --time-budget, not both")
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--time-budget must be a number of seconds > 0, got {seconds:g}")
    epochs, per_epoch = epochs_for_budget(config, seconds)
    print(f"vaekit: calibration: {per_epoch:.3f} s an epoch -> {_epochs(epochs)} for a {seconds:g} s budget", flush=True)
    config.train = dataclasses.replace(config.train, epochs=epochs)
    return config


def _load_run(run: str):
    from .io import read_json
    from .models import VAE
    from .runs import saved_config

    rd = Path(run)
    if not rd.is_dir():
        raise UsageError(f"RUN {run}: no such run directory")
    if not (rd / "config.json").is_file():
        raise UsageError(f"RUN {run}: no config.json; is this a vaekit run directory?")
    raw = read_json(rd / "config.json")
    try:
        config = saved_config(raw)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{rd / 'config.json'}: {e}") from None
    model = VAE.from_pretrained(rd / "model")
    return rd, config, model


def evaluate_command(run: str, *, split: str = "test", iw_samples: int = 0, batch_size: int = 500,
                     seed: int = 0, device: str = "auto", disentanglement: bool = False,
                     quick: bool = False, limit: int = 0, num_threads: int = 0, progress: bool = False,
                     precision: str = "fp32") -> dict:
    """ELBO, reconstruction, KL (and the importance-weighted log-likelihood when
    ``iw_samples > 0``) on a split; writes ``RUN/metrics-<split>.json``. ``limit > 0``
    scores only the split's first ``limit`` examples (a quick estimate for an expensive
    model) and writes ``RUN/metrics-<split>-first<limit>.json`` instead. ``num_threads > 0``
    sets PyTorch's CPU threads for the call (restored after); ``progress`` shows a bar over
    the batches; ``precision``: the arithmetic, ``fp32`` (default), ``tf32`` (CUDA) or
    ``bf16`` (see :func:`vaekit.evaluate.iw_log_likelihood`; the metrics record which)."""
    import torch

    if split not in ("test", "val", "train"):
        raise UsageError(f"--split must be test, val or train, got {split!r}")
    if iw_samples < 0:
        raise UsageError(f"--iw-samples must be >= 0, got {iw_samples}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit < 0:
        raise UsageError(f"--limit must be >= 0 (0: the whole split), got {limit}")
    if quick and not disentanglement:
        raise UsageError("--quick sizes the --disentanglement metrics, and --disentanglement was not given")
    if num_threads < 0:
        raise UsageError(f"--num-threads must be >= 0 (0: PyTorch's default), got {num_threads}")
    if not 0 <= seed <= _MAX_SEED:  # the estimates draw with seed, seed + 1 and seed + 2
        raise UsageError(f"--seed must be an integer in [0, {_MAX_SEED}], got {seed}")
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _evaluate(run, split, iw_samples, batch_size, seed, device, disentanglement, quick, limit, progress,
                         precision)
    finally:
        torch.set_num_threads(threads)


def _evaluate(run, split, iw_samples, batch_size, seed, device, disentanglement, quick, limit, progress,
              precision) -> dict:
    import torch

    from .data import load_dataset
    from .evaluate import evaluate_model
    from .io import write_json
    from .train import resolve_device

    rd, config, model = _load_run(run)
    if disentanglement and config.data.dataset != "sprites":  # before minutes of evaluation, not after
        raise UsageError(f"--disentanglement needs a model trained on the sprites factor dataset (dataset 'sprites'); "
                         f"{run} was trained on {config.data.dataset!r}")
    dev = resolve_device(device, what="--device")
    if precision == "tf32" and dev.type != "cuda":  # the metrics would claim an arithmetic not used
        raise UsageError(f"--precision tf32 is CUDA's arithmetic; on {dev} the evaluation is float32 "
                         "(--precision fp32) or bfloat16 (--precision bf16)")
    model.to(dev)
    try:
        data = load_dataset(config.data)
    except FileNotFoundError as e:  # evaluate has no download flag: say where the data go
        msg = str(e).replace("set download=True to fetch them",
                             f"fetch them there with vaekit train --dataset {config.data.dataset} "
                             f"--data-dir {config.data.data_dir} --download")
        raise UsageError(f"{rd / 'config.json'} names data that are missing: {msg}") from None
    x = getattr(data, split)
    if limit > x.shape[0]:  # more than the split holds: the split's metrics, not a "first N" file
        limit = 0
    x = x[:limit] if limit else x
    if split == "train" and config.data.binarize == "dynamic" and x.shape[0]:
        # training drew a fresh binarization of these grey levels each epoch; they are scored,
        # as the validation and test images are, on one fixed draw (grey levels under a
        # Bernoulli likelihood would not be a log-likelihood)
        from .data import binarize_dynamic

        x = binarize_dynamic(x, torch.Generator().manual_seed(config.data.seed + 2))
    x = x.to(dev, next(model.parameters()).dtype)  # a float64 model: float64 data
    if x.shape[0] == 0:
        raise UsageError(f"--split {split}: the split is empty for dataset {config.data.dataset!r}")
    t0 = time.perf_counter()
    metrics = evaluate_model(model, x, iw_samples=iw_samples, batch_size=batch_size, seed=seed, progress=progress,
                             precision=precision)
    seconds = time.perf_counter() - t0
    if disentanglement:
        from .disentangle import evaluate_disentanglement

        metrics.update(evaluate_disentanglement(model, seed=seed, quick=quick))
        metrics["disentanglement_quick"] = quick  # rough scores say so in the file
    where = f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
    result = {"split": split, "n": int(x.shape[0]), "iw_samples": iw_samples, **metrics,
              "seed": seed, "batch_size": batch_size,  # the estimates depend on both
              "seconds": round(seconds, 3), "device": where, "torch": torch.__version__}
    write_json(rd / metrics_name(split, limit), result)
    return result


_MAX_SEED = 2**64 - 3  # a generator takes seeds below 2**64, and evaluate also draws with seed + 2


def metrics_name(split: str, limit: int = 0) -> str:
    """The file ``vaekit evaluate`` writes its metrics to, in the run directory."""
    return f"metrics-{split}-first{limit}.json" if limit else f"metrics-{split}.json"


def sample_command(run: str, *, n: int = 64, output: str = "samples.png", seed: int = 0, nrow: int = 8) -> Path:
    """Draw ``n`` samples from a trained run and save them as an image grid."""
    import torch

    from .plots import _image_shape, save_image_grid

    if n < 1:
        raise UsageError(f"-n must be a positive integer, got {n}")
    if nrow < 1:
        raise UsageError(f"--nrow must be a positive integer, got {nrow}")
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"-o must name a .png or .jpg file, got {output!r}")
    if out.is_dir():
        raise UsageError(f"-o/--output {output} is a directory; name an image file, e.g. {out / 'samples.png'}")
    _check_writable("-o/--output", output, out.parent)
    _, _, model = _load_run(run)
    shape = model.config.input_shape
    try:
        image_shape = _image_shape(shape)
    except ValueError:
        raise UsageError(f"vaekit sample draws an image grid, and {run} models data of shape {tuple(shape)}, "
                         f"not images; draw them in Python with VAE.sample") from None
    model.eval()
    g = torch.Generator().manual_seed(seed)
    images = model.sample(n, generator=g)
    scale = max(1, 112 // image_shape[-1])  # as the run's samples.png
    try:
        return save_image_grid(images, out, nrow=nrow, scale=scale, image_shape=image_shape)
    except OSError as e:
        raise UsageError(f"-o/--output {output}: cannot be written ({e.strerror or e})") from None


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
    t.add_argument("--config", metavar="FILE", help="TOML or JSON file with [model], [data], [train], [objective] sections")
    t.add_argument("--run-dir", metavar="DIR", help="where to write the run [default: runs/<preset, else dataset>-<time>]")
    t.add_argument("--resume", metavar="RUN",
                   help="continue the run in RUN from its last checkpoint, with its saved configuration; "
                        "only --no-progress and --epochs N go with it. --epochs N extends the run to N "
                        "epochs in all (more than it has done) and saves N in RUN/config.json; a cosine "
                        "learning rate then follows the cosine over N epochs from the resume point on")
    t.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train as many epochs as fit in SECONDS of training loop, timed by a 3-epoch "
                        "calibration run first (thrown away); sets --epochs, so the cosine schedule ends "
                        "with the budget")
    _add_config_flags(t)

    e = sub.add_parser("evaluate", help="evaluate a trained run", description="Evaluate a trained run on a split.")
    e.add_argument("run", metavar="RUN", help="run directory written by 'vaekit train'")
    e.add_argument("--split", default="test", choices=["test", "val", "train"], help="which split [default: test]")
    e.add_argument("--iw-samples", type=int, default=0, metavar="K",
                   help="importance samples for the log-likelihood estimate (0: off; published numbers use 5000)")
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
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar over the batches (shown only on a terminal anyway)")

    s = sub.add_parser("sample", help="draw samples from a trained run", description="Save a grid of samples.")
    s.add_argument("run", metavar="RUN", help="run directory written by 'vaekit train'")
    s.add_argument("-n", type=int, default=64, help="number of samples [default: 64]")
    s.add_argument("-o", "--output", default="samples.png", help="output image file [default: samples.png]")
    s.add_argument("--seed", type=int, default=0, help="sampling seed [default: 0]")
    s.add_argument("--nrow", type=int, default=8, help="images per row [default: 8]")
    return p


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _print_table(metrics: dict) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    """Run ``vaekit ARGV``; returns the exit status (2: bad input, 130: interrupted)."""
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C outside the training loop (which checkpoints and returns 130)
        if os.environ.get("VAEKIT_DEBUG"):
            raise
        print(f"vaekit: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .io import CheckpointError
    from .fast import FastPathError
    from .train import TrainingDiverged

    try:
        args = _parser().parse_args(argv)
        if args.command == "train":
            overrides = {k: v for k, v in vars(args).items() if "." in k}
            if args.resume:
                progress = overrides.pop("train.progress", True)
                epochs = overrides.pop("train.epochs", None)
                names = _flag_names()
                refused = [flag for flag, given in (("--preset", args.preset), ("--config", args.config),
                                                    ("--run-dir", args.run_dir),
                                                    ("--time-budget", args.time_budget is not None)) if given]
                refused += [names[tuple(k.split(".", 1))][0] for k in overrides]
                if refused:
                    raise UsageError("--resume continues a run with its saved configuration; it takes only "
                                     f"--epochs and --no-progress, not {', '.join(refused)}")
                from .config import RunConfig, TrainConfig

                result = train_command(RunConfig(train=TrainConfig(progress=progress)), resume=args.resume,
                                       epochs=epochs)
            else:
                config = build_config(args.preset, args.config, overrides)
                _check_input_shape(config, args.config)
                run_dir = _new_run_dir(args.run_dir, config, args.preset)  # before a calibration
                if args.time_budget is not None:
                    config = _budgeted(config, args.time_budget, epochs_given="train.epochs" in overrides)
                result = train_command(config, run_dir, preset=args.preset)
            if result.interrupted:
                return 130
            if not result.trained:  # a finished run resumed: it said so
                return 0
            val = [r for r in result.history if r["split"] == "val"]
            train = [r for r in result.history if r["split"] == "train"]
            if train and int(os.environ.get("RANK", "0")) == 0:  # one summary line per job under torchrun
                score = (f"best val ELBO {-min(r['loss'] for r in val):.3f} nats" if val else
                         f"no validation split, the last model kept (train ELBO {train[-1]['elbo']:.3f} nats)")
                print(f"vaekit: trained {_epochs(train[-1]['epoch'])}; {score}; run in {result.run_dir}")
            return 0
        if args.command == "evaluate":
            metrics = evaluate_command(args.run, split=args.split, iw_samples=args.iw_samples,
                                       batch_size=args.batch_size, seed=args.seed, device=args.device,
                                       disentanglement=args.disentanglement, quick=args.quick, limit=args.limit,
                                       num_threads=args.num_threads, precision=args.precision,
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
        print(f"vaekit: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, TypeError, FileNotFoundError, CheckpointError, OSError) as e:
        if os.environ.get("VAEKIT_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vaekit: error: {msg}", file=sys.stderr)
        return 2
    return 2
