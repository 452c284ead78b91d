"""vaekit.train pieces not covered through the command line: the device choice, the
TensorBoard hook, extending a run (``resume=True, epochs=N``) and the time budget; and fit
against a plain PyTorch loop written out by hand (weights, metrics, skipped steps, the
best model)."""

import csv
import dataclasses
import errno
import hashlib
import math
import os
import shutil
import tempfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vaekit.io
import vaekit.train as train
import vaekit.wiring
from test_cli import snapshot, steps_per_epoch, tiny_config
from test_reliability import _hooked_vae
from vaekit.batching import mix_seed
from vaekit.cli import build_config
from vaekit.data import load_dataset
from vaekit.io import load_checkpoint, load_model, read_json, save_checkpoint
from vaekit.models import VAE
from vaekit.objectives import ObjectiveConfig
from vaekit.runs import read_for_resume
from vaekit.steps import _NOISE_STREAM


def test_resolve_device():
    assert train.resolve_device("cpu") == torch.device("cpu")
    assert train.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device is 'cuda'"):
            train.resolve_device("cuda", what="--device")
    with pytest.raises(ValueError, match="TrainConfig.device must be"):
        train.resolve_device("tpu:x")


class _Recorder:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_hook_gets_every_epoch_curve(tmp_path, monkeypatch):
    """With the optional tensorboard package the loop writes train/val loss,
    reconstruction and KL per epoch; here a recorder stands in for SummaryWriter."""
    rec = _Recorder()
    monkeypatch.setattr(train, "_tensorboard", lambda run_dir: rec)
    cfg = build_config(overrides={"train.epochs": 2, "train.progress": False, "model.hidden": (16,),
                                  "model.latent_dim": 2})
    result = train.fit(cfg, tmp_path / "run")
    assert rec.closed
    tags = {t for t, _, _ in rec.scalars}
    assert tags == {f"{s}/{k}" for s in ("train", "val") for k in ("loss", "reconstruction", "kl")}
    val = [r for r in result.history if r["split"] == "val"]
    logged = sorted((step, v) for t, v, step in rec.scalars if t == "val/loss")
    assert logged == [(i + 1, r["loss"]) for i, r in enumerate(val)]


def test_fit_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = build_config(overrides={"train.epochs": 1, "train.progress": False, "model.hidden": (8,),
                                      "model.latent_dim": 2, "train.num_threads": 1})
        train.fit(cfg, tmp_path / "run")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(tmp_path):
    from vaekit.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a run killed while loading data leaves
    (run / ".checkpoint.pt.abc.tmp").write_bytes(b"partial")
    (run / ".metrics-test.json.xyz.tmp").write_bytes(b"{")  # an evaluation writing meanwhile: not the run's
    args = ["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress", "--run-dir", str(run)]
    assert main(args) == 0
    assert (run / "checkpoint.pt").is_file() and [p.name for p in run.glob(".*.tmp")] == [".metrics-test.json.xyz.tmp"]
    assert main(args) == 2  # a started run is never overwritten


# -- extending a run: fit(..., resume=True, epochs=N) ---------------------------------


