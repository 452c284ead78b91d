"""Data-parallel training under torchrun: CPU, Gloo, loopback only.

Every run goes through a small entry script (written into the test's temporary folder)
that calls ``vaekit.cli.main`` after wrapping a few functions of ``vaekit.train``:

* it keeps a copy of every checkpoint (``checkpoint-<step>.pt``) outside the run
  folder, so one run gives the parameters after several steps;
* it logs, per rank, every file-writing call of the loop and the history ``fit`` returns
  (the pictures are logged but not drawn, to save time);
* it replaces ``{rank}`` in the arguments with the rank (each rank's own files);
* on request, rank 1 dies (``os._exit(1)``) or receives SIGINT at a given step, or one
  rank's loss is NaN (its gradients left finite) at the steps of a range;
* it saves each rank's final parameters, and the exception that ended ``fit``.

The reference for a W-process run is one process with the combined batch W*b on the same
data order, binarization draws and reparameterisation noise (see ``BatchIterator`` and
``vaekit.steps._Objective``). Tiny model (hidden 16, latent 2) on the bundled 8x8 digits with
dynamic binarization, 2 epochs of 11 steps. The uncommon training-set size 1283
(``--val-size 217``) leaves a last combined batch of 3 examples, split 2 / 1 between
the ranks; the first 10 batches of each epoch are full.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the Gloo backend is not available in this build of PyTorch",
                allow_module_level=True)

from vaekit.data import DataConfig, load_dataset  # noqa: E402
from vaekit.io import load_checkpoint  # noqa: E402

B = 64  # per-rank batch size; the single-process reference uses 2 * B
STEPS_PER_EPOCH, EPOCHS = 11, 2
TOTAL = STEPS_PER_EPOCH * EPOCHS
TRAIN_ARGS = [
    "train", "--hidden", "16", "--latent-dim", "2", "--no-progress", "--num-threads", "1",
    "--epochs", str(EPOCHS), "--lr-schedule", "constant", "--val-size", "217", "--seed", "3",
    "--checkpoint-every", "3",
]
HANG_LIMIT = 40  # seconds: a launch here takes 5-12 s; past this the job is taken as hung

ENTRY = '''
import json, os, signal, sys
from pathlib import Path

import torch
import vaekit.steps as steps
import vaekit.train as train
from vaekit.cli import main

rank = int(os.environ.get("RANK", "0"))
fail_step = int(os.environ.get("TEST_FAIL_STEP", "-1"))
signal_step = int(os.environ.get("TEST_SIGNAL_STEP", "-1"))
nan_from, nan_to = map(int, os.environ.get("TEST_NAN_STEPS", "-1,-1").split(","))
nan_rank = int(os.environ.get("TEST_NAN_RANK", "1"))
keep = Path(os.environ["TEST_KEEP"])
sys.argv[1:] = [a.replace("{rank}", str(rank)) for a in sys.argv[1:]]  # each rank's own file, where a test asks
(keep / f"pid-{rank}").write_text(str(os.getpid()))  # lets the test kill a hung worker
writes = []
forward, save_checkpoint, fit = steps._Objective.forward, train.save_checkpoint, train.fit


def patched_forward(self, x, step):
    if rank == 1 and step == fail_step:
        os._exit(1)
    if rank == 1 and step == signal_step:
        os.kill(os.getpid(), signal.SIGINT)
    out = forward(self, x, step)
    if rank == nan_rank and nan_from <= step <= nan_to:
        # a NaN loss whose gradients stay finite: DDP's average cannot carry it to the
        # other ranks, only the ranks' agreement on skipping the step can
        out = out._replace(loss=out.loss + out.loss.detach() * float("nan"))
    return out


def patched_save_checkpoint(path, state, **kw):
    save_checkpoint(keep / f"checkpoint-{state['step']}.pt", state)
    writes.append("save_checkpoint")
    return save_checkpoint(path, state, **kw)


def logged(name):
    original = getattr(train, name)

    def wrapper(*args, **kwargs):
        writes.append(name)
        if name != "save_run_pictures":  # pictures are not the subject here: the call is logged, not run
            return original(*args, **kwargs)

    return wrapper


def patched_fit(*args, **kwargs):
    try:
        result = fit(*args, **kwargs)
    except Exception as e:
        (keep / f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
    torch.save(result.model.state_dict(), keep / f"model-{rank}.pt")
    (keep / f"history-{rank}.json").write_text(json.dumps(result.history))
    (keep / f"writes-{rank}.json").write_text(json.dumps(writes))
    return result


steps._Objective.forward = patched_forward
train.save_checkpoint = patched_save_checkpoint
for name in ("write_json", "save_model", "write_metrics", "save_run_pictures"):
    setattr(train, name, logged(name))
train.fit = patched_fit
sys.exit(main(sys.argv[1:]))
'''

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One finished (or killed) launch: exit status, merged output, wall time, kept files."""

    def __init__(self, rc, output, seconds, keep, hung):
        self.rc, self.output, self.seconds, self.keep, self.hung = rc, output, seconds, keep, hung

    def model(self, step: int) -> dict:
        return load_checkpoint(self.keep / f"checkpoint-{step}.pt")["model"]

    def json(self, name: str):
        return json.loads((self.keep / name).read_text())

    def final(self, rank: int) -> dict:
        """Rank ``rank``'s parameters when ``fit`` returned."""
        return torch.load(self.keep / f"model-{rank}.pt")


