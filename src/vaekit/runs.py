"""The run directory that :func:`vaekit.train.fit` writes and reads back.

What a run leaves (``fit`` writes it, rank 0 only under ``torchrun``):

* ``checkpoint.pt``: everything needed to go on exactly where the run stopped
  (:data:`CHECKPOINT_KEYS`): the resolved config, weights, optimiser state, step and
  epoch, history, best validation loss, the partial epoch sums, the position in the data
  order and each process's random-number states; and what the training data were
  (:func:`data_record`, checked on resume; older checkpoints lack it);
* ``metrics.csv``: one ``train`` and one ``val`` row per epoch (:data:`METRIC_FIELDS`);
* ``config.json``, ``model/`` (the best model) and the pictures.

This module holds the format of those files and the reading side of a resume; the loop
that writes them is in :mod:`vaekit.train`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io as _io
import math
import numbers
import os
import warnings
from pathlib import Path

import torch

from .config import MAX_COUNT, RunConfig, TrainConfig
from .io import CheckpointError, _state_dict_mismatch, atomic_write, load_checkpoint

__all__ = ["CHECKPOINT_KEYS", "METRIC_FIELDS", "write_metrics", "rng_state", "set_rng_state",
           "read_for_resume", "extended", "restore", "data_record", "same_data", "saved_config"]

CHECKPOINT_KEYS = ("config", "model", "optimizer", "step", "epoch", "history", "best", "since_best",
                   "skipped", "sums", "batches", "rng")
METRIC_FIELDS = ["epoch", "step", "split", "loss", "reconstruction", "kl", "elbo", "beta", "lr", "skipped", "seconds"]


def write_metrics(path: Path, rows: list) -> None:
    """``rows`` (dicts) as ``metrics.csv``, replaced atomically."""
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    data = buf.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))


def rng_state(device: torch.device) -> dict:
    """The global random-number states a checkpoint keeps (the CPU's, and the device's on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _sha256(x: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of ``x``'s values as float32."""
    x = x.detach().float().cpu().contiguous()
    return hashlib.sha256(memoryview(x.numpy()).cast("B") if x.numel() else b"").hexdigest()[:16]


def data_record(x: torch.Tensor, val: torch.Tensor | None = None, test: torch.Tensor | None = None) -> dict:
    """What a checkpoint records of the training data ``x`` (``[N, *event]``), for a
    resume to check it trains on the same: the number of examples, the shape of one, a
    fingerprint (a hash of the first, middle and last examples, which earlier versions
    recorded alone) and ``hash``, a SHA-256 of every example's float32 values (about 0.13 s
    for MNIST's 60,000 images on the project's CPU), which tells any edit. With ``val``,
    the validation examples (which pick the saved model and stop a run early) get
    ``val_examples`` and ``val_hash`` of their own; with ``test``, the test examples
    ``test_examples`` and ``test_hash`` (what ``vaekit evaluate --data-dir`` checks the split
    it scores against; a resume does not compare them: they do not change the training)."""
    n = int(x.shape[0])
    record = {"examples": n, "shape": list(x.shape[1:]), "fingerprint": _sha256(x[[0, n // 2, n - 1]]),
              "hash": _sha256(x)}
    if val is not None:
        record.update(val_examples=int(val.shape[0]), val_hash=_sha256(val))
    if test is not None:
        record.update(test_examples=int(test.shape[0]), test_hash=_sha256(test))
    return record


def same_data(saved: dict, now: dict) -> bool:
    """Whether the record ``now`` (:func:`data_record`) matches ``saved``, a checkpoint's,
    in every entry both have: an older record has no ``hash`` (its three examples'
    fingerprint is all it can tell) nor ``val_hash``, and a record made without the
    validation examples does not compare them. The test examples' entries are not compared."""
    return all(now[k] == v for k, v in saved.items() if k in now and not k.startswith("test_"))


def _check_same_data(saved: dict, now: dict, state: dict, ckpt_path: Path, where: str | None) -> None:
    if same_data(saved, now):
        return
    d = state["config"].get("data", {}) if isinstance(state.get("config"), dict) else {}
    where = where or d.get("data_dir")  # where the data now checked came from
    what = f"dataset {d.get('dataset')!r}" + (f" ({where})" if where else "")
    split = "training"
    if all(now[k] == saved[k] for k in ("examples", "shape", "fingerprint", "hash") if k in saved):
        split = "validation"
        change = (f"the same training examples, but {now.get('val_examples')} validation examples (val_hash "
                  f"{now.get('val_hash')}), where the run validated on {saved.get('val_examples')} (val_hash "
                  f"{saved.get('val_hash')}): they pick the saved model and stop a run early")
    elif (saved.get("examples"), saved.get("shape")) == (now["examples"], now["shape"]):
        key = "hash" if "hash" in saved else "fingerprint"
        change = f"the same number and shape of training examples, but other values ({key} {now[key]}, " \
                 f"was {saved.get(key)})"
    else:
        change = f"{now['examples']} training examples of shape {tuple(now['shape'])}, where the run trained on " \
                 f"{saved.get('examples')} of shape {tuple(saved.get('shape') or ())}"
    raise CheckpointError(f"{ckpt_path.parent} cannot be resumed on other {split} data: {what} now gives "
                          f"{change}; put back the data it started with (or give --data-dir where they are), "
                          f"or train a new run")


def saved_config(d: dict) -> RunConfig:
    """The :class:`RunConfig` a run saved (``config.json``, or a checkpoint's
    ``config``). Settings earlier versions recorded though they had no effect are reset,
    so such runs still evaluate and resume: a ``data.data_dir`` for "digits" or
    "sprites", which read none, and the fields of each section its settings left inert
    (:func:`vaekit.objectives.without_inert` and its kin for the model and data)."""
    from .data import data_without_inert
    from .model_config import model_without_inert
    from .objectives import without_inert

    if isinstance(d, dict):
        for section, reset in (("data", data_without_inert), ("model", model_without_inert),
                               ("objective", without_inert)):
            if isinstance(d.get(section), dict):
                d = {**d, section: reset(d[section])}
    return RunConfig.from_dict(d)


def _shown(value) -> str:
    """``value`` as an error message names what it got: a tensor by its kind, a container
    by its type and size, anything else by its (shortened) repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, dict):
        keys = ", ".join(map(str, value))
        return f"a dict with keys {keys if len(keys) <= 60 else keys[:57] + '...'}" if value else "an empty dict"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}" if value \
            else f"an empty {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(state: dict, ckpt_path: Path) -> None:
    """Every field of checkpoint ``state`` that a resume reads (but ``config``, which
    :func:`saved_config` checks, and what only the model and optimiser themselves can
    tell), of the type and in the range :func:`vaekit.train._checkpoint` writes; else a
    :class:`CheckpointError` naming the file, the field, what it must be and what it is.
    Run before anything is written, so a checkpoint another version wrote (or an edit)
    is refused with the run left as it was. ``world_size``, ``data`` and ``seconds``
    may be missing (older checkpoints), ``data`` also None."""

    def bad(field: str, expected: str, value) -> CheckpointError:
        return _bad_field(ckpt_path, field, expected, value)

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def byte_tensor(field: str, v) -> None:
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1 and v.device.type == "cpu"):
            raise bad(field, "a 1-D torch.uint8 tensor on the CPU (a random-number state)", v)

    for key in ("step", "epoch", "since_best", "skipped"):
        if not (is_int(state[key]) and state[key] >= 0):
            raise bad(key, "an int >= 0", state[key])
    if "world_size" in state and not (is_int(state["world_size"]) and state["world_size"] >= 1):
        raise bad("world_size", "an int >= 1", state["world_size"])
    best = state["best"]
    if not (is_number(best) and not math.isnan(best)):  # inf until the first validation
        raise bad("best", "a number (the best validation loss; inf before the first)", best)
    if "seconds" in state and not (is_number(state["seconds"]) and math.isfinite(state["seconds"])
                                   and state["seconds"] >= 0):
        raise bad("seconds", "a finite number >= 0", state["seconds"])
    history = state["history"]
    if not isinstance(history, list):
        raise bad("history", "a list of metric rows (dicts)", history)
    for i, row in enumerate(history):
        if not (isinstance(row, dict) and all(k in row for k in METRIC_FIELDS)):
            raise bad(f"history[{i}]", f"a metric row (a dict with keys {', '.join(METRIC_FIELDS)})", row)
        for key in METRIC_FIELDS:
            value = row[key]
            if key == "split":
                ok = value in ("train", "val")
            elif key in ("epoch", "step", "skipped"):
                ok = is_int(value) and value >= (1 if key == "epoch" else 0)
            else:  # a diverged epoch's means are NaN
                ok = is_number(value)
            if not ok:
                expected = {"split": "'train' or 'val'", "epoch": "an int >= 1", "step": "an int >= 0",
                            "skipped": "an int >= 0"}.get(key, "a number")
                raise bad(f"history[{i}][{key!r}]", expected, value)
    sums = state["sums"]
    if not (isinstance(sums, torch.Tensor) and sums.is_floating_point() and tuple(sums.shape) == (4,)):
        raise bad("sums", "a 1-D floating-point tensor of 4 elements (the partial epoch's sums)", sums)
    batches = state["batches"]
    if not (isinstance(batches, dict) and set(batches) == {"epoch", "position", "seed"}):
        raise bad("batches", "a dict with keys epoch, position, seed (the position in the data order)", batches)
    for key in ("epoch", "position", "seed"):
        if not (is_int(batches[key]) and batches[key] >= 0):
            raise bad(f"batches[{key!r}]", "an int >= 0", batches[key])
    rngs = state["rng"]
    if not (isinstance(rngs, list) and rngs):
        raise bad("rng", "a non-empty list of random-number states (dicts), one a process", rngs)
    for i, rng in enumerate(rngs):
        if not (isinstance(rng, dict) and "cpu" in rng):
            raise bad(f"rng[{i}]", "a dict of random-number states with a 'cpu' key", rng)
        for device in ("cpu", "cuda"):
            if device in rng:
                byte_tensor(f"rng[{i}][{device!r}]", rng[device])
        try:  # a generator of its own: the global one is set by restore alone
            torch.Generator().set_state(rng["cpu"])
        except RuntimeError as e:
            raise bad(f"rng[{i}]['cpu']", f"a CPU random-number state ({str(e).strip().splitlines()[0]})",
                      rng["cpu"]) from None
    data = state.get("data")
    if data is not None:
        if not (isinstance(data, dict) and is_int(data.get("examples")) and isinstance(data.get("shape"), list)
                and all(is_int(n) for n in data["shape"]) and isinstance(data.get("fingerprint"), str)):
            raise bad("data", "a record of the training data (a dict: examples, an int; shape, a list of ints; "
                      "fingerprint, a str)", data)
    for key, keys in (("model", ()), ("optimizer", ("state", "param_groups"))):
        if not (isinstance(state[key], dict) and all(k in state[key] for k in keys)):
            raise bad(key, "a state dict" + (f" with keys {', '.join(keys)}" if keys else ""), state[key])
    groups, ids = state["optimizer"]["param_groups"], []
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise bad("optimizer['param_groups']", "a list of parameter groups (dicts)", groups)
    for i, group in enumerate(groups):
        params = group.get("params")
        if not (isinstance(params, list) and all(is_int(n) for n in params)):
            raise bad(f"optimizer['param_groups'][{i}]['params']", "a list of parameter numbers (ints)", params)
        ids += params
    if len(set(ids)) != len(ids):
        raise bad("optimizer['param_groups']", "groups that number each parameter once", ids)
    moments = state["optimizer"]["state"]
    if not isinstance(moments, dict):
        raise bad("optimizer['state']", "a dict of each parameter's Adam state", moments)
    for n, entry in moments.items():
        if n not in ids:
            raise bad("optimizer['state']", "keyed by the parameter numbers its param_groups list", n)
        if not isinstance(entry, dict):
            raise bad(f"optimizer['state'][{n}]", "a parameter's Adam state (a dict)", entry)


def read_for_resume(run_dir: Path, *, progress: bool, extend_to: int | None,
                    data_dir: str | None = None) -> tuple[RunConfig, dict | None]:
    """The configuration and checkpoint of the run in ``run_dir``, checked: the saved
    config with ``train.progress`` from the caller, ``train.epochs`` raised to
    ``extend_to`` when given (:func:`extended`), and ``data.data_dir`` moved to
    ``data_dir`` when given (the run's data are elsewhere now; that they are the same data
    is checked once they are loaded). Nothing is written here.

    A run that stopped before its first checkpoint (killed, or a write that failed, in
    its first epoch: ``config.json`` and maybe ``model/`` and a ``metrics.csv`` of that
    epoch, but no ``checkpoint.pt``) gives the config of its ``config.json`` and no
    checkpoint (None): it trains again from the start, which is the run it was (training
    is a function of its seeds), writing over nothing but its own first epoch's files."""
    ckpt_path = run_dir / "checkpoint.pt"
    if not os.path.lexists(ckpt_path) and (run_dir / "config.json").exists():
        state, config = None, _config_before_first_checkpoint(run_dir)
    else:
        state = load_checkpoint(ckpt_path)
        missing = sorted(set(CHECKPOINT_KEYS) - set(state))
        if missing:
            raise CheckpointError(f"{ckpt_path} lacks {', '.join(missing)}: it was not written by vaekit train")
        _check_fields(state, ckpt_path)
        try:
            config = saved_config(state["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path} holds an invalid config: {e}") from None
    config.train = dataclasses.replace(config.train, progress=progress)
    if data_dir is not None:
        from .data import FILE_DATASETS

        if config.data.dataset not in FILE_DATASETS:
            raise ValueError(f"data_dir: {run_dir} trains on {config.data.dataset!r}, which is made in memory, "
                             f"not read from files; got data_dir={data_dir!r}")
        try:
            where = Path(data_dir).expanduser().resolve()
        except (OSError, RuntimeError) as e:  # a loop of links (RuntimeError before Python 3.13)
            raise ValueError(f"data_dir {data_dir!r}: cannot be resolved ({e})") from None
        config.data = dataclasses.replace(config.data, data_dir=str(where))
    if extend_to is not None:
        config.train = extended(config.train, state or {"epoch": 0, "step": 0, "since_best": 0}, extend_to, run_dir)
    return config, state


def _config_before_first_checkpoint(run_dir: Path) -> RunConfig:
    """The config (``config.json``) of the run in ``run_dir``, which has no checkpoint, to
    train again from the start (:func:`read_for_resume`): refused where its
    ``metrics.csv`` holds more than its first epoch (a run whose checkpoint was deleted:
    training it again would write over its later epochs)."""
    from .io import read_json

    ckpt_path, cfg_path, metrics = run_dir / "checkpoint.pt", run_dir / "config.json", run_dir / "metrics.csv"
    epochs = 0
    if metrics.exists():
        try:
            with open(metrics, newline="", encoding="utf-8") as f:
                epochs = max((int(row["epoch"]) for row in csv.DictReader(f)), default=0)
        except (OSError, ValueError, TypeError, KeyError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"no checkpoint at {ckpt_path}, and {metrics} cannot be read ({e}), which would "
                                  f"tell whether the run stopped in its first epoch; nothing to resume") from None
    if epochs > 1:
        raise CheckpointError(f"no checkpoint at {ckpt_path}, but {metrics} records {epochs} epochs: the run went "
                              f"past its first epoch, and training it again from the start would write over them; "
                              f"put its checkpoint.pt back, or train a new run")
    try:
        config = saved_config(read_json(cfg_path)).check()
    except (TypeError, ValueError, OSError) as e:
        raise CheckpointError(f"no checkpoint at {ckpt_path}, and {cfg_path} cannot start the run again: {e}") from None
    return config


def extended(tc: TrainConfig, state: dict, epochs, run_dir: Path) -> TrainConfig:
    """``tc`` with ``epochs`` in all, for the run resumed from checkpoint ``state``;
    refused, before anything is written, where the run would not train further."""
    what, done = "epochs (--epochs)", state["epoch"]
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        raise TypeError(f"{what} must be an integer, got {epochs!r}")
    if epochs <= done:
        raise ValueError(f"{what} must be greater than the {done} epoch{'s' * (done != 1)} {run_dir} has done, "
                         f"got {epochs}")
    if epochs > MAX_COUNT:
        raise ValueError(f"{what} must be an integer in [{done + 1}, {MAX_COUNT}], got {epochs}")
    if tc.early_stopping and state["since_best"] >= tc.early_stopping:
        raise ValueError(f"{what} cannot extend {run_dir}: it stopped early after epoch {done}, "
                         f"{state['since_best']} epoch{'s' * (state['since_best'] != 1)} without a better validation ELBO "
                         f"(train.early_stopping {tc.early_stopping}), got {epochs}")
    if tc.max_steps and state["step"] >= tc.max_steps:
        raise ValueError(f"{what} cannot extend {run_dir}: train.max_steps {tc.max_steps} ends it "
                         f"and its {state['step']} steps are done, got {epochs}")
    return dataclasses.replace(tc, epochs=epochs)


# Adam's settings that change its arithmetic: the run's config made them, and a checkpoint
# that says otherwise was not written by this run. The ones that say how this process runs
# the update (a fused kernel, a captured step's tensors) are its own, not the checkpoint's.
_ADAM_MATH = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
_ADAM_RUNNER = ("foreach", "capturable", "differentiable", "fused")


def _load_optimizer(optimizer, saved: dict, ckpt_path: Path) -> None:
    """``optimizer.load_state_dict(saved)``, each group's learning rate kept of the kind it
    had: a tensor stays the same tensor (a captured step reads it on its device; the
    loaded one is a new tensor on the CPU), now holding the saved value; a number stays a
    number. A group setting of Adam's arithmetic other than the run's config gives (a
    ``maximize=True`` would climb the loss) is refused; the settings of how it runs stay
    this optimiser's (a saved ``capturable`` or ``fused`` names another process's choice)."""
    before = [dict(g) for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for i, (group, own) in enumerate(zip(optimizer.param_groups, before)):
        for key in _ADAM_MATH:
            mine, theirs = own.get(key), group.get(key)
            if isinstance(mine, (tuple, list)) and isinstance(theirs, (tuple, list)):
                mine, theirs = tuple(mine), tuple(theirs)
            if theirs != mine:
                raise _bad_field(ckpt_path, f"optimizer['param_groups'][{i}][{key!r}]",
                                 f"{mine!r}, as the run's config gives", theirs)
        for key in _ADAM_RUNNER:
            if key in own:
                group[key] = own[key]
        saved_lr = group["lr"]
        if isinstance(saved_lr, torch.Tensor) and saved_lr.numel() == 1:
            saved_lr = saved_lr.item()
        if isinstance(saved_lr, bool) or not isinstance(saved_lr, numbers.Real) or not 0 <= saved_lr < math.inf:
            raise _bad_field(ckpt_path, f"optimizer['param_groups'][{i}]['lr']", "a finite number >= 0", group["lr"])
        lr = own["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(saved_lr))
            group["lr"] = lr
        else:
            group["lr"] = float(saved_lr)


def _bad_field(ckpt_path: Path, field: str, expected: str, value) -> CheckpointError:
    return CheckpointError(f"{ckpt_path} cannot be resumed: {field} must be {expected}, got {_shown(value)}")


def _check_model_dtypes(state: dict, ckpt_path: Path, model) -> None:
    """Each model tensor of checkpoint ``state`` of the model's dtype: ``load_state_dict``
    would cast a float64 or an int32 one without a word (vaekit writes the model's own).
    Keys and shapes are ``load_state_dict``'s to tell."""
    own = model.state_dict()
    for key, value in state["model"].items():
        if key in own and isinstance(value, torch.Tensor) and value.dtype != own[key].dtype:
            raise _bad_field(ckpt_path, f"model[{key!r}]", f"a {own[key].dtype} tensor, as the model's", value)


def _check_adam_state(state: dict, ckpt_path: Path, model, optimizer) -> None:
    """Each parameter's Adam state in checkpoint ``state`` of its parameter's shape and
    dtype, with a step count: the fused CPU Adam takes the moments' size from the
    parameter, and wrote past the end of a smaller one. A parameter without state is
    refused once the optimiser has stepped (more steps than were skipped): every parameter
    of a vaekit model gets a gradient in every step, so its moments would start again from
    zero. Parameter groups of other sizes are ``load_state_dict``'s to tell."""
    saved = state["optimizer"]
    live = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [n for g in saved["param_groups"] for n in g["params"]]
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        return  # load_state_dict says how the groups differ
    names = {id(p): name for name, p in model.named_parameters()}
    stepped = state["step"] > state["skipped"]
    for n, p in zip(ids, live):
        field, like = f"optimizer['state'][{n}]", f"parameter {names.get(id(p), n)}'s"
        entry = saved["state"].get(n)
        if entry is None:
            if stepped:
                raise CheckpointError(f"{ckpt_path} cannot be resumed: optimizer['state'] has no Adam state for "
                                      f"parameter {n} ({names.get(id(p), '?')}), though the run has taken "
                                      f"{state['step'] - state['skipped']} optimiser steps")
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            value = entry.get(key)
            if key == "max_exp_avg_sq" and value is None:  # amsgrad's alone
                continue
            if not (isinstance(value, torch.Tensor) and value.dtype == p.dtype and value.shape == p.shape):
                raise _bad_field(ckpt_path, f"{field}[{key!r}]",
                                 f"a {p.dtype} tensor of shape {tuple(p.shape)} ({like})", value)
        step = entry.get("step")
        if not (isinstance(step, torch.Tensor) and step.dim() == 0 and step.is_floating_point()
                and math.isfinite(step) and step >= 0):
            raise _bad_field(ckpt_path, f"{field}['step']",
                             "a 0-dim floating-point tensor >= 0 (the parameter's Adam step count)", step)


def restore(state: dict, ckpt_path: Path, *, model, optimizer, batches, device: torch.device,
            rank: int, world: int, data_dir: str | None = None, record: dict | None = None) -> dict:
    """Load checkpoint ``state`` into the model, optimiser, batch iterator and this
    process's random-number states; returns the loop's counters (``step``, ``epoch``,
    ``history``, ``best``, ``since_best``, ``skipped``, and ``sums`` on ``device``: the
    partial epoch's, kept by rank 0). ``data_dir``: where the data in ``batches`` were
    read (named if they are not the run's); ``record``: their :func:`data_record`, when
    the caller has it (a hash of the whole set is not taken twice)."""
    if state.get("data") is not None:  # older checkpoints did not record their data
        _check_same_data(state["data"], record or data_record(batches.x), state, ckpt_path, data_dir)
    _check_model_dtypes(state, ckpt_path, model)
    try:
        with warnings.catch_warnings():  # an old optimal-variance model: resuming is what its warning asks for
            warnings.filterwarnings("ignore", message=".*saved before vaekit kept an evaluation variance")
            model.load_state_dict(state["model"])
        _check_adam_state(state, ckpt_path, model, optimizer)  # after the model's keys and shapes are known good
        _load_optimizer(optimizer, state["optimizer"], ckpt_path)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = _state_dict_mismatch(model.state_dict(), state["model"]) if isinstance(state["model"], dict) else ""
        raise CheckpointError(f"{ckpt_path} does not match its own config: "
                              f"{why or str(e).strip().splitlines()[0]}") from None
    if state.get("world_size", 1) != world:  # before the data position, which it would make look wrong
        raise CheckpointError(
            f"{ckpt_path} was written by a run on {state.get('world_size', 1)} process(es); resume it "
            f"with the same number, not {world} (the data position counts combined batches)"
        )
    try:
        batches.load_state_dict(state["batches"])
    except (TypeError, ValueError) as e:  # read_for_resume checked its form; this checks it against these data
        why = str(e).strip().splitlines()[0]
        why = "batches" + why[len("state"):] if why.startswith("state") else f"batches: {why}"
        raise CheckpointError(f"{ckpt_path} cannot be resumed: {why}") from None
    rngs = state["rng"]
    if len(rngs) == world:
        try:
            set_rng_state(rngs[rank], device)
        except (RuntimeError, TypeError) as e:  # a device's state (read_for_resume checked the CPU's)
            raise CheckpointError(f"{ckpt_path} cannot be resumed: rng[{rank}] is not a random-number state this "
                                  f"process can take ({str(e).strip().splitlines()[0]})") from None
    sums = state["sums"].to(device) if rank == 0 else torch.zeros_like(state["sums"], device=device)
    # An optimal-variance model saved before vaekit kept decoder_mse: its best validation
    # loss was scored under each example's own variance, which the shared variance cannot
    # reach; kept, no later epoch would ever be saved as the better model.
    rescored = any(k.endswith("decoder_mse") for k in model.state_dict()) and not any(
        k.endswith("decoder_mse") for k in state["model"])
    return {"step": state["step"], "epoch": state["epoch"], "history": list(state["history"]),
            "best": math.inf if rescored else state["best"], "since_best": 0 if rescored else state["since_best"],
            "skipped": state["skipped"], "sums": sums}