def _small(**overrides):
    """A tiny run with a constant learning rate, so that an extended run can equal a run
    planned that long from the start (a cosine schedule would differ before the resume)."""
    return tiny_config(train__lr_schedule="constant", train__checkpoint_every=3, model__hidden=(8,), **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run of ``_small()``; tests extend copies of it."""
    rd = tmp_path_factory.mktemp("finished") / "run"
    train.fit(_small(train__epochs=1), rd)
    return rd


def _copy(finished, tmp_path, **changes):
    """A copy of ``finished`` whose checkpoint has ``train__field=value`` config changes
    and ``key=value`` state changes."""
    rd = tmp_path / "run"
    shutil.copytree(finished, rd)
    if changes:
        state = load_checkpoint(rd / "checkpoint.pt")
        for k, v in changes.items():
            if k.startswith("train__"):
                state["config"]["train"][k.removeprefix("train__")] = v
            else:
                state[k] = v
        save_checkpoint(rd / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "format_version")})
    return rd


class _Crash(Exception):
    """What a process killed right after a checkpoint write leaves, in-process."""


def _no_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_an_extended_run_equals_the_longer_run_even_through_a_crash_and_a_plain_resume(finished, tmp_path, monkeypatch):
    longer = train.fit(_small(train__epochs=2), tmp_path / "longer")
    rd = _copy(finished, tmp_path)
    saved, save = [], train.save_checkpoint

    def save_then_crash(path, state, **kw):
        save(path, state, **kw)
        saved.append(state["step"])
        if len(saved) == 2:
            raise _Crash

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        train.fit(_small(), rd, resume=True, epochs=2)
    spe = steps_per_epoch(_small())
    # The new count is saved before any step, so the crash after the first step checkpoint
    # leaves a run that a plain resume continues to 2 epochs.
    assert saved == [spe, (spe // 3 + 1) * 3]
    assert load_checkpoint(rd / "checkpoint.pt")["config"]["train"]["epochs"] == 2
    assert read_json(rd / "config.json")["train"]["epochs"] == 2
    monkeypatch.setattr(train, "save_checkpoint", save)
    result = train.fit(_small(), rd, resume=True)
    state, ref = load_checkpoint(rd / "checkpoint.pt"), load_checkpoint(tmp_path / "longer" / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["config"]["train"]["epochs"]) == (2, 2 * spe, 2)
    assert set(state["model"]) == set(ref["model"])
    assert all(torch.equal(state["model"][k], ref["model"][k]) for k in ref["model"])
    assert _no_seconds(result.history) == _no_seconds(longer.history)
    assert (state["best"], state["since_best"]) == (ref["best"], ref["since_best"])


@pytest.mark.parametrize("changes, epochs, error, pattern", [
    ({}, 1, ValueError, r"^epochs \(--epochs\) must be greater than the 1 epoch \S+ has done, got 1$"),
    ({}, 0, ValueError, r"greater than the 1 epoch \S+ has done, got 0$"),
    ({}, 2.0, TypeError, r"^epochs \(--epochs\) must be an integer, got 2\.0$"),
    ({}, True, TypeError, r"must be an integer, got True$"),
    ({"train__epochs": 3, "train__early_stopping": 1, "since_best": 1}, 3, ValueError,
     r"cannot extend \S+: it stopped early after epoch 1, 1 epoch without a better validation ELBO "
     r"\(train\.early_stopping 1\)"),
    ({"train__max_steps": 5}, 3, ValueError, r"cannot extend \S+: train\.max_steps 5 ends it and its \d+ steps are done"),
], ids=["as-many", "zero", "float", "bool", "stopped-early", "max-steps-reached"])
def test_an_extension_that_cannot_train_on_is_refused_and_changes_nothing(finished, tmp_path, changes, epochs,
                                                                          error, pattern):
    rd = _copy(finished, tmp_path, **changes)
    before = snapshot(rd)
    with pytest.raises(error, match=pattern):
        train.fit(_small(), rd, resume=True, epochs=epochs)
    assert snapshot(rd) == before


def test_epochs_without_resume_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"epochs extends a resumed run.*config\.train\.epochs.*epochs=2"):
        train.fit(_small(), tmp_path / "new", epochs=2)
    with pytest.raises(ValueError, match=r"data_dir moves a resumed run's data.*config\.data\.data_dir.*data_dir='x'"):
        train.fit(_small(), tmp_path / "new", data_dir="x")
    assert not (tmp_path / "new").exists()


def test_a_plain_resume_of_a_run_that_stopped_early_trains_no_more(finished, tmp_path):
    rd = _copy(finished, tmp_path, train__epochs=3, train__early_stopping=1, since_best=1)
    before = snapshot(rd)["checkpoint.pt"]
    result = train.fit(_small(), rd, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 1]
    assert snapshot(rd)["checkpoint.pt"] == before


def test_without_a_validation_split_the_last_model_is_kept(tmp_path):
    """data.val_size=0: no validation rows (not an ELBO of 0), the saved model is the last
    epoch's (every epoch "improves"), and early stopping, which needs validation, is refused
    before anything is written."""
    from vaekit.io import load_model

    result = train.fit(tiny_config(data__val_size=0, train__epochs=3), tmp_path / "run")
    assert [r["split"] for r in result.history] == ["train"] * 3
    saved = load_model(tmp_path / "run" / "model")
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for name, value in saved.state_dict().items():
        assert torch.equal(value, final[name]), name
    with pytest.raises(ValueError, match=r"early_stopping=2 needs validation examples, and data.val_size=0"):
        train.fit(tiny_config(data__val_size=0, train__early_stopping=2), tmp_path / "stops")
    assert not (tmp_path / "stops").exists()


def test_validation_rows_carry_the_beta_of_their_loss(tmp_path):
    """The validation loss is the negative ELBO whatever the training objective: its row
    says beta 1, so that loss = reconstruction + beta * kl holds on every row."""
    result = train.fit(tiny_config(objective__beta=4.0), tmp_path / "run")
    for r in result.history:
        assert r["beta"] == (4.0 if r["split"] == "train" else 1.0)
        if r["split"] == "val":
            assert r["loss"] == pytest.approx(r["reconstruction"] + r["beta"] * r["kl"])


def test_fit_does_not_train_a_new_run_into_a_directory_that_holds_one(tmp_path):
    """A second fit into a run's directory would mix its files with the first run's (an
    evaluation's metrics file of a model that no longer exists): refused, nothing touched.
    An empty directory, or one with a config.json alone (a run stopped before its first
    checkpoint), is taken."""
    config = tiny_config(train__epochs=1)
    train.fit(config, tmp_path / "run")
    (tmp_path / "run" / "metrics-test.json").write_text("{}")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match=r"already holds a run; choose another directory, or continue it with resume=True"):
        train.fit(config, tmp_path / "run")
    assert snapshot(tmp_path / "run") == before
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text("{}")
    assert train.fit(config, tmp_path / "fresh").history


def test_a_run_refused_under_the_lock_removes_the_folders_it_made_above_its_directory(tmp_path):
    """fit into a/b/run, refused after the run lock made the three (no validation examples
    for early stopping): they go again, and a folder that was there before stays."""
    (tmp_path / "kept").mkdir()
    for rd in (tmp_path / "a" / "b" / "run", tmp_path / "kept" / "b" / "run"):
        with pytest.raises(ValueError, match=r"early_stopping=2 needs validation examples"):
            train.fit(tiny_config(data__val_size=0, train__early_stopping=2), rd)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def _held(run_dir: Path) -> int:
    """A descriptor of ``run_dir`` holding its lock, as another process training there holds
    it (flock locks belong to an open of the directory, so this process's own fit is
    refused by it too)."""
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_run_directory_another_process_trains_in_is_refused(tmp_path):
    """While another process trains in a directory, a resume there and a new run there
    are refused before anything is written; once it has ended, both go on."""
    config = tiny_config(train__epochs=1)
    rd, empty = tmp_path / "run", tmp_path / "empty"
    train.fit(config, rd)
    empty.mkdir()
    before = snapshot(rd)
    fds = [_held(rd), _held(empty)]
    try:
        with pytest.raises(ValueError, match=rf"run_dir {rd} is in use: another vaekit process is training there"):
            train.fit(config, rd, resume=True, epochs=2)
        with pytest.raises(ValueError, match=rf"run_dir {empty} is in use"):
            train.fit(config, empty)
    finally:
        for fd in fds:
            os.close(fd)
    assert snapshot(rd) == before and list(empty.iterdir()) == []
    assert train.fit(config, rd, resume=True, epochs=2).trained
    assert train.fit(config, empty).trained
    with pytest.raises(ValueError, match="already holds a run"):  # the lock is free, the run is there
        train.fit(config, empty)


def test_a_run_that_appears_while_a_new_one_waits_for_the_lock_is_not_mixed_into(tmp_path, monkeypatch):
    """Two new runs started together both find the directory empty; the one that takes the
    lock second looks again under it and finds the other's files: refused, none touched.
    A directory made for a refused run is not left behind."""
    rd = tmp_path / "run"
    train.fit(tiny_config(train__epochs=1), rd)
    before, real, calls = snapshot(rd), train.holds_a_run, []

    def first_look_missed_it(run_dir):
        calls.append(run_dir)
        return False if len(calls) == 1 else real(run_dir)

    monkeypatch.setattr(train, "holds_a_run", first_look_missed_it)
    with pytest.raises(ValueError, match="already holds a run"):
        train.fit(tiny_config(train__epochs=1), rd)
    assert len(calls) == 2 and snapshot(rd) == before
    calls.clear()
    new = tmp_path / "deep" / "new"
    monkeypatch.setattr(train, "holds_a_run", lambda run_dir: bool(calls.append(run_dir)) or len(calls) == 2)
    with pytest.raises(ValueError, match="already holds a run"):
        train.fit(tiny_config(train__epochs=1), new)
    assert not new.exists()


def test_seconds_count_on_across_a_resume(finished, tmp_path):
    """metrics' `seconds` is the training loop's time since the run began: a resumed run
    goes on from the time its checkpoint kept (an older checkpoint: its last row's)."""
    rd = _copy(finished, tmp_path, seconds=1000.0)
    rows = train.fit(_small(), rd, resume=True, epochs=2).history
    assert [r["epoch"] for r in rows if r["split"] == "train"] == [1, 2]
    assert 1000.0 < rows[-1]["seconds"] < 1000.0 + 600
    assert load_checkpoint(rd / "checkpoint.pt")["seconds"] > rows[-1]["seconds"] - 1e-3

    old = tmp_path / "old"
    shutil.copytree(finished, old)
    state = load_checkpoint(old / "checkpoint.pt")
    del state["seconds"]
    state["history"] = [{**r, "seconds": 500.0} for r in state["history"]]
    save_checkpoint(old / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "format_version")})
    assert 500.0 < train.fit(_small(), old, resume=True, epochs=2).history[-1]["seconds"] < 500.0 + 600


def _recorded_fit(rd, monkeypatch, background: bool, delay: float = 0.0):
    """fit of ``_small(train__epochs=2)`` into ``rd``, with or without background writes:
    (step, model tensors, optimiser state, thread name) of each checkpoint as written,
    each write after ``delay`` seconds (training goes on meanwhile)."""
    import time

    seen, save = [], train.save_checkpoint

    def record(path, state, **kw):
        time.sleep(delay)
        seen.append((state["step"], {k: v.clone() for k, v in state["model"].items()},
                     {i: {k: v.clone() for k, v in s.items()} for i, s in state["optimizer"]["state"].items()},
                     threading.current_thread().name))
        return save(path, state, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(train, "save_checkpoint", record)
        mp.setattr(train, "BACKGROUND_WRITES", background)
        result = train.fit(_small(train__epochs=2), rd)
    return result, seen


def test_background_writes_save_what_the_loop_saves_while_training_goes_on(tmp_path, monkeypatch):
    # Each background write waits 0.1 s before it serialises: the steps after the
    # checkpoint have changed the weights by then, so only a copy taken at the checkpoint
    # gives the state the loop itself writes.
    ref, ref_seen = _recorded_fit(tmp_path / "loop", monkeypatch, background=False)
    got, got_seen = _recorded_fit(tmp_path / "background", monkeypatch, background=True, delay=0.1)
    main = threading.current_thread().name
    assert {name for *_, name in ref_seen} == {main}
    assert all(name.startswith("vaekit-writer") for *_, name in got_seen)
    assert [s for s, *_ in got_seen] == [s for s, *_ in ref_seen] and len(ref_seen) >= 3
    for (_, m1, o1, _), (_, m2, o2, _) in zip(ref_seen, got_seen):
        assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
        assert all(torch.equal(o1[i][k], o2[i][k]) for i in o1 for k in o1[i])
    assert _no_seconds(got.history) == _no_seconds(ref.history)
    for name in ("model/model.safetensors", "model/config.json"):
        assert (tmp_path / "background" / name).read_bytes() == (tmp_path / "loop" / name).read_bytes()
    strip = lambda text: [",".join(r.split(",")[:-1]) for r in text.splitlines()]  # noqa: E731
    header = (tmp_path / "loop" / "metrics.csv").read_text().splitlines()[0]
    assert header.endswith("seconds")  # the column strip() leaves out
    assert strip((tmp_path / "background" / "metrics.csv").read_text()) == strip(
        (tmp_path / "loop" / "metrics.csv").read_text())
    final = load_checkpoint(tmp_path / "background" / "checkpoint.pt")
    assert final["step"] == ref_seen[-1][0] and all(torch.equal(final["model"][k], ref_seen[-1][1][k])
                                                    for k in final["model"])


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_leaves_the_one_before(tmp_path, monkeypatch):
    error, written, save = OSError(28, "No space left on device"), [], train.save_checkpoint

    def disk_full_at_the_second(path, state, **kw):
        if written:
            raise error
        written.append(state["step"])
        return save(path, state, **kw)

    monkeypatch.setattr(train, "save_checkpoint", disk_full_at_the_second)
    with pytest.raises(OSError) as got:
        train.fit(_small(train__epochs=2), tmp_path / "run")
    assert got.value is error
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == written[0] == 3  # checkpoint_every=3: the first one, intact


def test_a_failed_write_stops_the_run_within_the_reads_of_the_counters(tmp_path, monkeypatch):
    """The epoch's checkpoint fails in the background: the run stops at the next check
    (every 50 steps), not at the end of the next epoch."""
    error, steps, failed_at = OSError(5, "Input/output error"), [], []
    step = train._eager_step

    def failing(path, state, **kw):
        failed_at.append(len(steps))
        raise error

    def counted(*args):
        steps.append(1)
        return step(*args)

    monkeypatch.setattr(train, "save_checkpoint", failing)
    monkeypatch.setattr(train, "_eager_step", counted)
    config = tiny_config(train__batch_size=8, train__epochs=3, model__hidden=(8,))
    spe = steps_per_epoch(config)
    assert spe > 100
    with pytest.raises(OSError) as got:
        train.fit(config, tmp_path / "run")
    assert got.value is error and len(failed_at) == 1 and failed_at[0] >= spe  # written while training went on
    assert len(steps) - spe <= 50 + 1  # the first read of the counters after the failure


def test_the_loops_own_error_is_the_one_raised_when_a_write_failed_too(tmp_path, monkeypatch):
    write_error, boom, step = OSError(28, "No space left on device"), RuntimeError("boom"), train._eager_step
    calls = []

    def failing(path, state, **kw):
        raise write_error

    def boom_after_the_first_epoch(run, *args):
        calls.append(1)
        if run.epoch == 1:
            raise boom
        return step(run, *args)

    monkeypatch.setattr(train, "save_checkpoint", failing)
    monkeypatch.setattr(train, "_eager_step", boom_after_the_first_epoch)
    with pytest.raises(RuntimeError) as got:
        train.fit(tiny_config(train__epochs=2, model__hidden=(8,)), tmp_path / "run")
    assert got.value is boom


# -- a full disk at the level of the system calls of vaekit.io's atomic writes ----------


class _File:
    """An atomic write's temporary file, whose write may find the disk full."""

    def __init__(self, f, disk, fd):
        self._f, self._disk, self._fd = f, disk, fd

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._disk.fds.pop(self._fd, None)  # the number goes to the next file (or the folder's sync)
        return self._f.__exit__(*exc)

    def write(self, data):
        name, tmp = self._disk.fds[self._fd]
        if self._disk.hit("write", name):
            self._f.write(bytes(data)[: len(bytes(data)) // 2])  # half of it made it to the disk
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.given[tmp] = self._disk.given.get(tmp, b"") + bytes(data)
        return self._f.write(data)


class _DiskFull:
    """vaekit.io's ``os`` and ``tempfile.mkstemp`` with each call of an atomic write into
    ``root`` logged as (call, file): "write" (the temporary file's bytes), "fsync" (its
    sync) and "replace" (its rename over the file). The ``fail_at``-th call raises ENOSPC
    as the system does: a write after half its bytes, a rename naming its two files.
    ``written``: the sha256 of the bytes each file was given in its last write that
    completed (renamed)."""

    def __init__(self, monkeypatch, root, fail_at=0):
        self.root, self.fail_at, self.log, self.written, self.fds, self.given = root, fail_at, [], {}, {}, {}
        proxy = types.ModuleType("os")
        proxy.__dict__.update(os.__dict__)
        proxy.replace, proxy.fsync, proxy.fdopen = self._replace, self._fsync, self._fdopen
        monkeypatch.setattr(vaekit.io, "os", proxy)
        monkeypatch.setattr(vaekit.io, "tempfile", types.SimpleNamespace(mkstemp=self._mkstemp))

    def hit(self, call, name) -> bool:
        self.log.append((call, name))
        return len(self.log) == self.fail_at

    def _name(self, path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def _mkstemp(self, *, prefix, dir, **kw):
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=dir, **kw)
        self.fds[fd] = self._name(Path(dir) / prefix[1:-1]), tmp  # prefix: ".<file name>."
        self.given[tmp] = b""
        return fd, tmp

    def _fdopen(self, fd, *args, **kw):
        return _File(os.fdopen(fd, *args, **kw), self, fd)

    def _fsync(self, fd):
        if fd in self.fds and self.hit("fsync", self.fds[fd][0]):  # (a folder's sync is not logged)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.fsync(fd)

    def _replace(self, src, dst):
        name = self._name(dst)
        if self.hit("replace", name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))
        os.replace(src, dst)
        self.written[name] = hashlib.sha256(self.given.pop(str(src), b"")).hexdigest()


def _quiet(monkeypatch):
    """No pictures (seconds of drawing; not what is looked at) and no TensorBoard files."""
    monkeypatch.setattr(train, "save_run_pictures", lambda *args, **kw: None)
    monkeypatch.setattr(train, "_tensorboard", lambda run_dir: None)


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return _no_seconds(csv.DictReader(f))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """checkpoint_every -> (directory, calls of its atomic writes) of tiny_config's run
    (2 epochs of 11 steps) left alone."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        _quiet(mp)
        for every in (4, 0):
            rd = tmp_path_factory.mktemp(f"every{every}") / "run"
            disk = _DiskFull(mp, rd)
            train.fit(tiny_config(train__checkpoint_every=every), rd)
            runs[every] = rd, disk.log
    return runs


@pytest.mark.parametrize("call, name, nth, every", [
    ("write", "model/model.safetensors", 1, 4),  # epoch 1's best model, half written; step 8's checkpoint
    ("fsync", "metrics.csv", 2, 4),  # epoch 2's rows; its best model written, step 20's checkpoint
    ("replace", "config.json", 1, 0),  # the run's first file: nothing there to resume
    ("replace", "model/config.json", 1, 0),  # epoch 1, before any checkpoint: model/ without its config
    ("write", "checkpoint.pt", 1, 0),  # epoch 1's model and metrics, but no checkpoint
    ("fsync", "checkpoint.pt", 2, 0),  # epoch 2's model and metrics over epoch 1's checkpoint
], ids=lambda v: str(v))
def test_a_full_disk_at_any_write_leaves_whole_files_and_a_resume_ends_as_the_run_left_alone(
        call, name, nth, every, uninterrupted, tmp_path, monkeypatch):
    """ENOSPC from the nth write, sync or rename of one of the run's files, found by
    counting the calls of the run left alone: the run stops with that error, having written
    nothing after it; each file is its last complete version (or absent), each one that is
    there reads back, and metrics.csv is the first rows of the run left alone. A resume (a
    new run where nothing was there) then ends with the weights, Adam state, best model,
    config.json and metrics.csv (but for seconds) of the run left alone, bit for bit."""
    ref_dir, ref_log = uninterrupted[every]
    k = [i for i, c in enumerate(ref_log, 1) if c == (call, name)][nth - 1]
    _quiet(monkeypatch)
    rd, config = tmp_path / "run", tiny_config(train__checkpoint_every=every)
    disk = _DiskFull(monkeypatch, rd, fail_at=k)
    with pytest.raises(OSError) as got:
        train.fit(config, rd)
    assert got.value.errno == errno.ENOSPC and disk.log == ref_log[:k]
    assert not [t for t in threading.enumerate() if t.name.startswith("vaekit-writer")]
    files = {p: h for p, h in snapshot(rd).items() if h != "<dir>"}
    assert files == disk.written  # no half-written file, no temporary file left
    if "checkpoint.pt" in files:
        load_checkpoint(rd / "checkpoint.pt")
    if {"model/model.safetensors", "model/config.json"} <= files.keys():
        VAE.from_pretrained(rd / "model")
        load_model(rd / "model")
    if "metrics.csv" in files:
        rows = _metrics(rd)
        assert rows and rows == _metrics(ref_dir)[: len(rows)]
    if "config.json" in files:
        read_for_resume(rd, progress=False, extend_to=None)
        result = train.fit(config, rd, resume=True)
    else:
        assert not files
        result = train.fit(config, rd)
    assert result.trained and not result.interrupted
    got_state, want = load_checkpoint(rd / "checkpoint.pt"), load_checkpoint(ref_dir / "checkpoint.pt")
    assert got_state["step"] == want["step"] == 22
    for model in (got_state["model"], result.model.state_dict()):
        assert model.keys() == want["model"].keys() and all(torch.equal(model[p], want["model"][p]) for p in model)
    adam, ref_adam = got_state["optimizer"]["state"], want["optimizer"]["state"]
    assert adam.keys() == ref_adam.keys()
    assert all(torch.equal(adam[i][m], ref_adam[i][m]) for i in adam for m in ("step", "exp_avg", "exp_avg_sq"))
    assert _metrics(rd) == _metrics(ref_dir)
    for f in ("config.json", "model/config.json", "model/model.safetensors"):
        assert (rd / f).read_bytes() == (ref_dir / f).read_bytes(), f


# a failed write or fsync of the temporary file: the system's error names no file; atomic_write adds it
@pytest.mark.parametrize("call", ["write", "fsync"])
def test_a_write_that_fails_names_its_file(call, uninterrupted, tmp_path, monkeypatch):
    _, ref_log = uninterrupted[4]
    _quiet(monkeypatch)
    _DiskFull(monkeypatch, tmp_path / "run", fail_at=ref_log.index((call, "checkpoint.pt")) + 1)
    with pytest.raises(OSError, match=r"checkpoint\.pt"):
        train.fit(tiny_config(train__checkpoint_every=4), tmp_path / "run")


def test_validation_means_each_example_once_over_its_batches():
    """The epoch's validation (one sync in all, its sums kept on the device): the KL is the
    analytic one of every example, each counted once whatever the batch size (23 examples
    in batches of 5: a short last one), computed again here in float64; the loss is the
    negative ELBO."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), hidden=(8,), latent_dim=3))
    x = torch.rand(23, 1, 4, 4).bernoulli()
    got = train._validate(model, x, 5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, logvar = (t.double() for t in model.encode_params(x))
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)).mean()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert got["loss"] == -got["elbo"] and got["elbo"] == pytest.approx(-(got["reconstruction"] + got["kl"]))
    assert train._validate(model, x, 23, torch.Generator().manual_seed(1))["kl"] == pytest.approx(got["kl"], rel=1e-6)
    assert model.training  # left as it was


def _lr_set_later(config):
    config.train.lr = -1.0
    return config


@pytest.mark.parametrize("make, kwargs, error, pattern", [
    # a field assigned after the config was made: PyTorch's "Invalid learning rate" deep inside, before
    (lambda c: _lr_set_later(c), {}, ValueError, r"TrainConfig\.lr must be a finite number > 0, got -1\.0"),
    (lambda c: None, {}, TypeError, r"config must be a vaekit RunConfig, got NoneType"),
    (lambda c: c, {"resume": "no"}, TypeError, r"resume must be a bool, got str"),  # was taken as True
])
def test_fit_names_a_config_or_resume_it_cannot_use_before_writing_anything(make, kwargs, error, pattern, tmp_path):
    config = make(tiny_config())
    with pytest.raises(error, match=pattern):
        train.fit(config, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_run_config_holds_config_sections_not_mappings():
    from vaekit.config import RunConfig

    with pytest.raises(TypeError, match=r"RunConfig\.model must be a ModelConfig \(RunConfig\.from_dict takes plain "
                                         r"mappings\), got dict"):
        RunConfig(model={"latent_dim": 2})
    assert RunConfig.from_dict({"model": {"latent_dim": 2}}).model.latent_dim == 2


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_fit_says_when_bf16_autocast_will_be_slow_on_this_cpu(tmp_path, monkeypatch, capsys, fast_bf16):
    import vaekit.checks

    monkeypatch.setattr(vaekit.checks, "_cpu_bf16_fast", lambda: fast_bf16)
    train.fit(_small(train__epochs=1, train__amp="bf16", train__device="cpu"), tmp_path / "run")
    said = "vaekit: train.amp='bf16': this CPU has no bfloat16 instructions that PyTorch uses" in capsys.readouterr().err
    assert said != fast_bf16


# -- fit against a plain PyTorch loop ----------------------------------------------------


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """An .npz of 60 training and 15 test 4x4 grey images."""
    path = tmp_path_factory.mktemp("grey") / "grey.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (60, 4, 4), dtype=np.uint8),
             x_test=rng.integers(0, 256, (15, 4, 4), dtype=np.uint8))
    return path


def _warmed(grey, **overrides):
    """48 training images (12 more for validation) in 5 steps an epoch, the last of 8, for
    4 epochs: a cosine learning rate, the gradient clipped to norm 1 and beta warmed up
    linearly to 2 over 7 steps; the eager step, on the CPU."""
    fields = {"data__dataset": "array", "data__data_dir": str(grey), "data__val_size": 12, "data__split": "tail",
              "data__binarize": "static", "model__hidden": (8,), "train__batch_size": 10, "train__epochs": 4,
              "train__lr": 3e-2, "train__lr_schedule": "cosine", "train__grad_clip": 1.0, "train__seed": 3,
              "train__device": "cpu", "train__fast": "off", "objective__beta": 2.0,
              "objective__beta_schedule": "linear", "objective__warmup_steps": 7}
    return tiny_config(**{**fields, **overrides})


def _by_hand(config, skip=()):
    """fit(config) written out in plain PyTorch from what vaekit documents: the weights
    drawn after torch.manual_seed(seed); epoch e's order randperm(N) by a generator seeded
    with mix_seed(seed, e), batch j its j-th slice; dynamic binarization 1[u < x] over the
    epoch's permuted images (one block), u from PCG64(mix_seed(seed, e, 0)); step s's noise
    row s of randn(32, b, d) by a generator seeded with mix_seed(seed, noise stream, 0) (one
    block of 32 steps), its first rows for a short batch; lr 0.5 lr (1 + cos(pi s / T));
    the warmed-up beta; mean(BCE + beta KL) by their own formulas; the norm clipped; Adam
    (with train.weight_decay, its L2 penalty).
    Steps in ``skip`` take no optimiser step and are left out of the epoch's means.
    Returns the model, the optimiser, the training rows and every step's beta."""
    tc, oc = config.train, config.objective
    x = load_dataset(config.data).train
    n, b, d = x.shape[0], tc.batch_size, config.model.latent_dim
    per_epoch = -(-n // b)
    total = tc.epochs * per_epoch
    assert total <= 32 and b * d * 32 <= 2**24 and b * x[0].numel() * per_epoch <= 2**24  # one block each
    torch.manual_seed(tc.seed)
    model = VAE(dataclasses.replace(config.model, input_shape=tuple(x.shape[1:])))
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    noise = torch.randn(32, b, d, generator=torch.Generator().manual_seed(mix_seed(tc.seed, _NOISE_STREAM, 0)))
    rows, betas, step, skipped = [], [], 0, 0
    for epoch in range(tc.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(tc.seed, epoch)))
        xe = x[perm]
        if config.data.binarize == "dynamic":
            u = np.random.Generator(np.random.PCG64(mix_seed(tc.seed, epoch, 0))).random(tuple(xe.shape), np.float32)
            xe = (torch.from_numpy(u) < xe).float()
        sums = np.zeros(4)
        for j in range(per_epoch):
            xb = xe[j * b:(j + 1) * b]
            lr = 0.5 * tc.lr * (1 + math.cos(math.pi * step / total)) if tc.lr_schedule == "cosine" else tc.lr
            beta = oc.beta * step / oc.warmup_steps if step < oc.warmup_steps else oc.beta
            betas.append(beta)
            for group in opt.param_groups:
                group["lr"] = lr
            mu, logvar = model.encode_params(xb)
            logits = model.decode(mu + torch.exp(0.5 * logvar) * noise[step, :len(xb)])
            rec = F.binary_cross_entropy_with_logits(logits, xb, reduction="none").flatten(1).sum(1)
            kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
            loss = (rec + beta * kl).mean()
            opt.zero_grad()
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if step in skip:
                skipped += 1
            else:
                opt.step()
                sums += len(xb) * np.array([loss.item(), rec.mean().item(), kl.mean().item(), 1.0])
            step += 1
        rows.append({"step": step, "loss": sums[0] / sums[3], "reconstruction": sums[1] / sums[3],
                     "kl": sums[2] / sums[3], "elbo": -(sums[1] + sums[2]) / sums[3], "beta": beta, "lr": lr,
                     "skipped": skipped})
    return model, opt, rows, betas


def _assert_close(got: dict, want: dict) -> None:
    """Tensors equal to float32 rounding (the hand loop's formulas and Adam are not fit's):
    within a millionth of each tensor's largest value."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6 * float(v.abs().max()), msg=lambda m: f"{k}: {m}")


def _metrics_rows(run_dir, split: str) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _assert_train_rows(run_dir, want: list[dict]) -> None:
    """metrics.csv's training rows are ``want``'s: the per-example means of the epoch's
    steps, the beta and learning rate of its last step, the steps skipped so far."""
    got = _metrics_rows(run_dir, "train")
    assert [(int(r["step"]), int(r["skipped"])) for r in got] == [(r["step"], r["skipped"]) for r in want]
    for g, w in zip(got, want):
        for k in ("loss", "reconstruction", "kl", "elbo"):
            assert float(g[k]) == pytest.approx(w[k], rel=1e-6), (g["epoch"], k)
        for k in ("beta", "lr"):
            assert float(g[k]) == pytest.approx(w[k], rel=1e-12, abs=0), (g["epoch"], k)


@pytest.mark.parametrize("fast, binarize", [("off", "static"), ("off", "dynamic"), ("static", "dynamic")])
def test_fit_is_the_plain_pytorch_loop_it_documents(fast, binarize, grey, tmp_path, monkeypatch):
    """fit against _by_hand, whose loss formulas are its own (so to float tolerance, not bit
    for bit): the weights after 20 steps, the beta the loop asks for at each step (0 at step
    0 of the warm-up) and metrics.csv's training rows. fast='static' is the static step,
    uncaptured on the CPU (each epoch's short last batch takes the eager step)."""
    model, _, rows, betas = _by_hand(_warmed(grey, data__binarize=binarize))
    asked, beta_at = [], ObjectiveConfig.beta_at

    def recorded(self, step):
        asked.append((step, beta_at(self, step)))
        return asked[-1][1]

    monkeypatch.setattr(ObjectiveConfig, "beta_at", recorded)
    result = train.fit(_warmed(grey, train__fast=fast, data__binarize=binarize), tmp_path / "run")
    _assert_close(result.model.state_dict(), model.state_dict())
    assert asked[0] == (0, 0.0) and [s for s, _ in asked] == list(range(20))
    assert [b for _, b in asked] == pytest.approx(betas, rel=1e-12, abs=0)
    _assert_train_rows(tmp_path / "run", rows)


@pytest.mark.parametrize("fast", ["off", "static"])
def test_a_non_finite_step_changes_nothing_and_is_left_out_of_the_means(fast, grey, tmp_path, monkeypatch):
    """Step 6 (epoch 2's second) made NaN: the run ends with the weights and the Adam state
    (moments and step count) of the hand loop that leaves that step out, counts it as
    skipped from epoch 2 on, and epoch 2's means are those of its other steps."""
    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(lambda n, out: out * float("nan") if n == 7 else out))
    train.fit(_warmed(grey, train__fast=fast), tmp_path / "run")
    model, opt, rows, _ = _by_hand(_warmed(grey), skip={6})
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    _assert_close(state["model"], model.state_dict())
    got, want = state["optimizer"]["state"], opt.state_dict()["state"]
    assert got.keys() == want.keys()
    for i in want:
        assert float(got[i]["step"]) == float(want[i]["step"]) == 19
        _assert_close({k: got[i][k] for k in ("exp_avg", "exp_avg_sq")},
                      {k: want[i][k] for k in ("exp_avg", "exp_avg_sq")})
    assert [r["skipped"] for r in rows] == [0, 1, 1, 1]
    _assert_train_rows(tmp_path / "run", rows)


@pytest.mark.parametrize("early_stopping, epochs", [(0, 6), (2, 10)], ids=["all-epochs", "early-stopping"])
def test_the_saved_model_is_the_epoch_of_lowest_validation_loss(early_stopping, epochs, grey, tmp_path,
                                                                  monkeypatch):
    """model/ holds, bit for bit, the weights the loop had at the end of the epoch of lowest
    validation loss in metrics.csv, not the last epoch's; with early stopping the run ends
    ``early_stopping`` epochs after that one. (A large constant learning rate makes the
    validation loss go up and down.)"""
    ends, save = {}, train.save_checkpoint

    def record(path, state, **kw):
        ends[state["epoch"]] = {k: v.clone() for k, v in state["model"].items()}
        return save(path, state, **kw)

    monkeypatch.setattr(train, "save_checkpoint", record)
    config = _warmed(grey, train__epochs=epochs, train__early_stopping=early_stopping, train__lr=0.2,
                     train__lr_schedule="constant", train__grad_clip=0.0, train__seed=0, objective__beta=1.0,
                     objective__beta_schedule="constant", objective__warmup_steps=0)
    train.fit(config, tmp_path / "run")
    val = [float(r["loss"]) for r in _metrics_rows(tmp_path / "run", "val")]
    best = val.index(min(val)) + 1
    assert best < len(val), f"the best epoch is the last: nothing to tell them apart ({val})"
    if early_stopping:  # stopped that many epochs after the best, before its last
        assert len(val) == best + early_stopping < epochs
    else:
        assert len(val) == epochs
    assert sorted(ends) == list(range(1, len(val) + 1))
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert saved.keys() == ends[best].keys() and all(torch.equal(saved[k], ends[best][k]) for k in saved)
    assert not all(torch.equal(saved[k], ends[len(val)][k]) for k in saved)


def test_a_finished_run_killed_before_its_pictures_gets_them_on_resume(finished, tmp_path, capsys):
    """A process killed after its last checkpoint, while drawing the pictures: resuming
    the finished run draws them (the curves come last, so their file says all are there);
    a finished run with its pictures keeps them as they are."""
    rd = _copy(finished, tmp_path)
    pictures = ("curves.png", "reconstructions.png", "samples.png", "traversals.png")
    kept = {name: (rd / name).read_bytes() for name in pictures}
    for name in ("curves.png", "traversals.png"):
        (rd / name).unlink()
    capsys.readouterr()
    result = train.fit(_small(train__epochs=1), rd, resume=True)
    assert not result.trained and "is finished (1 epoch); nothing to train" in capsys.readouterr().out
    assert {name: (rd / name).read_bytes() for name in pictures} == kept  # the same pictures, drawn again
    stamps = {name: (rd / name).stat().st_mtime_ns for name in pictures}
    train.fit(_small(train__epochs=1), rd, resume=True)
    assert {name: (rd / name).stat().st_mtime_ns for name in pictures} == stamps


def test_the_global_generators_seed_is_apart_from_the_data_streams(tmp_path):
    """fit seeds PyTorch's global generators for draws outside vaekit's keyed streams. NumPy's
    SeedSequence pads with zeros, so the key (seed, 17, 0) was epoch 17's data-order key
    (seed, 17): now the global seed carries a tag of its own."""
    from vaekit.wiring import _GLOBAL_STREAM

    config = tiny_config(train__max_steps=1, train__seed=5)
    train.fit(config, tmp_path / "run")
    seed = torch.initial_seed()
    assert seed == mix_seed(5, _GLOBAL_STREAM, 0)
    streams = {mix_seed(5, e) for e in range(1000)} | {mix_seed(5, e, b) for e in range(100) for b in range(100)}
    assert seed not in streams


def _nan_gradient_at_step_6(call, out):
    if call == 7:  # (the first decode is the warm-up's) step 6: a finite loss whose gradient is NaN
        out.register_hook(lambda g: g * float("nan"))
    return out


@pytest.mark.parametrize("fast", ["off", "static"])
def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(fast, grey, tmp_path, monkeypatch):
    """The skip rule reads the gradient's norm as well as the loss (a learned variance or
    bfloat16 can overflow the gradient alone): the step is skipped and counted, and the
    run is the hand-written loop's without it."""
    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(_nan_gradient_at_step_6))
    train.fit(_warmed(grey, train__fast=fast), tmp_path / "run")
    model, _, _, _ = _by_hand(_warmed(grey), skip={6})
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["skipped"] == 1
    _assert_close(state["model"], model.state_dict())


def test_an_equal_validation_loss_is_not_an_improvement(grey, tmp_path, monkeypatch):
    """"Better" is strictly lower: a tie keeps the earlier model and counts towards early
    stopping (with <=, a stalled run saved every epoch and never stopped)."""
    ends, save = {}, train.save_checkpoint

    def record(path, state, **kw):
        ends[state["epoch"]] = {k: v.clone() for k, v in state["model"].items()}
        return save(path, state, **kw)

    monkeypatch.setattr(train, "save_checkpoint", record)
    monkeypatch.setattr(train, "_validate", lambda *a, **k: {"elbo": -5.0, "reconstruction": 4.0, "kl": 1.0,
                                                              "loss": 5.0})
    train.fit(_warmed(grey, train__epochs=6, train__early_stopping=2), tmp_path / "run")
    assert len(_metrics_rows(tmp_path / "run", "val")) == 3  # epoch 1 improves on inf; 2 and 3 do not
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], ends[1][k]) for k in saved)