def _launch(tmp: Path, name: str, args: list, *, nproc: int, env: dict | None = None) -> Launch:
    entry = tmp / "entry.py"
    if not entry.exists():
        entry.write_text(ENTRY)
    keep = tmp / f"keep-{name}"
    keep.mkdir()
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    cmd += [str(entry), *args]
    full_env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    full_env.update(OMP_NUM_THREADS="1", TEST_KEEP=str(keep), PYTHONUNBUFFERED="1", **(env or {}))
    log = keep / "output.txt"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=HANG_LIMIT)
            hung = False
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own: kill the workers by the
            # pids they recorded, then the launcher's process group.
            for pid_file in keep.glob("pid-*"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            hung = True
    seconds = time.perf_counter() - t0
    return Launch(proc.returncode, log.read_text(), seconds, keep, hung)


def _ok(run: Launch) -> Launch:
    assert not run.hung and run.rc == 0, f"run failed (rc {run.rc}, hung {run.hung}):\n{run.output[-4000:]}"
    return run


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _metrics(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four launches most tests share: a 2-process run, the 1-process reference, a
    2-process run whose rank 1 dies at step 8, and its 2-process resumption."""
    tmp = tmp_path_factory.mktemp("ddp")
    r = {}
    r["ddp"] = _launch(tmp, "ddp", [*TRAIN_ARGS, "--batch-size", str(B), "--run-dir", str(tmp / "ddp")], nproc=2)
    r["single"] = _launch(tmp, "single", [*TRAIN_ARGS, "--batch-size", str(2 * B), "--run-dir", str(tmp / "single")],
                          nproc=1)
    r["failed"] = _launch(tmp, "failed", [*TRAIN_ARGS, "--batch-size", str(B), "--run-dir", str(tmp / "failed")],
                          nproc=2, env={"TEST_FAIL_STEP": "8"})
    r["failed_ckpt_step"] = (load_checkpoint(tmp / "failed" / "checkpoint.pt")["step"]
                             if (tmp / "failed" / "checkpoint.pt").exists() else None)
    r["resumed"] = _launch(tmp, "resumed", ["train", "--resume", str(tmp / "failed")], nproc=2)
    r["dirs"] = {k: tmp / k for k in ("ddp", "single", "failed")}
    return r


def test_two_ranks_equal_one_process_with_combined_batch(runs):
    ddp, single = _ok(runs["ddp"]), _ok(runs["single"])
    for step in (3, 6, 9):  # full batches only so far
        assert _max_diff(ddp.model(step), single.model(step)) < 1e-6, step
    # The parameters moved: the comparison is not between two untouched initialisations.
    assert _max_diff(ddp.model(9), ddp.model(3)) > 1e-3


def test_uneven_last_batch_weighted_like_one_process(runs):
    """Step 10 of each epoch has 3 examples: rank 0 gets 2, rank 1 gets 1. One process
    minimises their mean; averaging the two ranks' means gives rank 1's example twice
    the weight, unless each rank's loss is scaled by its share of the combined batch."""
    n = load_dataset(DataConfig(dataset="digits", binarize="dynamic", val_size=217)).train.shape[0]
    assert n % (2 * B) == 3  # the premise: a last combined batch of 3, split 2 / 1
    ddp, single = _ok(runs["ddp"]), _ok(runs["single"])
    for step in (STEPS_PER_EPOCH, 12, TOTAL):
        assert _max_diff(ddp.model(step), single.model(step)) < 1e-6, step


def test_epoch_metrics_equal_one_process(runs):
    _ok(runs["ddp"]), _ok(runs["single"])
    a, b = _metrics(runs["dirs"]["ddp"] / "metrics.csv"), _metrics(runs["dirs"]["single"] / "metrics.csv")
    assert [(r["epoch"], r["split"], r["step"]) for r in a] == [(r["epoch"], r["split"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "reconstruction", "kl", "elbo"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-5), (ra["epoch"], ra["split"], k)


def test_every_rank_sees_the_same_validation_result(runs):
    """Early stopping and the choice of the best model are taken on every rank: ranks
    that see different validation numbers can take different decisions and deadlock."""
    ddp = _ok(runs["ddp"])
    h0, h1 = ddp.json("history-0.json"), ddp.json("history-1.json")
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(h0) == strip(h1)


def test_only_rank_zero_writes(runs):
    ddp = _ok(runs["ddp"])
    assert ddp.json("writes-1.json") == []
    assert {"write_json", "save_model", "write_metrics", "save_run_pictures", "save_checkpoint"} <= set(
        ddp.json("writes-0.json"))
    run = runs["dirs"]["ddp"]
    # The same files as a one-process run, written once.
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.parent.name != "tb")  # noqa: E731
    assert listing(run) == listing(runs["dirs"]["single"])
    assert {"checkpoint.pt", "config.json", "metrics.csv", "model/model.safetensors"} <= set(listing(run))
    assert [p.name for p in run.rglob("*.pt")] == ["checkpoint.pt"]
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".part"))]
    rows = _metrics(run / "metrics.csv")
    assert [(r["epoch"], r["split"]) for r in rows] == [(str(e), s) for e in range(1, EPOCHS + 1)
                                                        for s in ("train", "val")]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == TOTAL


