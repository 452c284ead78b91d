"""vaekit.io's background writer and host copies: the pieces that let fit write its files
while it trains (fit itself: tests/test_train.py)."""

import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vaekit.io import (BackgroundWriter, CheckpointError, atomic_write, checkpoint_bytes, file_problem, host_copy,
                       load_checkpoint, load_model, read_json, save_checkpoint, save_model, write_json)


def test_jobs_run_in_order_on_another_thread_one_at_a_time():
    writer, log, lock = BackgroundWriter(), [], threading.Lock()
    running = []

    def job(i):
        def run():
            with lock:
                running.append(i)
                assert len(running) == 1, "two jobs ran at once"
            time.sleep(0.01)
            log.append((i, threading.current_thread().name))
            with lock:
                running.remove(i)
        return run

    for i in range(5):
        writer.submit(job(i))
    writer.close()
    assert [i for i, _ in log] == list(range(5))
    assert all(name.startswith("vaekit-writer") for _, name in log)


def test_submit_waits_for_the_job_before():
    writer, gate, done = BackgroundWriter(), threading.Event(), []
    writer.submit(lambda: (gate.wait(5), done.append(1)))
    t = threading.Timer(0.2, gate.set)
    t.start()
    start = time.perf_counter()
    writer.submit(lambda: done.append(2))  # returns only once job 1 is over
    assert done[:1] == [1] and time.perf_counter() - start >= 0.15
    writer.close()
    assert done == [1, 2]


@pytest.mark.parametrize("how", ["submit", "wait", "check", "close"])
def test_a_failed_job_raises_its_own_error_in_the_callers_thread(how):
    writer, error = BackgroundWriter(), OSError(28, "No space left on device")

    def fail():
        raise error

    writer.submit(fail)
    time.sleep(0.05)
    later = []
    with pytest.raises(OSError) as got:
        if how == "check":
            for _ in range(100):  # check never waits: poll until the job has failed
                writer.check()
                time.sleep(0.01)
        elif how == "submit":
            writer.submit(lambda: later.append(1))
        else:
            getattr(writer, how)()
    assert got.value is error
    writer.close()  # reported once: nothing left to raise
    assert later == []  # a job after a failed one is not run


def test_check_never_waits_and_close_can_drop_the_error():
    writer, gate = BackgroundWriter(), threading.Event()

    def slow_failure():
        gate.wait(5)
        raise RuntimeError("disk gone")

    writer.submit(slow_failure)
    start = time.perf_counter()
    writer.check()  # still running: returns at once
    assert time.perf_counter() - start < 0.5
    gate.set()
    writer.close(raise_error=False)  # on the way out of another error


def test_idle_says_whether_the_jobs_are_over_without_waiting():
    writer, gate = BackgroundWriter(), threading.Event()
    assert writer.idle()  # nothing given yet
    writer.submit(lambda: gate.wait(5))
    start = time.perf_counter()
    assert not writer.idle() and time.perf_counter() - start < 0.5
    gate.set()
    writer.wait()
    assert writer.idle()
    writer.submit(lambda: 1 / 0)  # a failed job is over too; its error is kept for wait
    for _ in range(100):
        if writer.idle():
            break
        time.sleep(0.01)
    assert writer.idle()
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.close()


def test_disabled_writer_runs_each_job_at_once_in_the_caller():
    writer, names = BackgroundWriter(enabled=False), []
    writer.submit(lambda: names.append(threading.current_thread().name))
    assert names == [threading.current_thread().name]
    with pytest.raises(ValueError, match="at once"):
        writer.submit(lambda: (_ for _ in ()).throw(ValueError("at once")))
    writer.close()