@pytest.mark.parametrize("binarize, likelihood, noted", [
    ("none", "bernoulli", True), ("dynamic", "bernoulli", False), ("static", "bernoulli", False),
    ("none", "continuous_bernoulli", False),
])
def test_a_bernoulli_likelihood_on_grey_levels_is_noted(binarize, likelihood, noted, tmp_path, capsys):
    """The tutorial's mistake 7 made on purpose still trains, with a line that says what its
    ELBO is not."""
    config = tiny_config(train__epochs=1, data__binarize=binarize, model__likelihood=likelihood)
    capsys.readouterr()
    train.fit(config, tmp_path / "run")
    err = capsys.readouterr().err
    assert ("the Bernoulli likelihood on grey levels (data.binarize 'none', digits) is no normalised density"
            in err) is noted, err


def test_binary_data_under_a_bernoulli_likelihood_need_no_binarization_and_get_no_note(tmp_path, capsys):
    x = (np.random.default_rng(0).random((60, 16)) > 0.5).astype(np.float32)
    np.save(tmp_path / "binary.npy", x)
    config = tiny_config(train__epochs=1, data__dataset="array", data__data_dir=str(tmp_path / "binary.npy"),
                         data__binarize="none")
    capsys.readouterr()
    train.fit(config, tmp_path / "run")
    assert "grey levels" not in capsys.readouterr().err


