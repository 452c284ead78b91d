"""Reliable and safe: kills, signals, planted pickles, damaged files, bad input, NaNs.

* Training processes killed with SIGKILL at random moments and resumed end with the
  weights, bit for bit, of a run never interrupted; the checkpoint is never unreadable.
* SIGTERM / SIGINT checkpoint, say where, and exit with a status (no traceback).
* Checkpoints and saved models that would run code when unpickled are refused.
* Bad data, configs, flags and checkpoints give one line naming the culprit, status 2,
  and leave existing run directories as they were.
* Non-finite steps are skipped and counted; a run that only makes NaNs stops with
  :class:`vaekit.train.TrainingDiverged`.
"""

import builtins
import csv
import dataclasses
import io
import json
import math
import os
import pickle
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaekit.config
import vaekit.models
import vaekit.train
import vaekit.wiring
from test_cli import (ENV, assert_usage_error, call, no_debug_tracebacks, run_cli, snapshot,  # noqa: F401
                      steps_per_epoch, tiny_config)
from vaekit.io import CHECKPOINT_FORMAT, MODEL_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from vaekit.models import VAE
from vaekit.train import TrainingDiverged, fit

# 8 epochs of the digits in batches of 128 (88 steps), a checkpoint every 3 steps.
KILL_ARGS = ["--epochs", "8", "--hidden", "16", "--latent-dim", "2", "--batch-size", "128",
             "--checkpoint-every", "3", "--no-progress", "--num-threads", "1", "--seed", "3"]
KILLS = 10


def _rows(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _history(state) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in state["history"]]


