"""The commands as Python functions (:mod:`vaekit.commands`), called directly.

What they do end to end is tested through the command line in test_cli.py; here, what a
Python caller meets that ``main`` never shows, and the names :mod:`vaekit.cli` keeps
importable for the code written against it.
"""

import csv
import tempfile
from pathlib import Path

import pytest

import vaekit.cli
import vaekit.commands
from test_cli import tiny_config
from vaekit.commands import _check_writable, train_command
from vaekit.flags import UsageError
from vaekit.io import read_json
from vaekit.train import holds_a_run


def test_train_command_takes_epochs_and_data_dir_only_with_resume(tmp_path):
    with pytest.raises(UsageError, match=r"epochs extends a resumed run.*got epochs=3 without resume"):
        train_command(tiny_config(), tmp_path / "new", epochs=3)
    with pytest.raises(UsageError, match=r"data_dir moves a resumed run's data.*"
                                         r"got data_dir='elsewhere' without resume"):
        train_command(tiny_config(), tmp_path / "new", data_dir="elsewhere")
    assert not (tmp_path / "new").exists()


def test_the_run_dir_probe_is_invisible_to_another_rank_checking_it(tmp_path, monkeypatch):
    """Under torchrun every rank checks --run-dir: one rank's write probe inside an empty
    run directory must not make it look taken to another rank checking at that moment."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    seen, real = [], tempfile.TemporaryDirectory

    def probing(*args, **kwargs):
        probe = real(*args, **kwargs)
        seen.append(holds_a_run(run_dir))  # what another rank would see now
        return probe

    monkeypatch.setattr(tempfile, "TemporaryDirectory", probing)
    _check_writable("--run-dir", run_dir, run_dir)
    assert seen == [False] and list(run_dir.iterdir()) == []


@pytest.mark.parametrize("name", ["train_command", "evaluate_command", "sample_command", "metrics_name",
                                  "_load_run", "_check_writable", "_new_run_dir", "_evaluate", "_MAX_SEED"])
def test_vaekit_cli_still_gives_the_commands_it_used_to_define(name):
    assert getattr(vaekit.cli, name) is getattr(vaekit.commands, name)


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch):
    """The made-up name (``runs/<dataset>-<time>``) is claimed by creating it: a second run
    in the same second gets ``-2``, a third ``-3``, each with its own config and metrics."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vaekit.commands.time, "strftime", lambda fmt: "20261128-000809")
    dirs = [train_command(tiny_config(train__epochs=1, objective__beta=b)).run_dir for b in (1.0, 4.0, 2.0)]
    stem = Path("runs") / "digits-20261128-000809"
    assert dirs == [stem, stem.with_name(stem.name + "-2"), stem.with_name(stem.name + "-3")]
    for rd, beta in zip(dirs, (1.0, 4.0, 2.0)):
        assert read_json(rd / "config.json")["objective"]["beta"] == beta
        with open(rd / "metrics.csv", newline="") as f:
            assert {float(r["beta"]) for r in csv.DictReader(f) if r["split"] == "train"} == {beta}


def test_a_refused_run_leaves_no_directory_under_a_made_up_name(tmp_path, monkeypatch):
    """Nor the runs/ it made for it; a runs/ that was there before stays."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(data__dataset="array", data__data_dir=str(tmp_path / "missing.npy"))
    with pytest.raises((UsageError, FileNotFoundError)):
        train_command(config)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    with pytest.raises((UsageError, FileNotFoundError)):
        train_command(config)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_run_directory_in_use_is_named_by_its_flag(tmp_path):
    """fit's refusal of a directory another process trains in, as the command line says it."""
    import fcntl
    import os

    rd = tmp_path / "run"
    train_command(tiny_config(train__epochs=1), rd)
    fd = os.open(rd, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UsageError, match=rf"^--resume {rd} is in use: another vaekit process is training there"):
            train_command(resume=str(rd), epochs=2)
        (tmp_path / "empty").mkdir()
        fd2 = os.open(tmp_path / "empty", os.O_RDONLY)
        fcntl.flock(fd2, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match=rf"^--run-dir {tmp_path / 'empty'} is in use"):
            train_command(tiny_config(), tmp_path / "empty")
        os.close(fd2)
    finally:
        os.close(fd)