def test_host_copy_is_a_snapshot_that_later_updates_do_not_reach():
    w = torch.arange(6.0).reshape(2, 3)
    opt_like = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3)}},
                "param_groups": [{"lr": torch.tensor(0.1), "params": [0]}]}
    obj = {"model": {"w": w, "w_t": w.t()}, "optimizer": opt_like, "step": 7, "rows": [{"a": 1.0}],
           "pair": (torch.zeros(2), "x")}
    snap = host_copy(obj)
    w.add_(100)
    opt_like["state"][0]["exp_avg"].mul_(0)
    opt_like["param_groups"][0]["lr"].fill_(0.5)
    assert torch.equal(snap["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(snap["model"]["w_t"], torch.arange(6.0).reshape(2, 3).t())
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert float(snap["optimizer"]["param_groups"][0]["lr"]) == pytest.approx(0.1)
    assert snap["step"] == 7 and snap["rows"] == [{"a": 1.0}] and isinstance(snap["pair"], tuple)
    assert snap["model"]["w"].data_ptr() != w.data_ptr()
    assert all(t.device.type == "cpu" for t in (snap["model"]["w"], snap["pair"][0]))


def test_host_copy_keeps_a_state_dicts_versions_and_named_tuples():
    from collections import namedtuple

    state = torch.nn.BatchNorm1d(3).state_dict()
    Pair = namedtuple("Pair", "a b")
    snap = host_copy({"bn": state, "pair": Pair(torch.ones(2), 3)})
    assert snap["bn"]._metadata == state._metadata and list(snap["bn"]) == list(state)
    assert isinstance(snap["pair"], Pair) and snap["pair"].b == 3 and torch.equal(snap["pair"].a, torch.ones(2))


def test_host_copy_into_an_earlier_snapshot_writes_over_its_tensors():
    w, m = torch.arange(6.0).reshape(2, 3), torch.ones(4)
    obj = {"model": {"w": w}, "optimizer": {"state": {0: {"exp_avg": m}}}, "rows": [(w[0], 1)], "step": 1}
    first = host_copy(obj)
    w.add_(10)
    m.mul_(3)
    obj["step"], obj["extra"] = 2, torch.zeros(2)
    again = host_copy(obj, into=first)
    fresh = host_copy(obj)
    # the same values a fresh copy has, in the earlier snapshot's memory where shapes agree
    assert again["step"] == 2 and torch.equal(again["extra"], torch.zeros(2))
    for got, want, old in [(again["model"]["w"], fresh["model"]["w"], first["model"]["w"]),
                           (again["optimizer"]["state"][0]["exp_avg"], fresh["optimizer"]["state"][0]["exp_avg"],
                            first["optimizer"]["state"][0]["exp_avg"]),
                           (again["rows"][0][0], fresh["rows"][0][0], first["rows"][0][0])]:
        assert torch.equal(got, want) and got.data_ptr() == old.data_ptr()
    assert torch.equal(again["model"]["w"], torch.arange(10.0, 16.0).reshape(2, 3))
    # still a snapshot: later updates of the originals do not reach it
    w.zero_()
    assert torch.equal(again["model"]["w"], torch.arange(10.0, 16.0).reshape(2, 3))
    # another shape or dtype: new memory; the source itself is never written into
    obj["model"]["w"] = torch.ones(3, 2)
    obj["optimizer"]["state"][0]["exp_avg"] = m.double()
    third = host_copy(obj, into=again)
    assert third["model"]["w"].shape == (3, 2) and third["model"]["w"].data_ptr() != again["model"]["w"].data_ptr()
    assert third["optimizer"]["state"][0]["exp_avg"].dtype == torch.float64
    own = host_copy(obj, into=obj)
    assert own["model"]["w"].data_ptr() != obj["model"]["w"].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_copy_of_gpu_tensors_is_pinned_and_complete():
    big = torch.randn(1 << 22, device="cuda")  # 16 MB: a copy that takes a while
    obj = {"a": big, "b": [big[:5] * 2]}
    first = host_copy(obj)
    assert first["a"].is_pinned() and torch.equal(first["a"], big.cpu())
    big.mul_(-1)
    again = host_copy(obj, into=first)  # read at once: the copies must have finished
    assert again["a"].data_ptr() == first["a"].data_ptr() and torch.equal(again["a"], big.cpu())
    assert torch.equal(again["b"][0], obj["b"][0].cpu())


def test_a_checkpoint_serialised_earlier_is_the_file_save_checkpoint_writes(tmp_path):
    from vaekit.io import checkpoint_bytes, load_checkpoint, save_checkpoint

    state = {"model": {"w": torch.randn(3, 2)}, "step": 5, "history": [{"loss": 1.5}]}
    data = checkpoint_bytes(state)
    state["model"]["w"].zero_()  # after serialising: not in the file
    save_checkpoint(tmp_path / "early.pt", state, data=data)
    save_checkpoint(tmp_path / "now.pt", state)
    early, now = load_checkpoint(tmp_path / "early.pt"), load_checkpoint(tmp_path / "now.pt")
    assert early["step"] == now["step"] == 5 and early["format"] == now["format"]
    assert torch.count_nonzero(early["model"]["w"]) == 6 and torch.count_nonzero(now["model"]["w"]) == 0


def test_atomic_write_through_a_link_keeps_the_link_and_replaces_its_targets_content(tmp_path):
    target = tmp_path / "kept" / "grid.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["grid.png"]  # no temporary file left
    plain = tmp_path / "plain.bin"
    atomic_write(plain, lambda f: f.write(b"x"))
    assert not plain.is_symlink() and plain.read_bytes() == b"x"


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, mode):
    """A chmod 600 picture written again came back 644 (the umask's, as a new file gets)."""
    from vaekit.io import _UMASK

    path, link = tmp_path / "keep.png", tmp_path / "latest.png"
    path.write_bytes(b"old")
    os.chmod(path, mode)
    link.symlink_to(path)
    for where in (path, link):  # through a link: its target's mode
        atomic_write(where, lambda f: f.write(b"new"))
        assert path.read_bytes() == b"new" and os.stat(path).st_mode & 0o7777 == mode
    atomic_write(tmp_path / "new.png", lambda f: f.write(b"x"))
    assert os.stat(tmp_path / "new.png").st_mode & 0o7777 == 0o666 & ~_UMASK


def _no_space(*args):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("how", ["callback raises", "write fails: ENOSPC", "fsync fails: ENOSPC"])
def test_a_failed_atomic_write_leaves_the_folder_as_it_was(tmp_path, monkeypatch, how):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"old")
    (tmp_path / "other.txt").write_bytes(b"kept")
    before = sorted(p.name for p in tmp_path.iterdir())

    def write(f):
        f.write(b"half")
        if how == "callback raises":
            raise KeyError("boom")
        if how == "write fails: ENOSPC":
            _no_space()

    if how == "fsync fails: ENOSPC":
        monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(KeyError if how == "callback raises" else OSError) as info:
        atomic_write(path, write)
    monkeypatch.undo()
    if how != "callback raises":  # a failed write names no file: the one being written is named
        assert info.value.errno == 28 and info.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .metrics.csv.*.tmp left
    assert path.read_bytes() == b"old"


