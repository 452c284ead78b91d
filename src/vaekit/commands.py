"""The commands as Python functions: what ``vaekit train | evaluate | sample`` run.

``train_command`` takes a :class:`vaekit.config.RunConfig` and a run directory (or a run
to resume); ``evaluate_command`` and ``sample_command`` take a run directory written by
training, with keyword settings named as the flags are. Each checks its input before
any work starts (a new run directory must be empty and writable, an output image must be
a .png or .jpg in a folder that takes files) and raises :class:`vaekit.flags.UsageError`
with a message that names the flag. Reading flags, printing and exit statuses are the
command line's job, in :mod:`vaekit.cli`, which re-exports these names.

Evaluation writes ``RUN/metrics-<split>.json`` (``metrics-<split>-first<N>.json`` for the
first N examples only: :func:`metrics_name`), with the seed, batch size, device and
torch version the estimates depend on; an earlier file there that holds what the new one
lacks (an importance-weighted NLL of more samples, disentanglement scores) is kept as
``metrics-<split>-earlier<n>.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from .checks import MAX_EVAL_SEED, MAX_IW_SAMPLES, slow_bf16_note
from .flags import UsageError

__all__ = ["train_command", "evaluate_command", "sample_command", "metrics_name"]

_MAX_SEED = MAX_EVAL_SEED  # (the name cli re-exports)
MAX_SAMPLES = 10_000  # vaekit sample -n: images in one grid


def train_command(config=None, run_dir=None, *, resume: str | None = None, preset: str | None = None,
                  epochs: int | None = None, data_dir: str | None = None):
    """Train and return the :class:`vaekit.train.FitResult`. ``resume`` continues a run;
    with ``epochs`` too, it extends the run to that many epochs in all; with ``data_dir``,
    it finds the run's data there (see :func:`vaekit.train.fit`)."""
    from .train import check_resume_only, fit

    check_resume_only(bool(resume), epochs, data_dir, UsageError)
    if resume:
        rd = Path(resume)
        if not rd.is_dir():
            raise UsageError(f"--resume {resume}: no such run directory")
        if not (rd / "checkpoint.pt").is_file() and not (rd / "config.json").is_file():
            # (config.json alone: a run stopped before its first checkpoint, which fit starts again)
            raise UsageError(f"--resume {resume}: no checkpoint.pt (nor config.json) there to resume from")
        _check_writable("--resume", resume, rd)  # its checkpoints go there: before the data are loaded
        from .train import RunConfig

        try:
            with _in_use_named_by("--resume"):
                return fit(config or RunConfig(), rd, resume=True, epochs=epochs, data_dir=data_dir)
        except FileNotFoundError as e:  # the run's data, not where it recorded them
            if "data_dir" not in str(e):
                raise
            saved = _saved_data(rd)
            msg = _fetch_them(str(e), saved.get("dataset"), data_dir or saved.get("data_dir"))
            if data_dir is not None:
                raise UsageError(f"--data-dir {data_dir}: {msg}") from None
            raise UsageError(f"--resume {resume}: the run's data are missing: {msg} (or give --data-dir where they "
                             f"are now)") from None
    named = run_dir is None
    run_dir = _new_run_dir(run_dir, config, preset)
    try:
        with _in_use_named_by("--run-dir"):
            return fit(config, run_dir)
    except FileNotFoundError as e:  # the readers speak of DataConfig(download=True), a flag here
        if "data_dir" not in str(e):
            raise
        raise UsageError(str(e).replace(_PYTHON_DOWNLOAD, "add --download to fetch them")) from None
    finally:
        if named:  # the name made up (and the directory claimed) here: not left empty by a refused run
            _remove_if_unused(run_dir)


@contextlib.contextmanager
def _in_use_named_by(flag: str):
    """fit's refusal of a run directory another process trains in, named by the flag."""
    from .train import RunDirectoryInUse

    try:
        yield
    except RunDirectoryInUse as e:
        raise UsageError(f"{flag} {e.run_dir} is in use: {e.why}") from None


_PYTHON_DOWNLOAD = "set download=True to fetch them"  # the readers' advice for missing MNIST files


def _fetch_them(msg: str, dataset: str | None, data_dir: str | None) -> str:
    """A reader's missing-data message for a run that exists: its data are fetched by a new
    run's --download, into the folder the run reads."""
    if dataset is None:
        return msg.replace(_PYTHON_DOWNLOAD, "fetch them there with vaekit train's --download")
    return msg.replace(_PYTHON_DOWNLOAD, f"fetch them there with vaekit train --dataset {dataset} "
                                         f"--data-dir {data_dir} --download")