def test_one_summary_line_per_job(runs):
    ddp = _ok(runs["ddp"])
    assert len(re.findall(r"vaekit: trained \d+ epochs", ddp.output)) == 1, ddp.output[-2000:]


def test_failing_rank_stops_the_job_and_resume_completes_it(runs):
    failed = runs["failed"]
    assert not failed.hung, f"the job hung after rank 1 died:\n{failed.output[-3000:]}"
    assert failed.rc != 0
    # torchrun's report names the rank that failed first and its exit code.
    root = failed.output.split("Root Cause", 1)
    assert len(root) == 2, failed.output[-3000:]
    assert re.search(r"rank\s*:\s*1\b", root[1]) and re.search(r"exitcode\s*:\s*1\b", root[1]), root[1][:800]
    # Rank 1 died inside step 8: the last checkpoint is the periodic one after step 6.
    assert runs["failed_ckpt_step"] == 6
    resumed = _ok(runs["resumed"])
    assert sorted(p.name for p in resumed.keep.glob("checkpoint-*.pt")) == sorted(
        f"checkpoint-{s}.pt" for s in (9, 11, 12, 15, 18, 21, 22))
    ddp = _ok(runs["ddp"])
    for step in (9, TOTAL):
        assert _max_diff(resumed.model(step), ddp.model(step)) == 0.0, step
    final = load_checkpoint(runs["dirs"]["failed"] / "checkpoint.pt")
    assert final["step"] == TOTAL and _max_diff(final["model"], ddp.model(TOTAL)) == 0.0