def test_fit_result_says_where_a_resumed_call_went_on_from(tmp_path):
    config = tiny_config(train__epochs=1)
    first = train.fit(config, tmp_path / "run")
    assert first.resumed_from is None
    spe = steps_per_epoch(config)
    again = train.fit(config, tmp_path / "run", resume=True, epochs=2)
    assert again.resumed_from == (1, spe) and again.history[-1]["step"] == 2 * spe
    assert train.fit(config, tmp_path / "run", resume=True).resumed_from == (2, 2 * spe)  # finished: nothing trained


def test_a_run_refused_for_a_directory_in_use_removes_nothing(tmp_path, monkeypatch):
    """Two new runs start together on a directory neither finds: the one refused (the other
    holds the lock) must not remove the directory, though its own mkdir may have made it
    first: the other trains there."""
    import fcntl

    def taken(fd, op):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", taken)
    rd = tmp_path / "new"
    with pytest.raises(ValueError, match="is in use"):
        train.fit(tiny_config(train__epochs=1), rd)
    assert rd.is_dir()


def test_a_run_starting_while_its_directory_is_probed_trains(tmp_path, monkeypatch):
    """train.in_use (an evaluation asking whether a run trains) holds the lock shared for a
    moment: a run starting in that moment waits it out instead of being refused."""
    import fcntl

    real, calls = fcntl.flock, []

    def probed_once(fd, op):
        calls.append(op)
        if len(calls) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", probed_once)
    result = train.fit(tiny_config(train__epochs=1), tmp_path / "run")
    assert result.trained and len(calls) == 2