def assert_same_run(run_dir, ref, *, best_model: bool = True) -> None:
    """The run in ``run_dir`` ended exactly as ``ref``: last weights, history, best model."""
    state = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    assert state["step"] == ref.state["step"]
    assert set(state["model"]) == set(ref.state["model"])
    for k, v in ref.state["model"].items():
        assert torch.equal(state["model"][k], v), f"last weights differ in {k}"
    assert _history(state) == _history(ref.state)
    if best_model:
        a = load_file(str(Path(run_dir) / "model" / "model.safetensors"))
        b = load_file(str(ref.run / "model" / "model.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of KILL_ARGS, in a real process."""
    rd = tmp_path_factory.mktemp("reliability") / "reference"
    rc, _, err = run_cli("train", "--run-dir", rd, *KILL_ARGS)
    assert rc == 0, err
    last = _rows(rd)[-1]
    return SimpleNamespace(run=rd, state=load_checkpoint(rd / "checkpoint.pt"),
                           seconds_per_step=float(last["seconds"]) / int(last["step"]))


# -- 1. SIGKILL at random moments, then --resume ---------------------------------------

# Ten process start-ups (import torch, and the torch._dynamo that Adam imports) would
# take most of a minute, so the killed processes are forked from a server that has
# imported them once. Each child runs what `python -m vaekit` runs, `vaekit.cli.main(argv)`
# then exit with its status, as a real process that SIGKILL ends at once; the server, its
# parent, sends the signals (the pid stays the child's until the server reaps it) and
# reports the exit status. The reference run is a plain `python -m vaekit` process, so
# the forked children are checked against one.
_SERVER = r"""
import os, select, sys, traceback
import matplotlib.pyplot, sklearn.datasets, torch._dynamo, vaekit.cli, vaekit.evaluate, vaekit.plots, vaekit.train
buf = b""
def command():
    global buf
    while b"\n" not in buf:
        chunk = os.read(0, 4096)
        if not chunk:
            sys.exit(0)
        buf += chunk
    line, buf = buf.split(b"\n", 1)
    return line.decode()
def reply(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())
reply("ready")
while True:
    words = command().split("\t")
    if words[0] != "run":
        continue  # a signal for a child that has already ended
    pid = os.fork()
    if pid == 0:
        fd = os.open(words[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            rc = vaekit.cli.main(words[2:])
        except BaseException:
            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    reply("started", pid)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            reply("ended", os.waitstatus_to_exitcode(status))
            break
        if b"\n" in buf or select.select([0], [], [], 0.002)[0]:
            words = command().split("\t")
            if words[0] == "signal":
                os.kill(pid, int(words[1]))
"""


def _mark(path):
    """Identity of the file at ``path`` (replaced atomically: a new inode), None if absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=ENV, bufsize=0)
        self.buf = b""
        self.ready = False  # its imports overlap whatever runs next (the reference run)

    def _send(self, *words) -> None:
        self.proc.stdin.write(("\t".join(map(str, words)) + "\n").encode())

    def _reply(self, timeout: float):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the fork server died"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def start(self, log, argv) -> None:
        if not self.ready:
            assert self._reply(120) == "ready"
            self.ready = True
        self._send("run", log, *argv)
        assert self._reply(60).startswith("started ")

    def signal(self, signum: int) -> None:
        self._send("signal", int(signum))

    def ended(self, timeout: float = 0.0):
        """The child's exit status (negative: the signal that ended it), None if it runs."""
        line = self._reply(timeout)
        return None if line is None else int(line.split()[1])

    def close(self) -> None:
        self.proc.stdin.close()  # the server exits at the end of its input
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def test_sigkill_at_random_moments_then_resume_ends_bitwise_equal(server, reference, tmp_path):
    rng = random.Random(1234)
    rd = tmp_path / "run"
    ckpt, log = rd / "checkpoint.pt", tmp_path / "child.log"
    total = reference.state["step"]
    kills, steps = 0, []
    while True:
        if ckpt.exists():
            argv = ["train", "--resume", rd]
        else:  # killed before its first checkpoint: nothing to resume, start again
            shutil.rmtree(rd, ignore_errors=True)
            argv = ["train", "--run-dir", rd, *KILL_ARGS]
        config_mark = _mark(rd / "config.json")
        server.start(log, argv)
        status = None
        if kills < KILLS:
            # fit writes config.json just before its first step: kill a random time later,
            # spreading the kills over what is left of the run.
            while (status := server.ended()) is None and _mark(rd / "config.json") == config_mark:
                time.sleep(0.002)
            if status is None:
                left = total - (steps[-1] if steps else 0)
                time.sleep(rng.uniform(0, left * reference.seconds_per_step / (KILLS - kills + 1)))
                server.signal(signal.SIGKILL)
        if status is None:
            status = server.ended(timeout=120)
        if status == -signal.SIGKILL:
            kills += 1
            if ckpt.exists():
                steps.append(load_checkpoint(ckpt)["step"])  # raises if it were unreadable
            continue
        assert status == 0, log.read_text()
        break
    assert kills >= KILLS, f"the run ended after {kills} kills: {log.read_text()}"
    assert steps == sorted(steps), "a resumed run went back in time"
    assert_same_run(rd, reference)
    # metrics.csv too, row for row but for the wall-clock seconds
    assert _history({"history": _rows(rd)}) == _history({"history": _rows(reference.run)})


# -- 2. SIGTERM and SIGINT --------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_exits_cleanly_and_resume_matches(signum, server, reference, tmp_path, capsys):
    rd, log = tmp_path / "run", tmp_path / "child.log"
    ckpt = rd / "checkpoint.pt"
    server.start(log, ["train", "--run-dir", rd, *KILL_ARGS])
    while (status := server.ended()) is None and not ckpt.exists():
        time.sleep(0.002)
    server.signal(signum)
    status = server.ended(timeout=120) if status is None else status
    text = log.read_text()
    assert status > 0 and "Traceback" not in text, text  # a status, not death by the signal
    assert f"checkpoint saved to {ckpt}" in text
    assert 0 < load_checkpoint(ckpt)["step"] < reference.state["step"]
    rc, _, err = call(["train", "--resume", rd], capsys)
    assert rc == 0, err
    assert_same_run(rd, reference)


def _hooked_vae(hook):
    """A VAE whose training-mode ``decode`` passes through ``hook(call_number, out)``."""

    class VAE(vaekit.models.VAE):  # same name: save_model records the class name
        calls = 0

        def decode(self, z):
            out = super().decode(z)
            if self.training:
                type(self).calls += 1
                out = hook(type(self).calls, out)
            return out

    return VAE


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """An uninterrupted in-process run (2 epochs) that checkpoints after every step and
    keeps a copy of every checkpoint it writes."""
    spe = steps_per_epoch(tiny_config())
    rd = tmp_path_factory.mktemp("recorded") / "run"
    blobs, save = [], vaekit.train.save_checkpoint

    def keep(path, state, **kw):
        out = save(path, state, **kw)
        blobs.append(Path(path).read_bytes())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vaekit.train, "save_checkpoint", keep)
        fit(tiny_config(train__checkpoint_every=1), rd)
    return SimpleNamespace(run=rd, state=load_checkpoint(rd / "checkpoint.pt"), blobs=blobs, spe=spe)


def test_resume_from_checkpoints_around_epoch_ends_ends_bitwise_equal(recorded, tmp_path):
    # Every checkpoint written at or just after the first epoch's end (where the data order
    # and the epoch's metrics turn over), one from the start and one from the middle.
    chosen = [i for i, blob in enumerate(recorded.blobs)
              if (step := torch.load(io.BytesIO(blob), weights_only=True)["step"]) == 5
              or (step % recorded.spe in (0, 1) and step < 2 * recorded.spe)]
    assert len(chosen) >= 4
    for i in chosen:
        blob = recorded.blobs[i]
        rd = tmp_path / f"from-{i}"
        rd.mkdir()
        (rd / "checkpoint.pt").write_bytes(blob)
        fit(tiny_config(), rd, resume=True)
        assert_same_run(rd, recorded, best_model=False)


def test_sigterm_during_an_epochs_last_batch_then_resume_matches(recorded, tmp_path, monkeypatch, capsys):
    def hook(n, out):
        if n == recorded.spe:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by fit: it only sets a flag
        return out

    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(hook))
    rd = tmp_path / "run"
    assert fit(tiny_config(), rd).interrupted
    assert f"checkpoint saved to {rd / 'checkpoint.pt'}" in capsys.readouterr().out
    monkeypatch.setattr(vaekit.wiring, "VAE", vaekit.models.VAE)
    assert not fit(tiny_config(), rd, resume=True).interrupted
    assert_same_run(rd, recorded)