def test_resumed_metrics_equal_uninterrupted(runs):
    """The checkpoint taken mid-epoch must carry the partial epoch sums of all ranks."""
    _ok(runs["ddp"])
    _ok(runs["resumed"])
    a, b = _metrics(runs["dirs"]["ddp"] / "metrics.csv"), _metrics(runs["dirs"]["failed"] / "metrics.csv")
    assert [(r["epoch"], r["split"]) for r in a] == [(r["epoch"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "reconstruction", "kl", "elbo"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-9), (ra["epoch"], ra["split"], k)


def test_last_batch_smaller_than_world_size(tmp_path):
    """1281 training examples in combined batches of 128 leave 1 example for 2 ranks. The
    run must still train (for instance without that one example), not stop at start-up
    with advice to set ``drop_last``, which no option or config field reaches."""
    args = [*TRAIN_ARGS, "--val-size", "219", "--max-steps", "2", "--batch-size", str(B),
            "--run-dir", str(tmp_path / "run")]
    _ok(_launch(tmp_path, "small-last", args, nproc=2))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2


def test_stop_signal_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """SIGINT reaching one rank only (or reaching the ranks at different points of a step,
    as Ctrl-C or a scheduler's SIGTERM do) must stop every rank after the same step, with
    one checkpoint, rather than leave the ranks waiting in different collectives.
    (Resuming from a checkpoint is checked by the test above.)"""
    run_dir = tmp_path / "signalled"
    stopped = _launch(tmp_path, "signalled", [*TRAIN_ARGS, "--batch-size", str(B), "--run-dir", str(run_dir)],
                      nproc=2, env={"TEST_SIGNAL_STEP": "4"})
    assert not stopped.hung, f"the ranks deadlocked after SIGINT reached rank 1 only:\n{stopped.output[-3000:]}"
    # No rank raised; the first to end returned the interrupted status, 130 (torchrun may
    # then send SIGTERM to the other while it is leaving).
    assert not re.search(r"^\[rank\d\]:.*Error", stopped.output, re.M), stopped.output[-3000:]
    root = stopped.output.split("Root Cause", 1)[-1]
    assert re.search(r"exitcode\s*:\s*130\b", root), stopped.output[-3000:]
    # the way back names torchrun and the world size (plain vaekit train --resume is refused)
    assert f"continue with: torchrun --nproc_per_node=2 -m vaekit train --resume {run_dir}" in stopped.output
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert 4 < ckpt["step"] < STEPS_PER_EPOCH, ckpt["step"]  # taken on the signal, not a periodic one
    assert ckpt["batches"] == {"epoch": 0, "position": ckpt["step"], "seed": 3}


def test_an_optimal_variance_model_tracks_and_validates_as_one_process(tmp_path):
    """A decoder_variance='optimal' model updates its evaluation variance (a buffer) in the
    forward pass: from the combined batch, as one process with that batch does, and every
    rank validates with the same one (else their validation numbers, and so early stopping
    and the best model, could differ)."""
    from vaekit.models import VAE

    flags = ["--likelihood", "gaussian", "--decoder-variance", "optimal", "--binarize", "none"]
    run = _ok(_launch(tmp_path, "optimal", [*TRAIN_ARGS, *flags, "--batch-size", str(B), "--run-dir",
                                            str(tmp_path / "ddp")], nproc=2))
    _ok(_launch(tmp_path, "optimal-single", [*TRAIN_ARGS, *flags, "--batch-size", str(2 * B), "--run-dir",
                                             str(tmp_path / "single")], nproc=1))
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    h0, h1 = run.json("history-0.json"), run.json("history-1.json")
    assert [r["split"] for r in h0].count("val") == EPOCHS and strip(h0) == strip(h1)
    ddp, single = (VAE.from_pretrained(tmp_path / d / "model") for d in ("ddp", "single"))
    assert int(ddp.decoder_mse_steps) == int(single.decoder_mse_steps) > 0
    assert float(ddp.decoder_mse) == pytest.approx(float(single.decoder_mse), rel=1e-5)


def test_three_ranks_with_iwae_equal_one_process_with_combined_batch(tmp_path):
    """IWAE (k = 3) on 3 ranks: the noise of each of the k samples is the combined batch's,
    sliced per rank. The combined batch of 192 leaves a last one of 131 examples, split
    44 / 44 / 43. Rank 1 alone has a NaN loss (with finite gradients) at steps 3 and 4:
    every rank must skip them, as the one process does (else the ranks' parameters part).
    (Both in one test: a launch of 3 ranks takes 10-15 s here.)"""
    n = load_dataset(DataConfig(dataset="digits", binarize="dynamic", val_size=217)).train.shape[0]
    assert n % (3 * B) == 131  # the premise: 6 full combined batches, then an uneven one
    args = [*TRAIN_ARGS, "--objective", "iwae", "--iw-samples", "3"]
    ddp = _ok(_launch(tmp_path, "iwae", [*args, "--batch-size", str(B), "--run-dir", str(tmp_path / "ddp")],
                      nproc=3, env={"TEST_NAN_STEPS": "3,4"}))
    single = _ok(_launch(tmp_path, "iwae-single", [*args, "--batch-size", str(3 * B), "--run-dir",
                                                   str(tmp_path / "single")],
                         nproc=1, env={"TEST_NAN_STEPS": "3,4", "TEST_NAN_RANK": "0"}))
    for step in (6, 7, 14):  # before the uneven batch, after it, at the end
        assert _max_diff(ddp.model(step), single.model(step)) < 1e-6, step
    assert _max_diff(ddp.model(14), ddp.model(3)) > 1e-3
    final = [ddp.final(rank) for rank in range(3)]
    assert all(torch.equal(w[k], final[0][k]) for w in final[1:] for k in final[0])
    assert all(bool(v.isfinite().all()) for v in final[0].values())
    a, b = _metrics(tmp_path / "ddp" / "metrics.csv"), _metrics(tmp_path / "single" / "metrics.csv")
    assert [(r["epoch"], r["split"], r["step"], r["skipped"]) for r in a] == [
        (r["epoch"], r["split"], r["step"], r["skipped"]) for r in b] == [
        ("1", "train", "7", "2"), ("1", "val", "7", "2"), ("2", "train", "14", "2"), ("2", "val", "14", "2")]
    for ra, rb in zip(a, b):
        for k in ("loss", "reconstruction", "kl", "elbo"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-6, abs=1e-6), (ra["epoch"], ra["split"], k)


def test_non_finite_loss_on_one_rank_to_the_limit_stops_every_rank(tmp_path):
    """Rank 1 alone has a NaN loss from step 3 on: with ``--max-bad-steps 3`` every rank
    must stop at step 5 with one error line, not leave the others waiting in a collective."""
    run_dir = tmp_path / "run"
    args = [*TRAIN_ARGS, "--max-bad-steps", "3", "--batch-size", str(B), "--run-dir", str(run_dir)]
    run = _launch(tmp_path, "nan", args, nproc=2, env={"TEST_NAN_STEPS": f"3,{TOTAL}"})
    assert not run.hung, f"the job hung after rank 1 diverged:\n{run.output[-3000:]}"
    assert run.rc != 0
    message = (f"3 non-finite steps in a row (at step 5); stopped. The last good checkpoint is "
               f"{run_dir / 'checkpoint.pt'}")
    assert re.findall(r"^vaekit: error: .*", run.output, re.M) == [f"vaekit: error: {message}"], run.output[-3000:]
    # each rank stopped on its own (rank 1 before torchrun ended it)
    for rank in (0, 1):
        assert (run.keep / f"error-{rank}.txt").read_text() == f"TrainingDiverged: {message}"
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3


ES_EPOCHS = 6
ES_ARGS = [*TRAIN_ARGS, "--epochs", str(ES_EPOCHS), "--lr", "0.1", "--early-stopping", "1"]


@pytest.fixture(scope="module")
def early(tmp_path_factory):
    """A 2-process run that stops early, and the 1-process reference with the combined
    batch. With lr 0.1 the validation loss rises after epoch 2 (28.15, then 28.38: far
    more than the two runs' rounding apart), so ``--early-stopping 1`` ends both after
    epoch 3 of 6."""
    tmp = tmp_path_factory.mktemp("early")
    r = {"ddp": _launch(tmp, "ddp", [*ES_ARGS, "--batch-size", str(B), "--run-dir", str(tmp / "ddp")], nproc=2),
         "single": _launch(tmp, "single", [*ES_ARGS, "--batch-size", str(2 * B), "--run-dir", str(tmp / "single")],
                           nproc=1)}
    r["dirs"] = {k: tmp / k for k in ("ddp", "single")}
    r["tmp"] = tmp
    return r


def test_early_stopping_stops_every_rank_at_the_epoch_one_process_stops(early):
    """Every rank takes the early stop after the same epoch as one process with the
    combined batch, ends fit normally and keeps the same best model."""
    from vaekit.models import VAE

    ddp, single = _ok(early["ddp"]), _ok(early["single"])
    stop = 3
    # every rank returned from fit (no error), with the same history, and one summary line
    assert not list(ddp.keep.glob("error-*.txt"))
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(ddp.json("history-0.json")) == strip(ddp.json("history-1.json"))
    assert re.findall(r"vaekit: trained \d+ epochs", ddp.output) == [f"vaekit: trained {stop} epochs"], ddp.output
    a, b = _metrics(early["dirs"]["ddp"] / "metrics.csv"), _metrics(early["dirs"]["single"] / "metrics.csv")
    # stopped early: after epoch 3 of 6, both
    assert [(r["epoch"], r["split"], r["step"]) for r in a] == [(r["epoch"], r["split"], r["step"]) for r in b] == [
        (str(e), s, str(e * STEPS_PER_EPOCH)) for e in range(1, stop + 1) for s in ("train", "val")]
    for ra, rb in zip(a, b):
        for k in ("loss", "reconstruction", "kl", "elbo"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-6), (ra["epoch"], ra["split"], k)
    for run in ("ddp", "single"):
        ckpt = load_checkpoint(early["dirs"][run] / "checkpoint.pt")
        assert (ckpt["step"], ckpt["epoch"], ckpt["since_best"]) == (stop * STEPS_PER_EPOCH, stop, 1), run
    # the last parameters: the same on both ranks, and the reference's (to rounding, which
    # 33 steps at lr 0.1 carry to about 1e-6)
    final = [ddp.final(rank) for rank in (0, 1)]
    assert all(torch.equal(final[1][k], final[0][k]) for k in final[0])
    assert _max_diff(final[0], single.final(0)) < 1e-5
    # the model kept is epoch 2's, the best, as the reference keeps it
    best = {run: VAE.from_pretrained(early["dirs"][run] / "model").state_dict() for run in ("ddp", "single")}
    assert _max_diff(best["ddp"], ddp.model(2 * STEPS_PER_EPOCH)) == 0.0
    assert _max_diff(best["ddp"], best["single"]) < 1e-5
    assert _max_diff(best["ddp"], final[0]) > 1e-3


def test_resume_with_another_world_size_is_refused_in_one_line(early):
    """A checkpoint resumes on the world size that wrote it (the data position counts
    combined batches): ``vaekit train --resume`` in one process refuses a 2-process run in
    one line, with exit status 2, and leaves its files as they were; even a run that
    stopped early, which has nothing left to train. (Not checked with 3 ranks: that
    launch takes 15-20 s here, and its status and traceback would be torchrun's.)"""
    run_dir = early["dirs"]["ddp"]
    _ok(early["ddp"])
    files = lambda: {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)  # noqa: E731
                     for p in sorted(run_dir.rglob("*")) if p.is_file()}
    before = files()
    assert {"checkpoint.pt", "config.json", "metrics.csv", "model/model.safetensors"} <= set(before)
    run = _launch(early["tmp"], "resume-1", ["train", "--resume", str(run_dir)], nproc=1)
    assert not run.hung and run.rc == 2, run.output[-3000:]
    assert run.output.strip() == (
        f"vaekit: error: {run_dir / 'checkpoint.pt'} was written by a run on 2 process(es); resume it with the same "
        f"number, not 1 (the data position counts combined batches)"), run.output[-3000:]
    assert files() == before


def _files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _one_error_line(run: Launch, pattern: str) -> None:
    """The job ended at start-up in one line (``vaekit: error: ...`` matching ``pattern``),
    exit status 2 (torchrun's report), and no rank's traceback."""
    assert not run.hung, f"the job hung:\n{run.output[-3000:]}"
    assert run.rc != 0
    lines = re.findall(r"^vaekit: error: .*", run.output, re.M)
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), run.output[-3000:]
    assert not re.search(r"^\[rank\d\]:", run.output, re.M), run.output[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", run.output.split("Root Cause", 1)[-1]), run.output[-3000:]
    # every rank that got as far as raising raised the same
    assert len({p.read_text() for p in run.keep.glob("error-*.txt")}) == 1


@pytest.mark.parametrize("case", ["other", "missing"])
def test_rank_with_other_or_missing_data_stops_every_rank_in_one_line(tmp_path, case):
    """Each rank loads its own copy of the data: a copy that differs on one machine (here
    10 rows fewer) would train on examples used twice or never, or leave the ranks in
    mismatched collectives; a copy missing there stopped rank 1 alone, while rank 0
    printed a traceback from DDP's start-up. Every rank stops before anything is written,
    with the one line that says which rank differs or failed."""
    import numpy as np

    x = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "data-0.npy", x)
    if case == "other":
        np.save(tmp_path / "data-1.npy", x[:-10])
    run_dir = tmp_path / "run"
    run = _launch(tmp_path, case, [*TRAIN_ARGS, "--batch-size", "32", "--dataset", "array", "--data-dir",
                                   str(tmp_path / "data-{rank}.npy"), "--run-dir", str(run_dir)], nproc=2)
    if case == "other":
        pattern = (r"vaekit: error: rank 1 loaded other training data than rank 0 \(rank 1: \d+ examples of shape "
                   r"\(1, 8, 8\), hash \w+, from .*data-1\.npy; rank 0: \d+ examples .*data-0\.npy\): every rank "
                   r"must read the same files")
    else:
        pattern = rf"vaekit: error: rank 1: .*{re.escape(str(tmp_path / 'data-1.npy'))}.*"
    _one_error_line(run, pattern)
    assert not run_dir.exists()