def test_the_lock_follows_a_directory_made_again_under_its_name(tmp_path, monkeypatch):
    """The directory locked was removed from its path and made again meanwhile (by a refused
    run that had made it): the lock is taken again on the directory the path names now, and
    the run trains there."""
    import fcntl

    real, calls, rd = fcntl.flock, [], tmp_path / "new"

    def flock(fd, op):
        real(fd, op)
        calls.append(fd)
        if len(calls) == 1:  # the first directory locked goes, another takes its name
            rd.rmdir()
            rd.mkdir()

    monkeypatch.setattr(fcntl, "flock", flock)
    result = train.fit(tiny_config(train__epochs=1), rd)
    assert len(calls) == 2 and result.trained and (rd / "checkpoint.pt").is_file()


def test_fit_takes_train_weight_decay_as_adams_l2_penalty(grey, tmp_path, monkeypatch):
    """train.weight_decay reaches the run's optimiser: the weights after 20 steps are the
    hand loop's with Adam's weight decay (its L2 penalty; test_steps writes that Adam out in
    float64), and not those of the same loop without it."""
    _quiet(monkeypatch)
    config = _warmed(grey, train__weight_decay=0.05)
    model, _, rows, _ = _by_hand(config)
    result = train.fit(_warmed(grey, train__weight_decay=0.05), tmp_path / "run")
    _assert_close(result.model.state_dict(), model.state_dict())
    _assert_train_rows(tmp_path / "run", rows)
    plain = _by_hand(_warmed(grey))[0].state_dict()
    assert max(float((v - plain[k]).abs().max()) for k, v in model.state_dict().items()) > 1e-3