def _stopped_then_resumed(config, rd, hook, stop_at, resumed_hook, monkeypatch):
    """``config`` run in ``rd`` with ``hook`` (:func:`_hooked_vae`), stopped by a SIGTERM
    in its step ``stop_at`` (mid-epoch), then resumed with ``resumed_hook``."""
    def stopping(n, out):
        if n == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by fit: it only sets a flag
        return hook(n, out)

    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(stopping))
    assert fit(config, rd).interrupted
    state = load_checkpoint(rd / "checkpoint.pt")
    assert state["step"] == stop_at
    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(resumed_hook))
    assert not fit(config, rd, resume=True).interrupted
    return state


def test_a_run_resumed_after_its_best_epoch_keeps_that_model(tmp_path, monkeypatch):
    """At a constant lr of 0.5 the second epoch validates worse than the first: resumed in
    the second epoch, the run still knows its best loss, so model/ stays the first epoch's,
    bit for bit, as in the run never stopped."""
    config, plain = tiny_config(train__lr=0.5, train__lr_schedule="constant"), lambda n, out: out
    ref = fit(config, tmp_path / "reference")
    val = [row["loss"] for row in ref.history if row["split"] == "val"]
    assert val[1] > val[0]  # the premise: the best model is the first epoch's
    rd = tmp_path / "run"
    state = _stopped_then_resumed(config, rd, plain, steps_per_epoch(config) + 4, plain, monkeypatch)
    assert state["best"] == val[0] and state["since_best"] == 0
    assert_same_run(rd, SimpleNamespace(run=ref.run_dir, state=load_checkpoint(ref.run_dir / "checkpoint.pt")))
    assert _history({"history": _rows(rd)}) == _history({"history": _rows(ref.run_dir)})


def test_a_run_resumed_after_a_skipped_step_counts_it_and_draws_on_from_the_global_state(tmp_path, monkeypatch):
    """A model that draws from the global generator in training (not vaekit's own streams):
    resumed, it draws on where the checkpoint left it; a non-finite step skipped before the
    stop is still counted. Both end as the run never stopped."""
    def noisy(n, out):
        return out + 0.01 * torch.randn_like(out)

    def poisoned(n, out):
        return noisy(n, out) * (float("nan") if n == 3 else 1.0)

    config = tiny_config()
    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(poisoned))
    ref = fit(config, tmp_path / "reference")
    assert [int(row["skipped"]) for row in _rows(ref.run_dir)] == [1] * 4
    rd = tmp_path / "run"
    state = _stopped_then_resumed(config, rd, poisoned, steps_per_epoch(config) + 4, noisy, monkeypatch)
    assert state["skipped"] == 1
    assert_same_run(rd, SimpleNamespace(run=ref.run_dir, state=load_checkpoint(ref.run_dir / "checkpoint.pt")))
    assert _history({"history": _rows(rd)}) == _history({"history": _rows(ref.run_dir)})