def test_rank_resuming_another_checkpoint_stops_every_rank_in_one_line(runs, tmp_path):
    """Each rank reads its own checkpoint.pt on resume: rank 1 given an older copy of the
    run (step 9, where rank 0's is at step 12) made rank 0 write wrong metrics, then wait
    in a collective until gloo's timeout. Every rank stops in one line instead, the run's
    copies left as they were."""
    ddp = _ok(runs["ddp"])
    copies = [tmp_path / f"run-{rank}" for rank in (0, 1)]
    for rank, step in ((0, 12), (1, 9)):
        run_dir = copies[rank]
        run_dir.mkdir()
        (run_dir / "config.json").write_bytes((runs["dirs"]["ddp"] / "config.json").read_bytes())
        (run_dir / "checkpoint.pt").write_bytes((ddp.keep / f"checkpoint-{step}.pt").read_bytes())
    before = [_files(d) for d in copies]
    run = _launch(tmp_path, "stale", ["train", "--resume", str(tmp_path / "run-{rank}")], nproc=2)
    _one_error_line(run, r"vaekit: error: rank 1 resumes from step 9 \(0 epochs done\) where rank 0 resumes from "
                         r"step 12 \(1 epoch done\): every rank must read the same checkpoint\.pt")
    assert [_files(d) for d in copies] == before