def test_file_problem_names_what_stands_in_the_way_of_reading(tmp_path):
    (tmp_path / "f").write_text("{}")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to-f").symlink_to(tmp_path / "f")
    got = {name: file_problem(tmp_path / name) for name in ("f", "to-f", "d", "pipe", "loop", "dangling", "absent")}
    assert got == {"f": None, "to-f": None, "d": "a folder, not a file",
                   "pipe": "not a regular file (a pipe, socket or device)",
                   "loop": "a link that leads nowhere (or a loop of links)",
                   "dangling": "a link that leads nowhere (or a loop of links)", "absent": "no such file"}
    with pytest.raises(ValueError, match=r"pipe: not a regular file"):
        read_json(tmp_path / "pipe")  # before: open() waited for a writer forever
    with pytest.raises(FileNotFoundError, match=r"absent: no such file"):
        read_json(tmp_path / "absent")
    assert read_json(tmp_path / "to-f") == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the question is whether a CPU run touches it")
def test_a_cpu_fit_with_checkpoints_on_a_gpu_machine_makes_no_cuda_context(tmp_path):
    """host_copy asks whether memory is pinned only for a GPU's tensors: asked of a CPU
    tensor, that question alone creates a CUDA context (hundreds of MB of GPU memory, and
    seconds) in a run that never uses the GPU. A fresh process, so no other test's use of
    CUDA counts."""
    import subprocess
    import sys

    code = f"""
import torch
from vaekit.cli import build_config
from vaekit.train import fit
fit(build_config(overrides={{"train.epochs": 2, "train.progress": False, "train.device": "cpu",
                             "train.checkpoint_every": 3, "model.hidden": (8,), "model.latent_dim": 2}}),
    {str(tmp_path / "run")!r})
print("cuda initialized:", torch.cuda.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cuda initialized: False" in out.stdout
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------------------------
# Bad arguments: refused before any file is touched


def _tiny_vae(latent_dim=2):
    from vaekit.models import VAE, ModelConfig

    return VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=latent_dim, hidden=(8,)))


def _unsaveable(case):
    """(model, state) of a save_model call that must be refused, and the pattern of its error."""
    m = _tiny_vae()
    if case == "not a VAE":
        return torch.nn.Linear(2, 2), None, r"model must be a vaekit\.models\.VAE, got Linear"
    if case == "numpy config":
        m.config.fixed_logvar = np.float32(0)  # accepted by the dataclass, not by JSON
        return m, None, r"model\.config cannot be saved as JSON: .*float32"
    if case == "other model's state":
        other = _tiny_vae(latent_dim=3).state_dict()
        return m, other, r"state must be the model's own state dict .*shapes: head\.weight"
    if case == "state missing keys":
        return m, {"head.weight": m.head.weight}, r"state must be the model's own state dict .*missing"
    if case == "state not tensors":
        return m, {k: 1.0 for k in m.state_dict()}, r"state\['.*'\] must be a tensor, got float"
    return m, [1], r"state must be a state dict .*got list"


@pytest.mark.parametrize("case", ["not a VAE", "numpy config", "other model's state", "state missing keys",
                                  "state not tensors", "state not a mapping"])
def test_save_model_refuses_before_writing_so_the_saved_model_stays(tmp_path, case):
    good = _tiny_vae()
    save_model(good, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model, state, message = _unsaveable(case)
    with pytest.raises((TypeError, ValueError), match=message):
        save_model(model, tmp_path, state=state)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), good.state_dict().values()))


def test_save_model_with_a_state_taken_earlier_writes_that_state(tmp_path):
    model = _tiny_vae()
    state = host_copy(model.state_dict())
    with torch.no_grad():
        model.head.weight.add_(1)
    save_model(model, tmp_path, state=state)
    assert torch.equal(load_model(tmp_path).head.weight, state["head.weight"])


@pytest.mark.parametrize("value, where, what", [
    (np.zeros(3), r"state\['x'\]", r"numpy\.ndarray"),
    (Path("a"), r"state\['x'\]", r"pathlib\.\w*Path"),
    (lambda: 1, r"state\['x'\]", "function"),
    ({"rows": [1, (2.0, np.float32(1))]}, r"state\['x'\]\['rows'\]\[1\]\[1\]", r"numpy\.float32"),
    ({"a": {1, np.int64(2)}}, r"state\['x'\]\['a'\]\[\d\]", r"numpy\.int64"),  # a set's items are walked too
])
def test_checkpoint_bytes_refuses_what_load_checkpoint_would_not_read(tmp_path, value, where, what):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match=rf"^{where} is a {what}; a checkpoint holds tensors, numbers, strings"):
        save_checkpoint(path, {"step": 2, "x": value})
    with pytest.raises(TypeError, match=r"^state\['x'\]"):
        checkpoint_bytes({"x": value})
    assert load_checkpoint(path)["step"] == 1  # the good checkpoint is still there
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("state, error, message", [
    ([("step", 1)], TypeError, r"state must be a dict, got list"),
    ({1: 2}, TypeError, r"state's keys must be strings, got 1"),
    ({"d": {(1, 2): 3}}, TypeError, r"state\['d'\] has a key \(1, 2\) of type tuple"),
    ({"format": "other"}, ValueError, r"state\['format'\] is 'other'; leave it out"),
    ({"format_version": 2}, ValueError, r"state\['format_version'\] is 2; leave it out"),
])
def test_checkpoint_bytes_refuses_a_state_that_is_no_checkpoint(state, error, message):
    with pytest.raises(error, match=message):
        checkpoint_bytes(state)


def test_a_checkpoint_of_every_kind_of_value_the_safe_loader_reads_round_trips(tmp_path):
    from collections import OrderedDict


    model = torch.nn.Linear(2, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "p": torch.nn.Parameter(torch.ones(2)),
             "meta": OrderedDict(a=None, b=(1, 2.5, True, "s", 1j, b"x")), "size": torch.Size([2, 3]),
             "dtype": torch.bfloat16, "device": torch.device("cpu"), "rows": [{"loss": float("nan")}, {2: -1}],
             "kinds": {"a", 3}}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["meta"] == state["meta"] and back["size"] == state["size"] and back["dtype"] == torch.bfloat16
    assert back["kinds"] == {"a", 3}


@pytest.mark.parametrize("call, error, message", [
    (lambda p: load_checkpoint(p / "c.pt", map_location="gpu3"), ValueError,
     r"map_location must name a device \(cpu, cuda, cuda:N, \.\.\.\), got 'gpu3'"),
    (lambda p: load_checkpoint(p / "c.pt", map_location=3.5), TypeError,
     r"map_location must be a str or torch\.device, got float"),
    (lambda p: load_model(p / "m", device="gpu7"), ValueError,
     r"device must name a device .*got 'gpu7'"),
    (lambda p: load_model(p / "m", device=[0]), TypeError,
     r"device must be a str or torch\.device, got list"),
], ids=["map_location name", "map_location type", "device name", "device type"])
def test_a_bad_device_is_named_not_blamed_on_the_file(tmp_path, call, error, message):
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    save_model(_tiny_vae(), tmp_path / "m")
    with pytest.raises(error, match=message):
        call(tmp_path)
    # what torch.load takes besides a device: a dict, a callable, None
    for where in ({"cpu": "cpu"}, lambda storage, loc: storage, None, torch.device("cpu")):
        assert load_checkpoint(tmp_path / "c.pt", map_location=where)["step"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the question is a machine without CUDA")
def test_a_cuda_device_without_cuda_is_named(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    save_model(_tiny_vae(), tmp_path / "m")
    with pytest.raises(ValueError, match=r"map_location is 'cuda:1' but no CUDA device is available"):
        load_checkpoint(tmp_path / "c.pt", map_location="cuda:1")
    with pytest.raises(ValueError, match=r"device is 'cuda' but no CUDA device is available"):
        load_model(tmp_path / "m", device=torch.device("cuda"))


def _edit_saved(directory, case):
    import json

    cfg = directory / "config.json"
    meta = json.loads(cfg.read_text())
    if case == "format_version true":
        meta["format_version"] = True
    elif case == "config a pipe":
        cfg.unlink()
        os.mkfifo(cfg)
        return
    elif case == "weights a folder":
        (directory / "model.safetensors").unlink()
        (directory / "model.safetensors").mkdir()
        return
    cfg.write_text(json.dumps(meta))


@pytest.mark.parametrize("case, message", [
    ("format_version true", r"config\.json has format_version True; this vaekit .* reads 1\.\.1"),
    ("config a pipe", r"holds no saved model: config\.json is not a regular file \(a pipe"),
    ("weights a folder", r"holds no saved model: model\.safetensors is a folder, not a file"),
])
def test_load_model_refuses_a_bad_saved_model_with_a_checkpoint_error(tmp_path, case, message):
    save_model(_tiny_vae(), tmp_path)
    _edit_saved(tmp_path, case)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_load_model_refuses_a_tensor_of_another_dtype_than_the_rest(tmp_path, dtype):
    """load_model keeps the saved dtypes (assign): one weight cast on its own loaded, and
    the model then failed in its first product ("self and mat2 must have the same dtype")."""
    from safetensors.torch import load_file, save_file

    save_model(_tiny_vae(), tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    key = sorted(state)[1]
    save_file({**state, key: state[key].to(dtype)}, weights)
    if dtype.is_floating_point:
        message = (rf"^{re.escape(str(weights))} mixes floating-point dtypes: tensor {re.escape(key)} is {dtype}, "
                   rf"where \S+ is torch\.float32; a saved model has one dtype throughout$")
    else:
        message = (rf"^{re.escape(str(weights))}: tensor {re.escape(key)} must be floating-point, as the model's is, "
                   rf"got {dtype}$")
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_a_save_interrupted_between_its_two_files_is_refused_not_loaded_as_another_model(tmp_path, monkeypatch):
    """save_model writes the weights, then the config. Over a model of the same shapes and
    another likelihood, a failure between the two left the new weights beside the old
    config, and that pair loaded as a model neither save made (shapes cannot tell); the
    config records the weights' SHA-256."""
    from vaekit import io
    from vaekit.models import VAE, ModelConfig

    old = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,), likelihood="bernoulli"))
    new = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,), likelihood="continuous_bernoulli"))
    save_model(old, tmp_path)
    write = io.atomic_write

    def fail_at_the_config(path, data):
        if Path(path).name == "config.json":
            raise OSError(28, "No space left on device")
        return write(path, data)

    monkeypatch.setattr(io, "atomic_write", fail_at_the_config)
    with pytest.raises(OSError):
        save_model(new, tmp_path)
    monkeypatch.undo()
    weights, cfg = tmp_path / "model.safetensors", tmp_path / "config.json"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(weights))} does not match {re.escape(str(cfg))}: "
                                              r"its SHA-256 is not the one the config records"):
        load_model(tmp_path)
    save_model(new, tmp_path)  # the save done again: a pair
    assert load_model(tmp_path).config.likelihood == "continuous_bernoulli"