def _same(a, b) -> bool:
    """``a`` and ``b`` (nested dicts and lists of tensors and numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    return a == b


@pytest.mark.parametrize("binarize, checkpoint_every, stop, position", [
    ("dynamic", 0, 26, 4), ("static", 0, 26, 4),
    ("dynamic", 5, 29, 7),  # blocks held short of the step-count checkpoints: a stop off the epoch's 4-grid
])
def test_static_step_in_blocks_of_4_stopped_mid_epoch_then_resumed_ends_bitwise_equal(
        binarize, checkpoint_every, stop, position, tmp_path, monkeypatch):
    """fast="static", graph_steps=4, 22 steps an epoch (21 full batches): a SIGINT in the
    second epoch's first block of 4 stops the run after it, at a step not a multiple of 4;
    the resumed run ends with the weights, Adam state and metrics of the run never stopped."""
    config = tiny_config(train__fast="static", train__graph_steps=4, train__batch_size=64,
                         train__checkpoint_every=checkpoint_every, data__binarize=binarize)
    assert steps_per_epoch(config) == 22
    ref = fit(config, tmp_path / "reference")

    block = vaekit.train._static_block

    def stopping(run, xs):  # SIGINT during the block that takes the run to `stop` steps
        block(run, xs)
        if run.step < stop <= run.step + len(xs):
            os.kill(os.getpid(), signal.SIGINT)  # handled by fit: it only sets a flag

    monkeypatch.setattr(vaekit.train, "_static_block", stopping)
    rd = tmp_path / "run"
    assert fit(config, rd).interrupted
    state = load_checkpoint(rd / "checkpoint.pt")
    assert state["step"] == stop and state["batches"] == {"epoch": 1, "position": position, "seed": 0}
    monkeypatch.setattr(vaekit.train, "_static_block", block)
    assert not fit(config, rd, resume=True).interrupted
    assert_same_run(rd, SimpleNamespace(run=ref.run_dir, state=load_checkpoint(ref.run_dir / "checkpoint.pt")))
    assert _same(load_checkpoint(rd / "checkpoint.pt")["optimizer"],
                 load_checkpoint(ref.run_dir / "checkpoint.pt")["optimizer"])
    assert _history({"history": _rows(rd)}) == _history({"history": _rows(ref.run_dir)})


@pytest.mark.parametrize("at", [2, 7], ids=["in-the-warm-up", "in-the-timed-steps"])
def test_ctrl_c_in_the_time_budget_calibration_stops_the_command(at, tmp_path, monkeypatch, capsys):
    """The calibration is thrown away: a stop there ends the command (status 130, one
    line), without a resume hint for its temporary directory, a traceback, or the real
    run starting."""
    def hook(n, out):
        if n == at:
            os.kill(os.getpid(), signal.SIGINT)  # handled by fit: it only sets a flag
        return out

    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(hook))
    tiny = ["--hidden", "16", "--latent-dim", "2", "--batch-size", "128", "--no-progress", "--num-threads", "1"]
    rc, out, err = call(["train", "--run-dir", tmp_path / "run", *tiny, "--time-budget", 60], capsys)
    assert out == "vaekit: calibration: timing this run's steps and one end of epoch (thrown away)\n"
    assert rc == 130 and err == ("vaekit: interrupted (the time-budget calibration run was stopped; "
                                               "nothing was kept)\n")
    assert not (tmp_path / "run").exists()


# -- 3. planted pickles ----------------------------------------------------------------


class _Plant:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('planted')",)


def _planted(marker, flavour: str) -> bytes:
    """A checkpoint-shaped payload holding a plant: torch.save's zip format, its legacy
    format, or a bare pickle."""
    payload = {"format": "vaekit-checkpoint", "format_version": CHECKPOINT_FORMAT, "config": _Plant(marker)}
    buf = io.BytesIO()
    if flavour.startswith("pickle"):
        pickle.dump(payload, buf, protocol=0 if flavour == "pickle0" else 2)
    else:
        torch.save(payload, buf, _use_new_zipfile_serialization=flavour == "zip")
    return buf.getvalue()


def _unsafe_load(blob: bytes, flavour: str) -> None:
    pickle.loads(blob) if flavour.startswith("pickle") else torch.load(io.BytesIO(blob), weights_only=False)


@pytest.mark.parametrize("flavour", ["zip", "legacy", "pickle", "pickle0"])
def test_planted_pickles_are_refused_and_never_run(flavour, reference, tmp_path, capsys):
    marker = tmp_path / "planted.txt"
    blob = _planted(marker, flavour)
    _unsafe_load(blob, flavour)  # the plant is live: unsafe loading runs it
    assert marker.exists()
    marker.unlink()

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "checkpoint.pt").write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*(run code|refus|not a readable)") as refused:
        load_checkpoint(rd / "checkpoint.pt")
    assert "could run code" in str(refused.value)  # a plant is never called mere damage
    before = snapshot(rd)
    rc, _, err = call(["train", "--resume", rd], capsys)
    assert_usage_error(rc, err, r"checkpoint\.pt")
    assert snapshot(rd) == before

    copy = tmp_path / "model-run"
    shutil.copytree(reference.run, copy)
    (copy / "model" / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        VAE.from_pretrained(copy / "model")
    before = snapshot(copy)
    rc, _, err = call(["sample", copy, "-o", tmp_path / "s.png"], capsys)
    assert_usage_error(rc, err, r"model\.safetensors")
    assert snapshot(copy) == before and not (tmp_path / "s.png").exists()
    assert not marker.exists()


# -- 4. truncated checkpoints, newer formats -------------------------------------------


def test_truncated_and_newer_checkpoints_and_models_are_refused(reference, tmp_path):
    good = (reference.run / "checkpoint.pt").read_bytes()
    path = tmp_path / "checkpoint.pt"
    for n in (0, 10, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:n])
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*(truncated|damaged)"):
            load_checkpoint(path)
    state = load_checkpoint(reference.run / "checkpoint.pt")
    state["format_version"] = CHECKPOINT_FORMAT + 1
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint\.pt.*format {CHECKPOINT_FORMAT + 1}"):
        load_checkpoint(path)

    model = tmp_path / "model"
    shutil.copytree(reference.run / "model", model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        VAE.from_pretrained(model)
    (model / "model.safetensors").write_bytes(weights)
    meta = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**meta, "format_version": MODEL_FORMAT + 1}))
    with pytest.raises(CheckpointError, match=rf"format_version {MODEL_FORMAT + 1}"):
        VAE.from_pretrained(model)


# -- 6. non-finite steps ---------------------------------------------------------------

_FAST = [f.name for f in dataclasses.fields(vaekit.config.TrainConfig)].count("fast") == 1


@pytest.mark.parametrize("amp, fast", [("none", "off"), ("bf16", "off"), ("none", "static"), ("bf16", "static")])
def test_non_finite_steps_are_skipped_and_counted(amp, fast, tmp_path, monkeypatch):
    if fast == "static" and not _FAST:
        pytest.skip("no static training step in this vaekit")
    poisoned = []

    def every_fourth(n, out):
        if n % 4:
            return out
        poisoned.append(n)
        return out * float("nan")

    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(every_fourth))
    extra = {"train__fast": fast} if _FAST else {}
    result = fit(tiny_config(train__amp=amp, train__max_bad_steps=2, **extra), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert int(rows[-1]["skipped"]) == len(poisoned) > 0
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "reconstruction", "kl", "elbo"))
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_extreme_initialisation_skips_and_reports(amp, tmp_path, monkeypatch):
    class VAE(vaekit.models.VAE):
        def __init__(self, config):
            super().__init__(config)
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(1e30)

    monkeypatch.setattr(vaekit.wiring, "VAE", VAE)
    fit(tiny_config(train__epochs=1, train__amp=amp, train__max_bad_steps=1000), tmp_path / "run")
    (row,) = [r for r in _rows(tmp_path / "run") if r["split"] == "train"]
    skipped, steps = int(row["skipped"]), int(row["step"])
    assert skipped > 0
    if skipped == steps:  # no step counted: there is no mean loss, and 0.0 would be a lie
        assert not math.isfinite(float(row["loss"] or "nan")), row
    else:
        assert math.isfinite(float(row["loss"]))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("slow_writes", [False, True])
def test_a_run_of_nans_stops_with_training_diverged(tmp_path, monkeypatch, capsys, slow_writes):
    # slow_writes: each checkpoint is written a while after the loop hands it over, and the
    # only one before the divergence (step 5) is still being written when it comes; the
    # message still names it (the loop waits for it before saying so)
    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(lambda n, out: out if n <= 6 else out * float("nan")))
    if slow_writes:
        save = vaekit.train.save_checkpoint

        def slow(path, state, **kw):
            time.sleep(0.5)
            return save(path, state, **kw)

        monkeypatch.setattr(vaekit.train, "save_checkpoint", slow)
    rd = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"4 non-finite steps in a row") as e:
        fit(tiny_config(train__checkpoint_every=5 if slow_writes else 3, train__max_bad_steps=4), rd)
    assert str(rd / "checkpoint.pt") in str(e.value)
    state = load_checkpoint(rd / "checkpoint.pt")  # the earlier checkpoint is intact
    assert state["step"] == 5 if slow_writes else 6 <= state["step"] <= 9
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    rc, _, err = call(["train", "--run-dir", tmp_path / "cli", "--epochs", 2, "--hidden", 16, "--latent-dim", 2,
                       "--batch-size", 128, "--max-bad-steps", 4, "--no-progress", "--num-threads", 1], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "non-finite steps in a row" in lines[0] and "Traceback" not in err


# -- 5. bad input, table-driven ----------------------------------------------------------

BASE = ["train", "--run-dir", "{empty}", "--max-steps", "1", "--no-progress", "--num-threads", "1"]
TRAIN = [*BASE, "--hidden", "8", "--latent-dim", "2", "--batch-size", "16"]
ARRAY = [*TRAIN, "--dataset", "array", "--val-size", "5", "--data-dir"]
MNIST = [*TRAIN, "--dataset", "mnist", "--val-size", "5", "--data-dir"]
CONFIG = [*BASE, "--config"]
PROC = {"npz-truncated"}  # rows also run as a real process

BAD_INPUTS = [  # (id, argv with {empty} {run} {d} {tmp} placeholders, regex of the one-line error)
    # data
    ("npy-nan", [*ARRAY, "{d}/nan.npy"], r"nan\.npy.*NaN"),
    ("npy-inf", [*ARRAY, "{d}/inf.npy"], r"inf\.npy.*infinite"),
    ("npy-1d", [*ARRAY, "{d}/flat.npy"], r"flat\.npy.*shape"),
    ("npy-5d", [*ARRAY, "{d}/five.npy"], r"five\.npy.*shape"),
    ("npy-2-channels", [*ARRAY, "{d}/two-channels.npy"], r"two-channels\.npy.*shape"),
    ("npy-empty", [*ARRAY, "{d}/empty.npy"], r"empty\.npy.*empty"),
    ("npy-int64", [*ARRAY, "{d}/int64.npy"], r"int64\.npy.*dtype"),
    ("npy-objects", [*ARRAY, "{d}/objects.npy"], r"objects\.npy"),
    ("npy-garbage", [*ARRAY, "{d}/garbage.npy"], r"garbage\.npy"),
    ("npy-missing", [*ARRAY, "{d}/missing.npy"], r"missing\.npy"),
    ("array-not-npy", [*ARRAY, "{d}/notes.txt"], r"data_dir.*notes\.txt"),
    ("one-example", [*ARRAY, "{d}/one.npy"], r"one\b.*too few"),
    ("range-static", [*ARRAY, "{d}/range.npy", "--binarize", "static"], r"range.*\[0, 1\]"),
    ("range-dynamic", [*ARRAY, "{d}/range.npy", "--binarize", "dynamic"], r"range.*\[0, 1\]"),
    ("range-bernoulli", [*ARRAY, "{d}/range.npy", "--binarize", "none"], r"range.*\[0, 1\]"),
    ("npz-garbage", [*ARRAY, "{d}/garbage.npz"], r"garbage\.npz"),
    ("npz-truncated", [*ARRAY, "{d}/truncated.npz"], r"truncated\.npz"),
    ("npz-no-images", [*ARRAY, "{d}/no-images.npz"], r"no-images\.npz.*keys"),
    ("npz-bad-labels", [*ARRAY, "{d}/bad-labels.npz"], r"bad-labels\.npz.*labels"),
    ("idx-truncated", [*MNIST, "{d}/idx-truncated"], r"train-images-idx3-ubyte.*truncated"),
    ("idx-bad-gzip", [*MNIST, "{d}/idx-gzip"], r"train-images-idx3-ubyte\.gz.*gzip"),
    ("idx-bad-header", [*MNIST, "{d}/idx-header"], r"train-images-idx3-ubyte.*header"),
    ("idx-float", [*MNIST, "{d}/idx-float"], r"train-images-idx3-ubyte.*uint8"),
    ("mnist-npz-corrupt", [*MNIST, "{d}/mnist-npz"], r"mnist\.npz"),
    ("mnist-missing", [*MNIST, "{d}/nowhere"], r"nowhere"),
    ("folder-missing", [*TRAIN, "--dataset", "folder", "--data-dir", "{d}/no-folder"], r"no-folder"),
    # config files
    ("config-unknown-key", [*CONFIG, "{d}/unknown-key.toml"], r"unknown key.*'model'.*\bwidth\b"),
    ("config-unknown-section", [*CONFIG, "{d}/unknown-section.toml"], r"unknown config section.*\bmodle\b"),
    ("config-section-not-a-table", [*CONFIG, "{d}/not-a-table.toml", "--latent-dim", "2"], r"'model'.*(mapping|table)"),
    ("config-lr-text", [*CONFIG, "{d}/lr-text.toml"], r"\blr\b.*'fast'"),
    ("config-epochs-float", [*CONFIG, "{d}/epochs-float.toml"], r"epochs.*2\.5"),
    ("config-hidden-text", [*CONFIG, "{d}/hidden-text.toml"], r"hidden.*'wide'"),
    ("config-activation-list", [*CONFIG, "{d}/activation-list.toml"], r"activation"),
    ("config-latent-bool", [*CONFIG, "{d}/latent-bool.toml"], r"latent_dim.*True"),
    ("config-val-size-text", [*CONFIG, "{d}/val-size-text.toml"], r"val_size"),
    ("config-data-dir-number", [*CONFIG, "{d}/data-dir-number.toml"], r"data_dir"),
    ("config-json-list", [*CONFIG, "{d}/list.json"], r"list\.json.*(table|object)"),
    # flags
    ("negative-lr", [*TRAIN, "--lr", "-0.001"], r"\blr\b.*-0\.001"),
    ("nan-lr", [*TRAIN, "--lr", "nan"], r"\blr\b.*nan"),
    ("lr-not-a-number", [*TRAIN, "--lr", "fast"], r"--lr.*\bnumber\b.*'fast'"),
    ("batch-size-0", [*TRAIN, "--batch-size", "0"], r"batch_size.*\b0\b"),
    ("unknown-likelihood", [*TRAIN, "--likelihood", "poisson"], r"likelihood.*poisson"),
    ("latent-dim-0", [*TRAIN, "--latent-dim", "0"], r"latent_dim.*\b0\b"),
    ("hidden-not-ints", [*TRAIN, "--hidden", "8,x"], r"hidden.*8,x"),
    ("val-size-fraction-1.5", [*TRAIN, "--val-size", "1.5"], r"val_size.*1\.5"),
    ("val-size-everything", [*TRAIN, "--val-size", "100000"], r"val_size.*100000"),
    ("negative-beta", [*TRAIN, "--beta", "-1"], r"beta.*-1"),
    ("unknown-objective", [*TRAIN, "--objective", "vqvae"], r"vqvae"),
    ("iw-samples-0", [*TRAIN, "--objective", "iwae", "--iw-samples", "0"], r"iw_samples.*\b0\b"),
    ("amp-fp16", [*TRAIN, "--amp", "fp16"], r"amp.*fp16"),
    ("device-tpu", [*TRAIN, "--device", "tpu"], r"device.*tpu"),
    ("max-bad-steps-0", [*TRAIN, "--max-bad-steps", "0"], r"max_bad_steps.*\b0\b"),
    ("unknown-preset", ["train", "--preset", "imagenet"], r"preset.*imagenet"),
    ("resume-with-flags", ["train", "--resume", "{run}", "--lr", "0.1"], r"--resume"),
    ("no-command", [], r"command"),
    ("unknown-command", ["fit"], r"'fit'"),
    ("evaluate-negative-iw", ["evaluate", "{run}", "--iw-samples", "-1"], r"--iw-samples.*-1"),
    ("evaluate-bad-split", ["evaluate", "{run}", "--split", "dev"], r"--split.*'dev'"),
    ("evaluate-not-a-run", ["evaluate", "{empty}"], r"config\.json"),
    ("sample-gif", ["sample", "{run}", "-o", "{tmp}/out.gif"], r"-o.*out\.gif"),
    ("sample-nrow-0", ["sample", "{run}", "--nrow", "0", "-o", "{tmp}/out.png"], r"--nrow.*\b0\b"),
    # checkpoints and saved models
    ("ckpt-pickle", ["train", "--resume", "{d}/ckpt-pickle"],
     r"checkpoint\.pt holds objects that could run code when loaded; refusing it \(Unsupported global"),
    # not a checkpoint at all: damaged, not dangerous, and the reason short
    ("ckpt-text", ["train", "--resume", "{d}/ckpt-text"], r"checkpoint\.pt is not a readable vaekit checkpoint"
                                                          r"(: damaged, or .*)? \(.{1,60}\)$"),
    ("ckpt-truncated", ["train", "--resume", "{d}/ckpt-truncated"], r"checkpoint\.pt.*(truncated|damaged)"),
    ("ckpt-empty-file", ["train", "--resume", "{d}/ckpt-empty"], r"checkpoint\.pt.*(truncated|damaged)"),
    ("ckpt-newer", ["train", "--resume", "{d}/ckpt-newer"], rf"checkpoint\.pt.*format {CHECKPOINT_FORMAT + 1}"),
    ("ckpt-foreign", ["train", "--resume", "{d}/ckpt-foreign"], r"checkpoint\.pt.*not a vaekit checkpoint"),
    ("ckpt-missing-keys", ["train", "--resume", "{d}/ckpt-keys"], r"checkpoint\.pt"),
    ("ckpt-wrong-shapes", ["train", "--resume", "{d}/ckpt-shapes"],
     r"checkpoint\.pt does not match its own config: shapes: \S+ \(\d+, \d+\) where the model has \(32, \d+\)"),
    ("ckpt-bad-config", ["train", "--resume", "{d}/ckpt-config"], r"\blr\b.*-1"),
    ("model-pickle", ["evaluate", "{d}/model-pickle"], r"model\.safetensors"),
    ("model-truncated", ["sample", "{d}/model-truncated", "-o", "{tmp}/out.png"], r"model\.safetensors"),
    ("model-newer", ["evaluate", "{d}/model-newer"], rf"format_version {MODEL_FORMAT + 1}"),
    ("model-missing", ["evaluate", "{d}/model-missing"], r"model\.safetensors.*missing"),
    # weights of another model: which keys and shapes, in the one line
    ("model-other-config", ["sample", "{d}/model-other-config", "-o", "{tmp}/out.png"],
     r"model\.safetensors does not match \S+config\.json: shapes: \S+ \(\d+, \d+\) where the model has \(32, "),
    ("model-other-keys", ["evaluate", "{d}/model-other-keys"],
     r"model\.safetensors does not match \S+config\.json: missing encoder\.1\.2\.weight, encoder\.1\.2\.bias, "
     r"decoder\.0\.2\.weight and 1 more$"),
]


def _idx(a: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape) + a.astype(dtype).tobytes()


def _make_bad_inputs(d: Path, reference, tmp: Path) -> None:
    """Every damaged file and directory the table names, under ``d``."""
    rng = np.random.default_rng(0)
    good = rng.random((60, 4, 4)).astype(np.float32)
    nan, inf = good.copy(), good.copy()
    nan[3, 1, 1], inf[5, 2, 0] = np.nan, np.inf
    arrays = {"nan": nan, "inf": inf, "flat": good.ravel(), "five": good.reshape(60, 1, 1, 4, 4),
              "two-channels": good.reshape(60, 2, 2, 4), "empty": good[:0], "int64": (good * 9).astype(np.int64),
              "one": good[:1], "range": good * 3}
    for name, a in arrays.items():
        np.save(d / f"{name}.npy", a)
    np.save(d / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (d / "garbage.npy").write_bytes(b"not an array at all")
    (d / "garbage.npz").write_bytes(b"not a zip at all")
    (d / "notes.txt").write_text("x")
    np.savez(d / "whole.npz", x=good)
    raw = (d / "whole.npz").read_bytes()
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    np.savez(d / "no-images.npz", y=np.arange(60))
    np.savez(d / "bad-labels.npz", x=good, y=np.arange(5))

    images = (rng.random((30, 28, 28)) * 255).astype(np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    idx = {"train-images-idx3-ubyte": _idx(images), "train-labels-idx1-ubyte": _idx(labels),
           "t10k-images-idx3-ubyte": _idx(images[:10]), "t10k-labels-idx1-ubyte": _idx(labels[:10])}
    damaged = {"idx-truncated": idx["train-images-idx3-ubyte"][:-5],
               "idx-header": idx["train-images-idx3-ubyte"][:8],
               "idx-float": _idx(images.astype(np.float32), 0x0D)}
    for folder, first in damaged.items():
        (d / folder).mkdir()
        for name, content in idx.items():
            (d / folder / name).write_bytes(first if name == "train-images-idx3-ubyte" else content)
    (d / "idx-gzip").mkdir()
    for name in idx:
        (d / "idx-gzip" / f"{name}.gz").write_bytes(b"\x1f\x8b" + b"not gzip" * 8)
    (d / "mnist-npz").mkdir()
    (d / "mnist-npz" / "mnist.npz").write_bytes(b"PK\x03\x04 a broken zip")

    configs = {"unknown-key.toml": "[model]\nwidth = 8\n", "unknown-section.toml": "[modle]\nhidden = [8]\n",
               "not-a-table.toml": "model = 3\n", "lr-text.toml": '[train]\nlr = "fast"\n',
               "epochs-float.toml": "[train]\nepochs = 2.5\n", "hidden-text.toml": '[model]\nhidden = "wide"\n',
               "activation-list.toml": '[model]\nactivation = ["relu"]\n', "latent-bool.toml": "[model]\nlatent_dim = true\n",
               "val-size-text.toml": '[data]\nval_size = "10%"\n',
               "data-dir-number.toml": '[data]\ndataset = "array"\ndata_dir = 5\n', "list.json": "[1, 2]"}
    for name, text in configs.items():
        (d / name).write_text(text)

    ckpt = (reference.run / "checkpoint.pt").read_bytes()
    state = load_checkpoint(reference.run / "checkpoint.pt")
    newer = {**state, "format_version": CHECKPOINT_FORMAT + 1}
    shapes = {**state, "config": {**state["config"], "model": {**state["config"]["model"], "hidden": [32]}}}
    bad_config = {**state, "config": {**state["config"], "train": {**state["config"]["train"], "lr": -1}}}
    for name in ("pickle", "truncated", "empty", "newer", "foreign", "keys", "shapes", "config", "text"):
        (d / f"ckpt-{name}").mkdir()
    (d / "ckpt-text" / "checkpoint.pt").write_text("garbage\n")
    (d / "ckpt-pickle" / "checkpoint.pt").write_bytes(_planted(tmp / "planted.txt", "zip"))
    (d / "ckpt-truncated" / "checkpoint.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (d / "ckpt-empty" / "checkpoint.pt").write_bytes(b"")
    torch.save(newer, d / "ckpt-newer" / "checkpoint.pt")
    torch.save({"weights": torch.zeros(3)}, d / "ckpt-foreign" / "checkpoint.pt")
    save_checkpoint(d / "ckpt-keys" / "checkpoint.pt", {"step": 3})
    save_checkpoint(d / "ckpt-shapes" / "checkpoint.pt", shapes)
    save_checkpoint(d / "ckpt-config" / "checkpoint.pt", bad_config)

    for name in ("pickle", "truncated", "newer", "missing", "other-config", "other-keys"):
        shutil.copytree(reference.run, d / f"model-{name}", ignore=shutil.ignore_patterns("checkpoint.pt", "*.png"))
    meta = d / "model-other-config" / "model" / "config.json"
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "model": {**saved["model"], "hidden": [32]}}))
    meta = d / "model-other-keys" / "model" / "config.json"
    meta.write_text(json.dumps({**saved, "model": {**saved["model"], "hidden": saved["model"]["hidden"] * 2}}))
    weights = d / "model-truncated" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (d / "model-pickle" / "model" / "model.safetensors").write_bytes(_planted(tmp / "planted.txt", "pickle"))
    meta = d / "model-newer" / "model" / "config.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": MODEL_FORMAT + 1}))
    (d / "model-missing" / "model" / "model.safetensors").unlink()


@pytest.fixture(scope="module")
def bad_inputs(reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "d").mkdir()
    _make_bad_inputs(tmp / "d", reference, tmp)
    return tmp


@pytest.mark.parametrize("argv, pattern", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gives_one_clear_line_and_changes_nothing(argv, pattern, request, reference, bad_inputs,
                                                            tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    places = {"empty": tmp_path / "empty", "run": reference.run, "d": bad_inputs / "d", "tmp": tmp_path}
    argv = [a.format(**places) for a in argv]
    before = {name: snapshot(places[name]) for name in ("empty", "run", "d")}
    if request.node.callspec.id in PROC:  # what really reaches a user's terminal
        rc, _, err = run_cli(*argv)
        assert_usage_error(rc, err, pattern)
    rc, _, err = call(argv, capsys)
    assert_usage_error(rc, err, pattern)
    assert {name: snapshot(places[name]) for name in ("empty", "run", "d")} == before
    assert not any(tmp_path.glob("out.*")) and not (bad_inputs / "planted.txt").exists()


def test_on_cuda_the_count_read_at_the_epoch_end_stops_a_diverged_run(tmp_path, monkeypatch):
    """On CUDA the static step's count of non-finite steps in a row is read every
    ``_FOLD_EVERY`` steps and at the epoch's end (a read waits for the GPU), not after each
    step as on a CPU. Simulated here: the last steps of the first epoch all NaN, the run
    stops at that epoch's end, before its validation, metrics row and checkpoint (without
    the check it trained on into the next epoch, to the next fold)."""
    from vaekit import steps

    def read_as_on_cuda(run, first, k):
        if first // steps._FOLD_EVERY != (first + k) // steps._FOLD_EVERY:
            steps._fold(run)

    monkeypatch.setattr(steps, "_after_static", read_as_on_cuda)
    monkeypatch.setattr(vaekit.wiring, "VAE", _hooked_vae(lambda n, out: out if n <= 3 else out * float("nan")))
    config = tiny_config(train__fast="static", train__batch_size=150, train__max_bad_steps=4)
    spe = steps_per_epoch(config)
    from vaekit.data import load_dataset

    # no short batch (every step of the epoch static), and no fold inside the epoch
    assert load_dataset(config.data).train.shape[0] % 150 == 0 and spe < steps._FOLD_EVERY
    rd = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=rf"^\d+ non-finite steps in a row \(at step {spe}\); stopped$"):
        fit(config, rd)
    assert not (rd / "metrics.csv").exists() and not (rd / "checkpoint.pt").exists()