def test_epochs_0_with_max_steps_trains_by_max_steps_alone(grey, tmp_path, monkeypatch):
    """TrainConfig(epochs=0, max_steps=12) (a config may give max_steps alone) trains 12
    steps: with 5 steps an epoch, two whole epochs and 2 steps of a third, each with its
    row; the cosine learning rate decays over those 12 steps; the run is the one with
    epochs=3 that max_steps=12 cuts short, weights and rows. epochs=0 and max_steps=0 together
    are refused by name."""
    _quiet(monkeypatch)
    alone = train.fit(_warmed(grey, train__epochs=0, train__max_steps=12), tmp_path / "alone")
    bounded = train.fit(_warmed(grey, train__epochs=3, train__max_steps=12), tmp_path / "bounded")
    train_rows = [r for r in alone.history if r["split"] == "train"]
    assert [(r["epoch"], r["step"]) for r in train_rows] == [(1, 5), (2, 10), (3, 12)]
    assert alone.steps_per_epoch == 5 and alone.trained and not alone.interrupted
    assert train_rows[-1]["lr"] == pytest.approx(0.5 * 3e-2 * (1 + math.cos(math.pi * 11 / 12)), rel=1e-12)
    assert load_checkpoint(tmp_path / "alone" / "checkpoint.pt")["step"] == 12
    assert _no_seconds(alone.history) == _no_seconds(bounded.history)
    for k, v in alone.model.state_dict().items():
        assert torch.equal(v, bounded.model.state_dict()[k]), k
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs must be > 0 \(or max_steps > 0\), got 0$"):
        _warmed(grey, train__epochs=0, train__max_steps=0)