def test_weights_changed_after_the_save_are_refused_unless_the_seal_is_removed(tmp_path):
    """One bit of a weight flipped on disk is told (it loaded as other numbers); a config
    without weights_sha256 (saved before vaekit wrote it, or edited on purpose) loads."""
    import json

    model = _tiny_vae()
    save_model(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"its SHA-256 is not the one the config records .* delete "
                                              r"weights_sha256 from config\.json"):
        load_model(tmp_path)
    cfg = tmp_path / "config.json"
    meta = json.loads(cfg.read_text())
    assert len(meta.pop("weights_sha256")) == 64
    cfg.write_text(json.dumps(meta))
    saved, back = model.state_dict(), load_model(tmp_path).state_dict()
    assert sum(not torch.equal(saved[k], back[k]) for k in saved) == 1  # the flipped bit, loaded as asked


@pytest.mark.parametrize("kind", [
    {"hidden": (8,)},
    {"arch": "conv", "hidden": (4,), "likelihood": "discretized_logistic"},
    {"hidden": (8,), "pixelcnn_layers": 1, "pixelcnn_width": 4},
    {"hidden": (8,), "likelihood": "gaussian", "decoder_variance": "learned"},
    {"hidden": (8,), "likelihood": "gaussian", "decoder_variance": "optimal"},
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_every_model_kind_vaekit_saves_in_another_dtype_loads_as_saved(tmp_path, kind, dtype):
    """The one-dtype rule above holds for what save_model writes: persistent buffers (the
    optimal variance's decoder_mse, trained) are cast with the weights; a PixelCNN's masks
    are not saved."""
    from vaekit.models import VAE, ModelConfig

    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, **kind))
    model.train()
    model(torch.rand(3, 1, 4, 4).round())  # decoder_mse off its first value
    model = model.to(dtype)
    save_model(model, tmp_path)
    back = load_model(tmp_path)
    assert {k: (v.dtype, v.shape) for k, v in back.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("error", [RuntimeError("Storage size calculation overflowed with sizes=[2, 4]"),
                                   MemoryError()])
def test_a_saved_model_too_large_to_build_is_a_checkpoint_error(tmp_path, monkeypatch, error):
    """What the allocator raises for sizes that pass the config's checks but no memory
    holds: said of the config file, not raised raw."""
    import vaekit.models

    save_model(_tiny_vae(), tmp_path)

    def build(config):
        raise error

    monkeypatch.setattr(vaekit.models, "VAE", build)
    with pytest.raises(CheckpointError, match=r"config\.json describes a model too large to build \((Stor|Mem)"):
        load_model(tmp_path)


def test_write_json_writes_standard_json_with_null_for_non_finite_numbers(tmp_path):
    """The metrics of a model that diverged: Python's NaN / Infinity are not JSON, and a
    strict reader (here json.loads refusing those constants) must read the file."""
    import json
    import math

    path = write_json(tmp_path / "m.json", {"nll": math.nan, "kl": [1.5, -math.inf], "n": 3,
                                            "deep": {"x": math.inf, "y": 0.25}, "ok": True, "s": "nan"})

    def strict(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=strict) == {
        "nll": None, "kl": [1.5, None], "n": 3, "deep": {"x": None, "y": 0.25}, "ok": True, "s": "nan"}
    assert read_json(path)["nll"] is None


def test_a_folder_or_a_file_where_the_other_is_needed_is_named(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("kept")
    with pytest.raises(ValueError, match=r"^path '.*folder' is a folder; expected a file to write"):
        write_json(tmp_path / "folder", {})
    with pytest.raises(ValueError, match=r"^path '.*folder' is a folder"):
        save_checkpoint(tmp_path / "folder", {"step": 1})
    with pytest.raises(ValueError, match=r"^directory '.*afile' is a file; expected a folder"):
        save_model(_tiny_vae(), tmp_path / "afile")
    with pytest.raises(ValueError, match=r"^path '.*afile.x\.json': its folder '.*afile' cannot be made, a file"):
        write_json(tmp_path / "afile" / "x.json", {})
    with pytest.raises(ValueError, match=r"^directory '.*afile.m' cannot be made, a file is in the way"):
        save_model(_tiny_vae(), tmp_path / "afile" / "m")
    (tmp_path / "m" / "config.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds a folder config\.json; expected a file there"):
        save_model(_tiny_vae(), tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()  # refused before writing the weights
    assert (tmp_path / "afile").read_text() == "kept" and list((tmp_path / "folder").iterdir()) == []


@pytest.mark.parametrize("call, message", [
    (lambda p: atomic_write(p / "x", b"data"), r"write must be a callable that writes into a binary file, got bytes"),
    (lambda p: BackgroundWriter(enabled="no"), r"enabled must be a bool, got str"),
    (lambda p: BackgroundWriter(enabled=False).submit(5), r"job must be a callable taking no arguments, got int"),
    (lambda p: read_json(None), r"path must be a str or os\.PathLike, got NoneType"),
    (lambda p: file_problem(None), r"path must be a str or os\.PathLike, got NoneType"),
    (lambda p: load_checkpoint(None), r"path must be a str or os\.PathLike, got NoneType"),
    (lambda p: load_model(None), r"directory must be a str or os\.PathLike, got NoneType"),
    (lambda p: save_checkpoint(p / "c.pt", {}, data="x"), r"data must be bytes"),
], ids=["atomic_write", "enabled", "submit", "read_json", "file_problem", "load_checkpoint", "load_model",
        "save_checkpoint"])
def test_bad_arguments_are_named(tmp_path, call, message):
    with pytest.raises(TypeError, match=message):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("head", [0, 1])
def test_a_loaded_model_in_another_dtype_runs_as_the_saved_one(tmp_path, dtype, head):
    """A bfloat16 or float64 model comes back in its dtype, buffers it does not save (a
    PixelCNN head's masks) included, and its forward pass, decoder and sampler run and
    give what the saved model gives (a bfloat16 PixelCNN failed on float32 masks after
    loading, and forward on any bfloat16 model outside autocast decoded a float32 z)."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,), pixelcnn_layers=head,
                            **({"pixelcnn_width": 4} if head else {}))).to(dtype).eval()
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    assert {t.dtype for t in back.state_dict().values()} | {b.dtype for b in back.buffers()} == {dtype}
    x = torch.rand(3, 1, 4, 4).bernoulli().to(dtype)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    again = back(x)
    assert out.z.dtype == dtype and torch.equal(out.decoder_out, again.decoder_out)
    same = [m.sample(2, generator=torch.Generator().manual_seed(2)) for m in (model, back)]
    assert same[0].dtype == dtype and torch.equal(same[0], same[1])


def test_a_loaded_model_is_in_evaluation_mode_and_scoring_it_changes_nothing(tmp_path):
    """In training mode a model with the optimal decoder variance scores each batch under
    its own mean squared error and moves its saved variance: a loaded model is for use."""
    from vaekit.models import VAE, ModelConfig

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(6,), latent_dim=2, hidden=(8,), likelihood="gaussian",
                            decoder_variance="optimal"))
    x = torch.randn(4, 6)
    model.nll(model(x).decoder_out, x)  # one training batch: the variance is set from it
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert not any(m.training for m in back.modules())
    saved = {k: v.clone() for k, v in back.state_dict().items()}
    back.nll(back(torch.randn(4, 6)).decoder_out, torch.randn(4, 6))
    assert all(torch.equal(saved[k], v) for k, v in back.state_dict().items())


def test_a_checkpoint_whose_bytes_changed_on_disk_is_refused(tmp_path):
    """torch.load reads a tensor whose stored bytes changed (a flipped bit) as other
    numbers; the CRC-32 the zip keeps of each entry tells, and the checkpoint is refused."""
    import zipfile

    path = tmp_path / "c.pt"
    w = torch.arange(4096, dtype=torch.float32)
    save_checkpoint(path, {"step": 1, "model": {"w": w}})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    assert entry.file_size == w.numel() * 4  # stored, not compressed: the tensor's bytes as they are
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)  # past the local header
    data[start + 1000] ^= 0x01
    path.write_bytes(bytes(data))
    loaded = torch.load(path, weights_only=True)  # what torch.load alone makes of it: one value changed
    assert (loaded["model"]["w"] != w).sum() == 1
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is damaged: the bytes of its entry "
                                              rf"\S+/data/0 do not match their CRC-32"):
        load_checkpoint(path)


def test_a_pickle_of_another_protocol_is_refused_in_one_line_without_torchs_warning(tmp_path):
    """torch.load warns of a pickle protocol it does not expect before its safe unpickler
    refuses the file; the refusal alone is said (the command line prints one line)."""
    import pickle
    import warnings

    path = tmp_path / "c.pt"
    path.write_bytes(pickle.dumps({"format": "vaekit", "step": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=r"could run code when loaded; refusing it"):
            load_checkpoint(path)
    assert [str(w.message) for w in seen] == []