def test_a_run_still_in_its_first_epoch_is_named_as_training_by_evaluate_and_sample(tmp_path):
    """Evaluating a run whose first epoch has not ended says a process trains there (not
    that the run stopped, nor that the folder is no run); once the process has ended, what
    the run is."""
    import fcntl
    import os

    from vaekit.commands import evaluate_command, sample_command
    from vaekit.train import in_use

    rd = tmp_path / "run"
    rd.mkdir()
    fd = os.open(rd, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a starting run holds it
    try:
        assert in_use(rd)
        with pytest.raises(UsageError, match=rf"^RUN {rd} has no config.json yet: a vaekit process has just started"):
            evaluate_command(str(rd))
        (rd / "config.json").write_text("{}")  # written before its first epoch
        for command in (evaluate_command, sample_command):
            with pytest.raises(UsageError, match=rf"^RUN {rd} has no saved model yet: a vaekit process is training"):
                command(str(rd))
    finally:
        os.close(fd)
    assert not in_use(rd) and not in_use(tmp_path / "missing")
    with pytest.raises(UsageError, match=r"stopped before its first epoch ended, and before its first checkpoint"):
        evaluate_command(str(rd))
    (rd / "config.json").unlink()
    with pytest.raises(UsageError, match=r"no config.json; is this a vaekit run directory"):
        evaluate_command(str(rd))


def test_an_earlier_metrics_file_another_evaluation_moved_aside_first_is_no_error(tmp_path, monkeypatch):
    """Two evaluations end together: the second finds the file gone when it links it aside;
    its own result is then written as usual (the first kept the earlier one)."""
    import os

    from vaekit.commands import _keep_costlier

    path = tmp_path / "metrics-test.json"
    path.write_text('{"iw_nll": 90.0, "iw_samples": 5000}')
    real = os.link

    def raced(src, dst):
        os.replace(src, tmp_path / "metrics-test-earlier1.json")  # the other evaluation, just before
        return real(src, dst)

    monkeypatch.setattr(vaekit.commands.os, "link", raced)
    assert _keep_costlier(path, {"iw_samples": 0}) is None
    assert read_json(tmp_path / "metrics-test-earlier1.json")["iw_samples"] == 5000


def test_evaluate_checks_the_data_at_the_recorded_path_against_the_checkpoint(tmp_path, capsys):
    """Data that changed at the path the run recorded were scored as its own (and their
    metrics written over the run's); without a checkpoint there is nothing to check against,
    and nothing is said."""
    import numpy as np

    from vaekit.commands import evaluate_command

    rng = np.random.default_rng(0)
    data = tmp_path / "flat.npy"
    np.save(data, rng.random((60, 16)).astype(np.float32))
    rd = tmp_path / "run"
    train_command(tiny_config(train__epochs=1, data__dataset="array", data__data_dir=str(data)), rd)
    evaluate_command(str(rd))
    before = read_json(rd / "metrics-test.json")
    np.save(data, rng.random((60, 16)).astype(np.float32))
    with pytest.raises(UsageError, match=rf"^RUN {rd}: the data at \S+flat\.npy changed since the run trained on them "
                                         r"\(46 training examples of shape \(16,\), hash [0-9a-f]{16}; its checkpoint "
                                         r"records 46 of shape \(16,\), hash [0-9a-f]{16}\); give --data-dir where "
                                         r"the run's own data are now$"):
        evaluate_command(str(rd))
    assert read_json(rd / "metrics-test.json") == before
    (rd / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert evaluate_command(str(rd))["n"] == 9
    assert "note" not in capsys.readouterr().err


def test_sample_to_a_name_that_ends_with_a_separator_is_refused(tmp_path):
    """Path() drops the trailing /: dirx.png/ was written as a file named dirx.png."""
    from vaekit.commands import sample_command

    out = f"{tmp_path / 'dirx.png'}/"
    with pytest.raises(UsageError, match=r"^-o/--output \S+dirx\.png/ ends with /, so it names a directory; name an "
                                         r"image file, e\.g\. \S+dirx\.png/samples\.png$"):
        sample_command(str(tmp_path / "no-run"), output=out)
    assert not (tmp_path / "dirx.png").exists()


@pytest.fixture(scope="module")
def array_run(tmp_path_factory):
    """A run trained one epoch on an array of 60 flat examples (9 carved off to test, 5 to
    validation), scored as they are (a Gaussian likelihood, no binarization)."""
    import numpy as np

    root = tmp_path_factory.mktemp("array_run")
    data = root / "flat.npy"
    np.save(data, np.random.default_rng(0).random((60, 16)).astype(np.float32))
    train_command(tiny_config(train__epochs=1, data__dataset="array", data__data_dir=str(data), data__binarize="none",
                              model__likelihood="gaussian"), root / "run")
    return root / "run"


@pytest.mark.parametrize("split, limit", [("test", 0), ("val", 0), ("train", 0), ("train", 3)])
def test_evaluate_lets_go_of_the_splits_it_does_not_score(array_run, split, limit, monkeypatch):
    """Once the training data are hashed, evaluate keeps only the split it scores, in memory
    of its own (the splits are views of one copy of the data set) unless it is most of that
    memory: the training data's tensor is gone by the time the model is evaluated."""
    import weakref

    import vaekit.data
    import vaekit.evaluate
    from vaekit.commands import evaluate_command

    loaded, seen = [], {}
    load_dataset, evaluate_model = vaekit.data.load_dataset, vaekit.evaluate.evaluate_model

    def loading(config):
        data = load_dataset(config)
        loaded.append(weakref.ref(data.train))
        return data

    def evaluating(model, x, **kwargs):
        seen.update(train_alive=loaded[0]() is not None, held=x.untyped_storage().nbytes(), own=x.nbytes)
        return evaluate_model(model, x, **kwargs)

    monkeypatch.setattr(vaekit.data, "load_dataset", loading)
    monkeypatch.setattr(vaekit.evaluate, "evaluate_model", evaluating)
    n = evaluate_command(str(array_run), split=split, limit=limit)["n"]
    assert n == {"test": 9, "val": 5, "train": limit or 46}[split]
    assert seen["train_alive"] is (split == "train" and not limit)  # (the split scored is the training data)
    # the test and validation splits and a --limit's part in memory of their own; the training
    # split, most of the memory it shares with the others (all 60 examples), as it is
    assert seen["held"] == (seen["own"] if split != "train" or limit else 60 * 16 * 4)


def test_evaluate_out_of_memory_while_loading_says_the_data_do_not_fit(array_run, monkeypatch, capsys):
    """Memory that runs out while the data load is not a batch too large: the line says the
    data set is loaded whole, whatever the flags, not to ask for a smaller --batch-size; other
    errors pass as they were."""
    import vaekit.data

    def failing(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 400000000000 bytes.\nmore")

    monkeypatch.setattr(vaekit.data, "load_dataset", failing)
    assert vaekit.cli.main(["evaluate", str(array_run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"vaekit: error: out of memory loading the data {array_run} trained on ([enforce fail at "
                   f"alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                   f"400000000000 bytes.): every split of the data set is loaded whole, whatever --split, --limit, "
                   f"--batch-size or --iw-samples; free memory, or evaluate on a machine with more\n")
    other = RuntimeError("something else")
    monkeypatch.setattr(vaekit.data, "load_dataset", lambda config: (_ for _ in ()).throw(other))
    with pytest.raises(RuntimeError) as info:
        vaekit.commands.evaluate_command(str(array_run))
    assert info.value is other