def test_beta_tcvae_is_given_the_number_of_training_examples(grey, tmp_path, monkeypatch):
    """beta-TCVAE's estimator weighs the batch by the data set's size N: fit hands it the
    number of training examples (48 of the 60, 12 going to validation), at every step,
    whatever the batch's size (10, and 8 in the short last batch) and not the size of the
    validation (12) or test (15) split."""
    import vaekit.objectives as objectives

    _quiet(monkeypatch)
    seen, real = [], objectives.tc_decomposition

    def recording(z, mu, logvar, dataset_size, **kw):
        seen.append((dataset_size, z.shape[0]))
        return real(z, mu, logvar, dataset_size, **kw)

    monkeypatch.setattr(objectives, "tc_decomposition", recording)
    config = _warmed(grey, objective__name="beta_tcvae", objective__beta_schedule="constant",
                     objective__warmup_steps=0, train__epochs=2)
    data = load_dataset(config.data)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 15)
    train.fit(config, tmp_path / "run")
    assert seen == [(48, 10)] * 4 + [(48, 8)] + [(48, 10)] * 4 + [(48, 8)]


@pytest.mark.parametrize("off, taken", [(0.0, True), (0.9e-3, True), (-0.9e-3, True), (1.1e-3, False),
                                        (-1.1e-3, False), (0.5, False)])