def _saved_data(rd: Path) -> dict:
    """The ``data`` section of ``rd/config.json``, or ``{}`` where it cannot be read (only
    a message's hint depends on it)."""
    from .io import read_json

    try:
        data = read_json(rd / "config.json").get("data")
    except (OSError, ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def _new_run_dir(run_dir, config, preset: str | None) -> Path:
    """Where a new run goes (``runs/<preset, else dataset>-<time>`` unless given), checked
    before any data are loaded: a new or empty directory that can be created."""
    from .train import holds_a_run

    if run_dir is None:
        return _claim_new_name(Path("runs") / f"{preset or config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(run_dir)
    try:
        if os.path.lexists(run_dir) and not run_dir.is_dir():
            what = "a file, not a directory" if run_dir.exists() else "a link that leads to no directory"
            raise UsageError(f"--run-dir {run_dir} is {what}; name a new or empty directory")
        if holds_a_run(run_dir):
            raise UsageError(f"--run-dir {run_dir} already exists and is not empty; choose another, or continue it "
                             f"with --resume {run_dir}")
    except OSError as e:  # a name too long for the file system, a folder that cannot be read
        raise UsageError(f"--run-dir {run_dir}: {e.strerror or e}") from None
    _check_writable("--run-dir", run_dir, run_dir)
    return run_dir


def _claim_new_name(stem: Path) -> Path:
    """``stem``, or ``stem-2``, ``stem-3``, ...: the first that this process creates itself,
    so that runs started in the same second each get their own directory. Under torchrun
    every process makes up its own name and only rank 0 writes (docs/distributed.md): the
    name is not claimed there."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return stem
    _check_writable("the run directory (no --run-dir given)", stem, stem)
    for k in range(1, 1000):
        path = stem if k == 1 else stem.with_name(f"{stem.name}-{k}")
        try:
            made = [d for d in path.parents if not d.exists()]  # (runs/): removed again with the run's own
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            _MADE_ABOVE[path] = made
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"--run-dir {path}: {e.strerror or e}") from None
    raise UsageError(f"--run-dir: {stem} and 998 more names after it are taken; give --run-dir")


# The folders _claim_new_name made above a run directory it claimed, innermost first.
_MADE_ABOVE: dict = {}


def _remove_if_unused(run_dir: Path) -> None:
    """``run_dir`` removed if it is empty, and with it the folders above it that
    :func:`_claim_new_name` made for it (never one that was there before) that are empty."""
    for d in (run_dir, *_MADE_ABOVE.pop(run_dir, ())):
        try:
            d.rmdir()
        except OSError:
            return


def _check_writable(flag: str, given, directory: Path) -> None:
    """Refuse ``given`` (the value of ``flag``) unless files can be made in ``directory``,
    or, where it does not exist yet, in the nearest folder above it that does."""
    where = directory
    try:
        while not where.exists() and where != where.parent:
            where = where.parent
    except OSError as e:  # a name too long for the file system
        raise UsageError(f"{flag} {given}: {e.strerror or e}") from None
    if not where.is_dir():
        raise UsageError(f"{flag} {given}: {where} is a file, not a directory")
    try:
        # a name holds_a_run passes over: another rank may be checking the same folder now
        tempfile.TemporaryDirectory(prefix=".vaekit-probe-", suffix=".tmp", dir=where).cleanup()
    except OSError as e:
        raise UsageError(f"{flag} {given}: cannot create files in {where} ({e.strerror or e})") from None


def _load_run(run: str):
    """``(run directory, its RunConfig, its VAE)`` for a run written by training; a folder
    that is not one is refused with a UsageError that says what is missing."""
    from .io import read_json
    from .models import VAE
    from .runs import saved_config
    from .train import in_use

    rd = Path(run)
    if not rd.is_dir():
        raise UsageError(f"RUN {run}: no such run directory")
    if (rd / "model.safetensors").is_file():  # RUN/model (its config.json is the model's, not the run's)
        raise UsageError(f"RUN {run} is a saved model's directory (model.safetensors and its config.json), not a "
                         f"run directory: {_holding_run(rd)}")
    training = in_use(rd)
    if not (rd / "config.json").is_file():
        if training:
            raise UsageError(f"RUN {run} has no config.json yet: a vaekit process has just started training there; "
                             f"its model is saved at the end of its first epoch")
        raise UsageError(f"RUN {run}: no config.json; is this a vaekit run directory?")
    raw = read_json(rd / "config.json")
    try:
        config = saved_config(raw)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{rd / 'config.json'}: {e}") from None
    if not os.path.lexists(rd / "model"):  # saved at the end of the first epoch
        if training:
            raise UsageError(f"RUN {run} has no saved model yet: a vaekit process is training there, and saves its "
                             f"model at the end of its first epoch")
        if (rd / "checkpoint.pt").is_file():
            raise UsageError(f"RUN {run} has no saved model yet (it stopped before its first epoch ended); "
                             f"continue it with vaekit train --resume {run}")
        raise UsageError(f"RUN {run} has no saved model (it stopped before its first epoch ended, and before its "
                         f"first checkpoint); vaekit train --resume {run} trains it again from the start")
    model = VAE.from_pretrained(rd / "model")
    return rd, config, model


def _holding_run(model_dir: Path) -> str:
    """What to give instead of a saved model's directory: the run it is the ``model/`` of,
    where it is one."""
    parent = model_dir.parent if model_dir.name not in ("", "..") else model_dir.resolve().parent
    if model_dir.resolve().name == "model" and (parent / "config.json").is_file():
        return f"give the run directory that holds it ({parent})"
    return ("give the run directory that vaekit train wrote (a saved model alone loads in Python with "
            "VAE.from_pretrained)")


def _check_trained_on(rd: Path, x, data_dir, split: str = "train", scored=None, recorded=None) -> None:
    """The data about to be scored must be the run's: found elsewhere (``data_dir``, given
    by --data-dir) or at the path the run recorded (``recorded``, with ``data_dir`` None),
    which may have changed since. Its checkpoint, when it has one, records its training
    data and, for the validation split always and for the test split since vaekit recorded
    it, the ``split`` about to be ``scored`` (:func:`vaekit.runs.data_record`)."""
    from .io import CheckpointError, load_checkpoint
    from .runs import _sha256, data_record, same_data

    try:
        saved = load_checkpoint(rd / "checkpoint.pt").get("data")
    except (CheckpointError, FileNotFoundError):  # no (readable) checkpoint: nothing to check against
        if data_dir is not None:  # (said where the user pointed elsewhere)
            print(f"vaekit: note: --data-dir {data_dir} is not checked against the data {rd} trained on: it has no "
                  f"readable checkpoint.pt", file=sys.stderr, flush=True)
        return
    if data_dir is not None:
        where, other, hint = f"--data-dir {data_dir}: ", f"these are not the data {rd} trained on", ""
    else:
        where, other = f"RUN {rd}: ", f"the data at {recorded} changed since the run trained on them"
        hint = "; give --data-dir where the run's own data are now"
    now = data_record(x)
    if isinstance(saved, dict) and not same_data(saved, now):
        key = "hash" if "hash" in saved else "fingerprint"
        raise UsageError(f"{where}{other} ({now['examples']} "
                         f"training examples of shape {tuple(now['shape'])}, {key} {now[key]}; "
                         f"its checkpoint records {saved.get('examples')} of shape "
                         f"{tuple(saved.get('shape') or ())}, {key} {saved.get(key)}){hint}")
    prefix = split if split in ("val", "test") else None  # data_record's names for the split's entries
    if isinstance(saved, dict) and prefix and f"{prefix}_hash" in saved and scored is not None:
        got = (int(scored.shape[0]), _sha256(scored))
        if got != (saved.get(f"{prefix}_examples"), saved[f"{prefix}_hash"]):
            there = "there" if data_dir is not None else f"at {recorded} now"
            raise UsageError(f"{where}the {split} split {there} is not the one {rd} recorded "
                             f"({got[0]} examples, hash {got[1]}; its checkpoint records "
                             f"{saved.get(f'{prefix}_examples')}, hash {saved[f'{prefix}_hash']}), though its "
                             f"training examples are the run's{hint}")


def evaluate_command(run: str, *, split: str = "test", iw_samples: int = 0, batch_size: int = 500,
                     seed: int = 0, device: str = "auto", disentanglement: bool = False,
                     quick: bool = False, limit: int = 0, num_threads: int = 0, progress: bool = False,
                     precision: str = "fp32", data_dir: str | None = None) -> dict:
    """ELBO, reconstruction, KL (and the importance-weighted log-likelihood when
    ``iw_samples > 0``) on a split; writes ``RUN/metrics-<split>.json``. ``limit > 0``
    scores only the split's first ``limit`` examples (a quick estimate for an expensive
    model) and writes ``RUN/metrics-<split>-first<limit>.json`` instead. ``num_threads > 0``
    sets PyTorch's CPU threads for the call (restored after); ``progress`` shows a bar over
    the batches; ``precision``: the arithmetic, ``fp32`` (default), ``tf32`` (CUDA) or
    ``bf16`` (see :func:`vaekit.evaluate.iw_log_likelihood`; the metrics record which).
    ``data_dir``: where the run's data are now, if not where training recorded them (a run
    records an absolute path, which another machine may lack). For a run that still has
    its checkpoint, the data read, there or at the recorded path, must be the data it
    trained on (without one, they are not checked: a note says so for ``data_dir``). The
    result (and file) holds :func:`vaekit.evaluate.evaluate_model`'s metrics, ``n`` (the
    examples scored, its ``num_examples`` too) and, with ``bits_per_dim``,
    ``bits_per_dim_from``: ``"iw_nll"`` when ``iw_samples > 0``, else ``"elbo"`` (the
    bound -ELBO, higher). ``seconds`` times the likelihood estimate;
    ``disentanglement_seconds`` the scores."""
    import torch

    from .config import MAX_THREADS

    if split not in ("test", "val", "train"):
        raise UsageError(f"--split must be test, val or train, got {split!r}")
    if not 0 <= iw_samples <= MAX_IW_SAMPLES:
        raise UsageError(f"--iw-samples must be an integer in [0, {MAX_IW_SAMPLES}], got {iw_samples}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit < 0:
        raise UsageError(f"--limit must be >= 0 (0: the whole split), got {limit}")
    if quick and not disentanglement:
        raise UsageError("--quick sizes the --disentanglement metrics, and --disentanglement was not given")
    if not 0 <= num_threads <= MAX_THREADS:
        raise UsageError(f"--num-threads must be an integer in [0, {MAX_THREADS}] (0: PyTorch's default), "
                         f"got {num_threads}")
    if not 0 <= seed <= _MAX_SEED:  # the estimates draw with seed, seed + 1 and seed + 2
        raise UsageError(f"--seed must be an integer in [0, {_MAX_SEED}], got {seed}")
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _evaluate(run, split, iw_samples, batch_size, seed, device, disentanglement, quick, limit, progress,
                         precision, data_dir)
    finally:
        torch.set_num_threads(threads)


def _evaluate(run, split, iw_samples, batch_size, seed, device, disentanglement, quick, limit, progress,
              precision, data_dir=None) -> dict:
    import torch

    from .data import load_dataset
    from .evaluate import _check_precision, evaluate_model
    from .io import write_json
    from .train import resolve_device

    rd, config, model = _load_run(run)
    _check_writable("RUN", run, rd)  # where the metrics go: before the evaluation, not after it
    if disentanglement and config.data.dataset != "sprites":  # before minutes of evaluation, not after
        raise UsageError(f"--disentanglement needs a model trained on the sprites factor dataset (dataset 'sprites'); "
                         f"{run} was trained on {config.data.dataset!r}")
    from .data import FILE_DATASETS

    if data_dir is not None:
        if config.data.dataset not in FILE_DATASETS:
            raise UsageError(f"--data-dir: {run} was trained on {config.data.dataset!r}, which is made in "
                             f"memory, not read from files; leave --data-dir out")
        config.data = dataclasses.replace(config.data, data_dir=str(Path(data_dir).expanduser()))
    dev = resolve_device(device, what="--device")
    if precision == "tf32" and dev.type != "cuda":  # the metrics would claim an arithmetic not used
        raise UsageError(f"--precision tf32 is CUDA's arithmetic; on {dev} the evaluation is float32 "
                         "(--precision fp32) or bfloat16 (--precision bf16)")
    model.to(dev)
    try:
        data = load_dataset(config.data)
    except FileNotFoundError as e:  # evaluate has no download flag: say where the data go
        msg = _fetch_them(str(e), config.data.dataset, config.data.data_dir)
        if data_dir is not None:
            raise UsageError(f"--data-dir {data_dir}: {msg}") from None
        raise UsageError(f"{rd / 'config.json'} names data that are missing: {msg} (or give --data-dir where "
                         f"they are now)") from None
    except (MemoryError, RuntimeError) as e:
        from .checks import _out_of_memory

        if not _out_of_memory(e):
            raise
        # (not the command line's advice of a smaller batch: every split is loaded whole, whatever the flags)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"out of memory loading the data {run} trained on ({first}): every split of the data set "
                         f"is loaded whole, whatever --split, --limit, --batch-size or --iw-samples; free memory, "
                         f"or evaluate on a machine with more") from None
    if config.data.dataset in FILE_DATASETS:  # files, which may have changed since the run trained
        recorded = config.data.data_dir or os.path.join("data", config.data.dataset)  # (as load_dataset reads)
        _check_trained_on(rd, data.train, data_dir, split, getattr(data, split), recorded)
    x = getattr(data, split)
    if limit > x.shape[0]:  # more than the split holds: the split's metrics, not a "first N" file
        limit = 0
    if split == "train" and config.data.binarize == "dynamic" and x.shape[0]:
        # training drew a fresh binarization of these grey levels each epoch; they are scored,
        # as the validation and test images are, on one fixed draw (grey levels under a
        # Bernoulli likelihood would not be a log-likelihood). The whole split's draw, then
        # the first --limit of it: the same images whatever the limit.
        from .data import binarize_dynamic

        x = binarize_dynamic(x, torch.Generator().manual_seed(config.data.seed + 2))
    x = x[:limit] if limit else x
    x = x.to(dev, next(model.parameters()).dtype)  # a float64 model: float64 data
    if x.untyped_storage().nbytes() >= 2 * x.nbytes:  # a view into the other splits' memory (or a --limit's part)
        x = x.clone()  # a copy of its own, so that theirs goes back
    del data  # the training data, hashed above, are not needed any more
    if x.shape[0] == 0:
        raise UsageError(f"--split {split}: the split is empty for dataset {config.data.dataset!r}")
    _check_precision(precision, model)  # (a float64 model) before the note: a refusal is said alone
    slow = slow_bf16_note(dev, "--precision bf16") if precision == "bf16" else None
    if slow:
        print(f"vaekit: {slow}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    metrics = evaluate_model(model, x, iw_samples=iw_samples, batch_size=batch_size, seed=seed, progress=progress,
                             precision=precision)
    seconds = time.perf_counter() - t0
    if disentanglement:
        from .disentangle import evaluate_disentanglement

        t1 = time.perf_counter()
        metrics.update(evaluate_disentanglement(model, seed=seed, quick=quick))
        metrics["disentanglement_quick"] = quick  # rough scores say so in the file
        # ("seconds" times the likelihood estimate alone, as without the scores)
        metrics["disentanglement_seconds"] = round(time.perf_counter() - t1, 3)
    where = f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
    read = {"data_dir": config.data.data_dir} if config.data.dataset in FILE_DATASETS else {}  # which files
    if "bits_per_dim" in metrics:  # of the best NLL at hand (vaekit.evaluate.evaluate_model)
        metrics["bits_per_dim_from"] = "iw_nll" if "iw_nll" in metrics else "elbo"
    result = {"split": split, "n": int(x.shape[0]), "iw_samples": iw_samples, **metrics,
              "seed": seed, "batch_size": batch_size,  # the estimates depend on both
              **read, "seconds": round(seconds, 3), "device": where, "torch": torch.__version__}
    path = rd / metrics_name(split, limit)
    kept = _keep_costlier(path, result)
    if kept is not None:
        print(f"vaekit: the earlier {path.name} held {kept[1]}, which this evaluation does not: kept as {kept[0]}",
              flush=True)
    write_json(path, result)
    return result


def _keep_costlier(path: Path, new: dict) -> tuple[Path, str] | None:
    """An earlier metrics file at ``path`` that holds what ``new`` lacks (an importance-
    weighted estimate from more samples, disentanglement scores: hours of work, perhaps)
    moved aside to ``metrics-<split>-earlier<n>.json`` (the first free ``n``) before ``new``
    takes its place: ``(where, what)``."""
    from .io import read_json

    try:
        old = read_json(path)
    except (OSError, ValueError):  # none, or not a metrics file: nothing to keep
        return None
    if not isinstance(old, dict):
        return None
    lost = []
    k_old, k_new = old.get("iw_samples"), new.get("iw_samples") or 0
    if "iw_nll" in old and isinstance(k_old, int) and k_old > k_new:
        lost.append(f"an importance-weighted NLL of {k_old} samples")
    if "disentanglement_quick" in old and "disentanglement_quick" not in new:
        lost.append("disentanglement scores")
    if not lost:
        return None
    for n in range(1, 10_000):
        aside = path.with_name(f"{path.stem}-earlier{n}{path.suffix}")
        try:
            os.link(path, aside)  # fails if the name is taken: no earlier copy is written over
        except FileExistsError:
            continue
        except FileNotFoundError:  # another evaluation moved it aside first
            return None
        except OSError:  # a file system without hard links
            if aside.exists():
                continue
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                return None
            return aside, " and ".join(lost)
        path.unlink(missing_ok=True)  # (another evaluation may have linked it too, and unlinked it first)
        return aside, " and ".join(lost)
    return None


def metrics_name(split: str, limit: int = 0) -> str:
    """The file ``vaekit evaluate`` writes its metrics to, in the run directory."""
    return f"metrics-{split}-first{limit}.json" if limit else f"metrics-{split}.json"


def sample_command(run: str, *, n: int = 64, output: str = "samples.png", seed: int = 0, nrow: int = 8) -> Path:
    """Draw ``n`` samples from a trained run and save them as an image grid, enlarged as
    the run's ``samples.png`` is, or less where that grid would be too large to open."""
    import torch

    from .plots import JPEG_MAX_SIDE, MAX_GRID_PIXELS, _fits, _grid_size, _image_shape, save_image_grid

    if not 1 <= n <= MAX_SAMPLES:
        raise UsageError(f"-n must be an integer in [1, {MAX_SAMPLES}] (one image grid; draw more in Python with "
                         f"VAE.sample), got {n}")
    if not 0 <= seed <= _MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, {_MAX_SEED}], got {seed}")
    if nrow < 1:
        raise UsageError(f"--nrow must be a positive integer, got {nrow}")
    out = Path(output)
    if str(output).endswith(tuple(filter(None, (os.sep, os.altsep)))):  # Path drops it: dirx.png/ made a file
        raise UsageError(f"-o/--output {output} ends with {str(output)[-1]}, so it names a directory; name an "
                         f"image file, e.g. {out / 'samples.png'}")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"-o must name a .png or .jpg file, got {output!r}")
    try:
        if out.is_dir():
            raise UsageError(f"-o/--output {output} is a directory; name an image file, e.g. {out / 'samples.png'}")
    except OSError as e:  # a name too long for the file system
        raise UsageError(f"-o/--output {output}: {e.strerror or e}") from None
    _check_writable("-o/--output", output, out.parent)
    _, _, model = _load_run(run)
    shape = model.config.input_shape
    try:
        image_shape = _image_shape(shape)
    except ValueError:
        raise UsageError(f"vaekit sample draws an image grid, and {run} models data of shape {tuple(shape)}, "
                         f"not images; draw them in Python with VAE.sample") from None
    if not _fits(image_shape, 1, n, nrow):  # said before minutes of drawing, not after
        h, w = _grid_size(n, *image_shape[-2:], nrow, 2)
        most = max((k for k in range(1, n) if _fits(image_shape, 1, k, nrow)), default=0)
        raise UsageError(f"-n/--nrow: {n} images {min(n, nrow)} a row make a grid of {h}x{w} pixels, more than the "
                         f"{MAX_GRID_PIXELS} that Pillow opens; "
                         + (f"with --nrow {nrow} at most -n {most} fit" if most else "not even one image fits"))
    # enlarged as the run's samples.png, or as much as a grid of n images still allows
    side = max(_grid_size(n, *image_shape[-2:], nrow, 2))
    jpeg = out.suffix.lower() in (".jpg", ".jpeg")
    scale = next((s for s in range(max(1, 112 // image_shape[-1]), 0, -1)
                  if _fits(image_shape, s, n, nrow) and not (jpeg and side * s > JPEG_MAX_SIDE)), 1)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    images = model.sample(n, generator=g)
    try:
        return save_image_grid(images, out, nrow=nrow, scale=scale, image_shape=image_shape)
    except OSError as e:
        raise UsageError(f"-o/--output {output}: cannot be written ({e.strerror or e})") from None
    except ValueError as e:  # a JPEG too large for the format
        raise UsageError(f"-o/--output {output}: {str(e).removeprefix(f'path {out}: ').replace('(nrow)', '(--nrow)')}"
                         ) from None
