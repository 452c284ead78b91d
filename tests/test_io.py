"""vaekit.io's background writer and host copies: the pieces that let fit write its files
while it trains (fit itself: tests/test_train.py)."""

import os
import threading
import time

import pytest
import torch

from vaekit.io import BackgroundWriter, atomic_write, file_problem, host_copy, read_json


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