def test_the_8_bit_grid_check_takes_values_within_a_thousandth_of_a_level(off, taken):
    """likelihood='discretized_logistic' trains on 8-bit levels k/255: a value within
    1e-3/255 of a level (float rounding of k/255, in float32) is taken as that level, one
    further off is refused, with the split and the way out named."""
    from types import SimpleNamespace

    from vaekit.wiring import _check_training_data, _levels

    k = torch.arange(1, 255, dtype=torch.float64)
    x = ((k + off) / 255).to(torch.float32).reshape(-1, 2, 1)
    assert _levels(x, 255) is taken
    empty = torch.zeros(0, 2, 1)
    data = SimpleNamespace(name="grid", train=torch.zeros(4, 2, 1), val=x, test=empty)
    if taken:
        _check_training_data(data, "discretized_logistic")
    else:
        with pytest.raises(ValueError, match=r"^grid val data must be 8-bit levels k/255 in \[0, 1\] for "
                                             r"likelihood='discretized_logistic'; use another likelihood"):
            _check_training_data(data, "discretized_logistic")
    # the ends of [0, 1] are levels; past them, nothing is
    assert _levels(torch.tensor([0.0, 1.0]), 255)
    assert not _levels(torch.tensor([-1 / 255]), 255) and not _levels(torch.tensor([256 / 255]), 255)