def test_ranks_agree_on_what_they_loaded_or_raise_the_first_error(tmp_path, monkeypatch):
    """What :func:`vaekit.wiring._agree` makes of the ranks' reports (the launches above
    try two of them): their configs, validation data and checkpoints compared with rank
    0's, and the error of the lowest failing rank raised everywhere, of its own type where
    the command line maps that type to a status."""
    import copy

    from vaekit.flags import build_config
    from vaekit.io import CheckpointError
    from vaekit.wiring import _agree, _build, _facts

    config = build_config(None, None, {"model.hidden": (16,), "model.latent_dim": 2, "train.progress": False})
    run = _build(config, tmp_path / "run", None)
    state = {"step": 12, "epoch": 1, "batches": run.batches.state_dict(), "model": run.model.state_dict()}
    ours = ("ok", _facts(run, state))

    def edited(edit):
        theirs = copy.deepcopy(ours)
        edit(theirs[1])
        return theirs

    def other_weights(facts):
        facts["resume"] = (*facts["resume"][:3], "0" * 16)

    def other_lr(facts):
        facts["config"]["train"]["lr"] = 0.5

    def other_val(facts):
        facts["data"]["val_hash"] = "0" * 16

    error = lambda cls, text: ("error", [c.__name__ for c in cls.__mro__], text)  # noqa: E731
    cases = [
        ([edited(other_weights)], ValueError, r"rank 1 resumes from another checkpoint than rank 0 \(at the same "
                                              r"step 12, but with other weights or data position\): every rank must "
                                              r"read the same checkpoint\.pt"),
        ([ours, edited(other_lr), edited(other_lr)], ValueError,
         rf"rank 2 was given another configuration than rank 0 \(train\.lr 0\.5 vs {config.train.lr}\); rank 3 "
         r"differs from rank 0 too: every rank must be given the same flags and config file"),
        ([edited(other_val)], ValueError, r"rank 1 loaded other validation data than rank 0 \(rank 1: \d+ examples, "
                                          r"hash 0{16}; rank 0: \d+ examples, hash \w+\): every rank must read the "
                                          r"same files"),
        ([ours, error(CheckpointError, "x.pt is damaged"), error(ValueError, "y")], CheckpointError,
         r"rank 2: x\.pt is damaged"),
        ([error(KeyError, "'k'")], RuntimeError, r"rank 1: KeyError: 'k'"),
    ]
    for others, cls, pattern in cases:
        monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, *others]))
        with pytest.raises(cls, match=f"^{pattern}$"):
            _agree(run, state, None, 0, 1 + len(others))
    # the same load everywhere: nothing to say
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, ours]))
    _agree(run, state, None, 0, 2)
