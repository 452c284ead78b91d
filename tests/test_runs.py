"""The run directory's format and the reading side of a resume (vaekit.runs); the loop
that writes it is tested in test_train.py (exact resume, extension) and
test_reliability.py (damaged checkpoints)."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vaekit.batching import BatchIterator
from vaekit.cli import build_config
from vaekit.config import RunConfig
from vaekit.data import load_dataset
from vaekit.io import CheckpointError, load_checkpoint, save_checkpoint
from vaekit.models import VAE, ModelConfig
from vaekit.runs import (CHECKPOINT_KEYS, METRIC_FIELDS, data_record, read_for_resume, restore, rng_state,
                         saved_config, set_rng_state, write_metrics)
from vaekit.train import fit


def test_metrics_csv_has_the_fields_in_order_and_is_replaced_whole(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [{"epoch": 1, "split": "train", "loss": 2.5, "extra": "dropped"}, {"epoch": 1, "split": "val", "loss": 3.0}]
    write_metrics(path, rows)
    write_metrics(path, rows[:1])
    read = list(csv.DictReader(path.open()))
    assert list(read[0]) == METRIC_FIELDS and len(read) == 1
    # the README's order, literally: METRIC_FIELDS itself could be wrong
    assert path.read_text().splitlines()[0] == "epoch,step,split,loss,reconstruction,kl,elbo,beta,lr,skipped,seconds"
    assert read[0]["loss"] == "2.5" and read[0]["kl"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_rng_state_round_trip_repeats_the_draws():
    state = rng_state(torch.device("cpu"))
    first = torch.rand(5)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(5), first)


def test_data_record_hashes_are_the_documented_sha256_of_the_float32_values():
    """Recomputed from the definition in data_record's docstring: the first 16 hex digits
    of the SHA-256 of the float32 values, of every example (hash, val_hash) and of the
    first, middle and last (fingerprint)."""
    import hashlib

    def sha(t):
        return hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()[:16]

    x = torch.rand(7, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    val = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    assert data_record(x, val) == {"examples": 7, "shape": [1, 3, 3], "fingerprint": sha(x[[0, 3, 6]]),
                                   "hash": sha(x), "val_examples": 2, "val_hash": sha(val)}
    assert data_record(x) == {"examples": 7, "shape": [1, 3, 3], "fingerprint": sha(x[[0, 3, 6]]), "hash": sha(x)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    fit(build_config(overrides={"train.epochs": 2, "train.progress": False, "model.hidden": (16,),
                                "model.latent_dim": 2}), run)
    return run


def test_read_for_resume_gives_the_saved_config_with_the_callers_progress_and_an_extension(finished):
    config, state = read_for_resume(finished, progress=True, extend_to=5)
    assert config.train.progress is True and config.train.epochs == 5 and state["epoch"] == 2
    assert set(CHECKPOINT_KEYS) <= set(state)
    with pytest.raises(ValueError, match=r"must be greater than the 2 epochs"):
        read_for_resume(finished, progress=False, extend_to=2)


def test_read_for_resume_of_a_run_without_a_checkpoint_gives_none_as_annotated(finished, tmp_path):
    """A run stopped before its first checkpoint gives (config, None); the annotation said a
    dict, and a type checker let the caller index it."""
    import shutil
    import typing

    shutil.copy(finished / "config.json", tmp_path / "config.json")
    config, state = read_for_resume(tmp_path, progress=False, extend_to=None)
    assert state is None and config.train.epochs == 2
    assert typing.get_type_hints(read_for_resume)["return"] == tuple[RunConfig, dict | None]


def test_a_checkpoint_missing_keys_is_named(finished, tmp_path):
    from vaekit.io import load_checkpoint

    state = load_checkpoint(finished / "checkpoint.pt")
    damaged = {k: v for k, v in state.items() if k not in ("rng", "sums", "format", "format_version")}
    save_checkpoint(tmp_path / "checkpoint.pt", damaged)
    with pytest.raises(CheckpointError, match=r"lacks rng, sums: it was not written by vaekit train"):
        read_for_resume(tmp_path, progress=False, extend_to=None)


@pytest.mark.parametrize("saved_as_tensor", [False, True])
def test_restore_keeps_the_learning_rate_tensor_a_captured_step_reads(finished, saved_as_tensor):
    # A CUDA-captured step's Adam reads its lr from a tensor on the device; a plain
    # load_state_dict would put the saved value (a CPU tensor, or a number) in its place.
    config, state = read_for_resume(finished, progress=False, extend_to=None)
    saved = state["optimizer"]
    saved_lr = 0.0123
    saved = {**saved, "param_groups": [{**g, "lr": torch.tensor(saved_lr) if saved_as_tensor else saved_lr}
                                       for g in saved["param_groups"]]}
    model = VAE(ModelConfig(**{**config.model.__dict__, "input_shape": (64,)}))
    batches = BatchIterator(load_dataset(config.data).train, config.train.batch_size, shuffle=True, seed=0)
    lr = torch.tensor(0.5)
    with_tensor = torch.optim.Adam(model.parameters(), lr=lr)
    with_number = torch.optim.Adam(model.parameters(), lr=0.5)
    for opt in (with_tensor, with_number):
        restore({**state, "optimizer": saved}, finished / "checkpoint.pt", model=model, optimizer=opt,
                batches=batches, device=torch.device("cpu"), rank=0, world=1)
    assert with_tensor.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(saved_lr)
    assert type(with_number.param_groups[0]["lr"]) is float and with_number.param_groups[0]["lr"] == pytest.approx(saved_lr)


def test_restore_puts_everything_back_and_refuses_another_world_size(finished):
    config, state = read_for_resume(finished, progress=False, extend_to=None)
    model = VAE(ModelConfig(**{**config.model.__dict__, "input_shape": (64,)}))
    opt = torch.optim.Adam(model.parameters())
    batches = BatchIterator(load_dataset(config.data).train, config.train.batch_size, shuffle=True, seed=0)
    counters = restore(state, finished / "checkpoint.pt", model=model, optimizer=opt, batches=batches,
                       device=torch.device("cpu"), rank=0, world=1)
    assert counters["step"] == state["step"] and counters["epoch"] == 2 and counters["history"] == state["history"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k])
    assert opt.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
    with pytest.raises(CheckpointError, match=r"written by a run on 1 process\(es\); resume it with the same number, not 2"):
        restore(state, finished / "checkpoint.pt", model=model, optimizer=opt, batches=batches,
                device=torch.device("cpu"), rank=0, world=2)
    # late in an epoch the data position is past what two processes' epoch holds: the world
    # size is the reason to name, not the position
    late = {**state, "batches": {**state["batches"], "position": len(batches)}}
    half = BatchIterator(batches.x, config.train.batch_size, shuffle=True, seed=0, rank=0, world_size=2)
    with pytest.raises(CheckpointError, match=r"written by a run on 1 process\(es\)"):
        restore(late, finished / "checkpoint.pt", model=model, optimizer=opt, batches=half,
                device=torch.device("cpu"), rank=0, world=2)


def test_restore_gives_back_the_skipped_count_the_best_loss_and_the_global_random_state(finished):
    config, state = read_for_resume(finished, progress=False, extend_to=None)
    model = VAE(ModelConfig(**{**config.model.__dict__, "input_shape": (64,)}))
    batches = BatchIterator(load_dataset(config.data).train, config.train.batch_size, shuffle=True, seed=0)
    saved_rng = torch.Generator().manual_seed(123).get_state()
    state = {**state, "skipped": 3, "best": 41.5, "since_best": 1, "rng": [{"cpu": saved_rng}]}
    torch.manual_seed(0)
    counters = restore(state, finished / "checkpoint.pt", model=model, optimizer=torch.optim.Adam(model.parameters()),
                       batches=batches, device=torch.device("cpu"), rank=0, world=1)
    assert (counters["skipped"], counters["best"], counters["since_best"]) == (3, 41.5, 1)
    assert torch.equal(torch.get_rng_state(), saved_rng)


def test_restore_refuses_other_training_data_and_says_how_they_differ(finished):
    config, state = read_for_resume(finished, progress=False, extend_to=None)
    model = VAE(ModelConfig(**{**config.model.__dict__, "input_shape": (64,)}))
    train = load_dataset(config.data).train
    n = train.shape[0]

    def restored(x, state=state):
        batches = BatchIterator(x, config.train.batch_size, shuffle=True, seed=0)
        return restore(state, finished / "checkpoint.pt", model=model, optimizer=torch.optim.Adam(model.parameters()),
                       batches=batches, device=torch.device("cpu"), rank=0, world=1)

    assert state["data"]["examples"] == n and state["data"]["shape"] == [1, 8, 8]
    with pytest.raises(CheckpointError, match=rf"{finished} cannot be resumed on other training data: dataset "
                                              rf"'digits' now gives 100 training examples of shape \(64,\), where "
                                              rf"the run trained on {n} of shape \(1, 8, 8\); put back"):
        restored(torch.rand(100, 64).round())
    with pytest.raises(CheckpointError, match=r"now gives \d+ training examples of shape \(1, 8, 8\), where the run "
                                              rf"trained on {n} of"):
        restored(train[:-10])  # fewer: the saved position could lie beyond the end
    with pytest.raises(CheckpointError, match=r"the same number and shape of training examples, but other values"):
        restored(1 - train)
    # every example but the first, middle and last replaced: the whole set's hash tells (the
    # three examples' fingerprint alone, all earlier versions recorded, did not)
    edited = 1 - train
    for i in (0, n // 2, n - 1):
        edited[i] = train[i]
    assert data_record(edited)["fingerprint"] == state["data"]["fingerprint"]
    with pytest.raises(CheckpointError, match=r"but other values \(hash [0-9a-f]{16}, was [0-9a-f]{16}\)"):
        restored(edited)
    one = train.clone()
    one[5, 0, 3, 3] += 1e-6  # one value of one example
    with pytest.raises(CheckpointError, match=r"but other values \(hash "):
        restored(one)
    # a record from before the hash checks what it has: the three examples
    before_hash = {**state, "data": {k: v for k, v in state["data"].items() if k != "hash"}}
    assert restored(edited, before_hash)["step"] == state["step"]
    # a checkpoint from before the record: no check
    old = {k: v for k, v in state.items() if k != "data"}
    assert restored(torch.rand(100, 64).round(), old)["step"] == state["step"]


def test_resume_refuses_an_array_file_that_changed_and_leaves_the_run_alone(tmp_path):
    from test_cli import snapshot

    rng = np.random.default_rng(0)
    data = tmp_path / "x.npy"
    np.save(data, rng.random((60, 16)).astype(np.float32))
    rd = tmp_path / "run"
    fit(build_config(overrides={"train.epochs": 1, "train.progress": False, "model.hidden": (8,),
                                "model.latent_dim": 2, "data.dataset": "array", "data.data_dir": str(data)}), rd)
    original = data.read_bytes()
    before = snapshot(rd)
    for rows in (90, 30):  # more rows (more steps an epoch), fewer rows
        np.save(data, rng.random((rows, 16)).astype(np.float32))
        with pytest.raises(CheckpointError, match=rf"cannot be resumed on other training data: dataset 'array' "
                                                  rf"\({data}\) now gives"):
            fit(build_config(), rd, resume=True, epochs=2)
        assert snapshot(rd) == before
    data.write_bytes(original)
    assert not fit(build_config(), rd, resume=True, epochs=2).interrupted


def test_resume_refuses_other_validation_examples_and_leaves_the_run_alone(tmp_path):
    """The validation split picks the saved model and stops a run early: a resume whose
    training examples are the same but whose validation examples changed is refused too."""
    from test_cli import snapshot

    rng = np.random.default_rng(1)
    data = tmp_path / "x.npz"
    values, test = rng.random((48, 16)).astype(np.float32), rng.random((8, 16)).astype(np.float32)
    np.savez(data, x_train=values, x_test=test)
    overrides = {"train.epochs": 1, "train.progress": False, "model.hidden": (8,), "model.latent_dim": 2,
                 "data.dataset": "array", "data.data_dir": str(data), "data.val_size": 12, "data.split": "tail"}
    rd = tmp_path / "run"
    fit(build_config(overrides=overrides), rd)
    state = load_checkpoint(rd / "checkpoint.pt")
    assert state["data"]["val_examples"] == 12
    before = snapshot(rd)
    edited = values.copy()
    edited[-1] = 1 - edited[-1]  # the last row is a validation example: the training rows are unchanged
    np.savez(data, x_train=edited, x_test=test)
    with pytest.raises(CheckpointError, match=rf"{rd} cannot be resumed on other validation data: dataset 'array' "
                                              rf"\({data}\) now gives the same training examples, but 12 validation "
                                              rf"examples \(val_hash [0-9a-f]{{16}}\), where the run validated on 12"):
        fit(build_config(), rd, resume=True, epochs=2)
    assert snapshot(rd) == before
    # a record from before the validation hash checks the training examples only
    config, state = read_for_resume(rd, progress=False, extend_to=None)
    model = VAE(config.model)
    batches = BatchIterator(load_dataset(config.data).train, config.train.batch_size, shuffle=True, seed=0)
    now = data_record(batches.x, load_dataset(config.data).val)
    assert now["hash"] == state["data"]["hash"] and now["val_hash"] != state["data"]["val_hash"]
    old = {**state, "data": {k: v for k, v in state["data"].items() if not k.startswith("val_")}}
    restored = restore(old, rd / "checkpoint.pt", model=model, optimizer=torch.optim.Adam(model.parameters()),
                       batches=batches, device=torch.device("cpu"), rank=0, world=1, record=now)
    assert restored["step"] == state["step"]
    np.savez(data, x_train=values, x_test=test)
    assert not fit(build_config(), rd, resume=True, epochs=2).interrupted


def test_a_saved_config_with_a_data_dir_its_dataset_never_read_still_loads():
    # earlier versions took --data-dir with the digits and recorded it
    config = saved_config({"data": {"dataset": "digits", "data_dir": "/data/mnist"}, "train": {"epochs": 3}})
    assert config.data.data_dir is None and config.train.epochs == 3
    with pytest.raises(ValueError, match="data_dir is unused"):
        RunConfig.from_dict({"data": {"dataset": "digits", "data_dir": "/data/mnist"}})


@pytest.mark.parametrize("section, saved, inert", [
    ("data", {"download": True}, {"download": False}),
    ("data", {"dataset": "mnist", "data_dir": "/data", "download": True, "sprites_count": 7},
     {"download": True, "sprites_count": 50000}),
    ("data", {"dataset": "sprites", "sprites_count": 7, "download": True}, {"sprites_count": 7, "download": False}),
    ("model", {"pixelcnn_width": 32, "pixelcnn_fusion": "late"}, {"pixelcnn_width": 64, "pixelcnn_fusion": "early"}),
    ("model", {"pixelcnn_layers": 2, "pixelcnn_width": 32, "fixed_logvar": 2.0},
     {"pixelcnn_width": 32, "fixed_logvar": 0.0}),
    ("model", {"likelihood": "gaussian", "decoder_variance": "learned", "fixed_logvar": 2.0}, {"fixed_logvar": 2.0}),
])
def test_a_saved_data_or_model_section_with_settings_that_had_no_effect_still_loads(section, saved, inert):
    """As the objective's below: refused in a new config, reset in a saved one."""
    from vaekit.config import GROUPS

    config = saved_config({section: saved, "train": {"epochs": 3}})
    assert {k: getattr(getattr(config, section), k) for k in inert} == inert
    kept = {k: v for k, v in saved.items() if k not in inert and k != "data_dir"}
    assert all(getattr(getattr(config, section), k) == v for k, v in kept.items())
    if inert != {k: saved[k] for k in inert}:
        with pytest.raises(ValueError, match="has no effect"):
            GROUPS[section](**saved)


@pytest.mark.parametrize("saved, inert", [
    ({"warmup_steps": 100}, {"warmup_steps": 0}),  # the constant schedule warmed nothing up
    ({"beta_schedule": "linear", "warmup_steps": 100, "cycle_steps": 50, "cycle_ratio": 0.3},
     {"warmup_steps": 100, "cycle_steps": 0, "cycle_ratio": 0.5}),
    ({"capacity_steps": 10, "capacity_gamma": 5.0}, {"capacity_steps": 0, "capacity_gamma": 1000.0}),
    ({"tc_estimator": "mws"}, {"tc_estimator": "stratified"}),
    ({"name": "iwae", "capacity_max": 5.0, "capacity_steps": 100}, {"capacity_max": 0.0, "capacity_steps": 0}),
    ({"name": "beta_tcvae", "tc_estimator": "stratified"}, {"tc_estimator": "stratified"}),
])
def test_a_saved_config_with_settings_that_had_no_effect_still_loads(saved, inert):
    """Earlier versions recorded such settings; ObjectiveConfig now refuses them, and a
    saved run loads with them off (it trained so)."""
    from vaekit.objectives import ObjectiveConfig

    config = saved_config({"objective": saved, "train": {"epochs": 3}})
    assert {k: getattr(config.objective, k) for k in inert} == inert
    kept = {k: v for k, v in saved.items() if k not in inert}
    assert all(getattr(config.objective, k) == v for k, v in kept.items())
    if inert != {k: saved[k] for k in inert}:
        with pytest.raises(ValueError, match="has no effect|applies only to"):
            ObjectiveConfig(**saved)


def test_an_old_optimal_variance_run_resumed_saves_its_next_model(tmp_path):
    """A run saved before vaekit kept decoder_mse scored its best validation loss under each
    example's own variance, which no model evaluated under one variance reaches: resumed,
    that best is forgotten, so the next epoch's model (with its variance) is saved."""
    from safetensors.torch import load_file, save_file

    from vaekit.io import load_checkpoint, save_checkpoint
    from vaekit.train import fit

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (120, 6, 6), dtype=np.uint8))
    config = RunConfig.from_dict({"data": {"dataset": "array", "data_dir": str(tmp_path / "x.npy"),
                                           "binarize": "none"},
                                  "model": {"hidden": [16], "latent_dim": 2, "likelihood": "gaussian",
                                            "decoder_variance": "optimal"},
                                  "train": {"epochs": 1, "batch_size": 32, "progress": False}})
    rd = tmp_path / "run"
    fit(config, rd)
    state = load_checkpoint(rd / "checkpoint.pt")  # as the old code wrote them: no decoder_mse
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("decoder_mse")}
    state["best"] = -1e9  # a validation loss no shared variance reaches
    save_checkpoint(rd / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "format_version")})
    weights = rd / "model" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder_mse")}, weights)
    fit(config, rd, resume=True, epochs=2)  # (the load's warning is for evaluation: a resume is its remedy)
    saved = load_file(weights)
    assert float(saved["decoder_mse_steps"]) > 0


def _strip_seconds(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(path.open())]


def test_a_run_stopped_before_its_first_checkpoint_resumes_as_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """With checkpoint_every=0 the first epoch ends by writing model/, metrics.csv, then
    checkpoint.pt: a failure (or a kill) between them left a directory that neither
    resumed ("no checkpoint") nor took a new run ("already holds a run"). Resumed, it now
    trains from the start with its config.json: the run it was, bit for bit; stale
    temporary files are cleared from model/ as from the run directory."""
    import vaekit.train as train

    config = lambda: build_config(overrides={"train.epochs": 2, "train.progress": False, "model.hidden": (16,),
                                             "model.latent_dim": 2, "train.num_threads": 1})
    whole = fit(config(), tmp_path / "whole")
    rd = tmp_path / "run"
    real = train.save_checkpoint

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_checkpoint", fail)
    with pytest.raises(OSError, match="No space left"):
        fit(config(), rd)
    monkeypatch.setattr(train, "save_checkpoint", real)
    assert not (rd / "checkpoint.pt").exists() and (rd / "model" / "model.safetensors").is_file()
    assert {row["epoch"] for row in csv.DictReader((rd / "metrics.csv").open())} == {"1"}
    with pytest.raises(ValueError, match="already holds a run"):
        fit(config(), rd)  # a new run there: still refused
    stale = [rd / ".metrics.csv.x1.tmp", rd / "model" / ".model.safetensors.x2.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    capsys.readouterr()
    result = fit(build_config(), rd, resume=True)
    assert f"vaekit: {rd} stopped before its first checkpoint; training it from the start" in capsys.readouterr().out
    assert result.trained and not result.interrupted and not any(path.exists() for path in stale)
    for k, v in whole.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v), k
    assert _strip_seconds(rd / "metrics.csv") == _strip_seconds(tmp_path / "whole" / "metrics.csv")
    assert load_checkpoint(rd / "checkpoint.pt")["epoch"] == 2


def test_a_run_without_a_checkpoint_restarts_with_more_epochs_and_is_refused_past_its_first_epoch(finished, tmp_path):
    import json
    import shutil

    from test_cli import snapshot

    rd = tmp_path / "run"
    shutil.copytree(finished, rd)
    (rd / "checkpoint.pt").unlink()  # a finished 2-epoch run whose checkpoint was deleted
    before = snapshot(rd)
    with pytest.raises(CheckpointError, match=rf"^no checkpoint at {re.escape(str(rd / 'checkpoint.pt'))}, but "
                                              rf"{re.escape(str(rd / 'metrics.csv'))} "
                                              r"records 2 epochs: the run went past its first epoch, and training "
                                              r"it again from the start would write over them; put its checkpoint"):
        fit(build_config(), rd, resume=True, epochs=3)
    assert snapshot(rd) == before
    # stopped in its first epoch (config.json alone): --epochs N is the restarted run's
    for name in [p.name for p in rd.iterdir() if p.name != "config.json"]:
        (shutil.rmtree if (rd / name).is_dir() else Path.unlink)(rd / name)
    with pytest.raises(ValueError, match=r"must be greater than the 0 epochs .* has done, got 0"):
        fit(build_config(), rd, resume=True, epochs=0)
    result = fit(build_config(), rd, resume=True, epochs=1)
    assert result.trained and len(result.history) == 2
    assert json.loads((rd / "config.json").read_text())["train"]["epochs"] == 1
    assert load_checkpoint(rd / "checkpoint.pt")["config"]["train"]["epochs"] == 1


def test_a_run_that_max_steps_ended_says_so_and_not_to_extend_it(tmp_path, capsys):
    """train.max_steps ending a run part way through an epoch: its summary counts steps, not
    a whole epoch; a plain resume does not advise --epochs, which is refused (saying the
    value given)."""
    from vaekit.config import TrainConfig
    from vaekit.runs import extended
    from vaekit.train import _trained_for

    rd = tmp_path / "run"
    result = fit(build_config(overrides={"train.epochs": 5, "train.max_steps": 5, "train.progress": False,
                                         "model.hidden": (8,), "model.latent_dim": 2}), rd)
    per_epoch = result.steps_per_epoch
    assert per_epoch > 5 and result.trained_for() == f"5 steps ({5 / per_epoch:.3g} epochs)"
    capsys.readouterr()
    again = fit(build_config(), rd, resume=True)
    out = capsys.readouterr().out
    assert not again.trained and out == (f"vaekit: {rd} is finished: train.max_steps 5 ended it after 5 steps "
                                         f"({5 / per_epoch:.3g} epochs); nothing to train\n")
    with pytest.raises(ValueError, match=r"cannot extend .*: train\.max_steps 5 ends it and its 5 steps are done, "
                                         r"got 7$"):
        fit(build_config(), rd, resume=True, epochs=7)
    with pytest.raises(ValueError, match=r"cannot extend r: it stopped early after epoch 1, 1 epoch without a better "
                                         r"validation ELBO \(train\.early_stopping 1\), got 3$"):
        extended(TrainConfig(epochs=1, early_stopping=1), {"epoch": 1, "step": 10, "since_best": 1}, 3, Path("r"))
    assert [_trained_for(e, s, 10) for e, s in ((1, 10), (2, 20), (2, 13), (1, 4))] == [
        "1 epoch", "2 epochs", "13 steps (1.3 epochs)", "4 steps (0.4 epochs)"]


def test_the_test_split_is_recorded_but_a_resume_does_not_compare_it():
    """data_record(test=) adds the test examples' count and hash (what evaluate --data-dir
    checks the split it scores against); same_data, a resume's check, leaves them out: the
    test images do not change the training."""
    from vaekit.runs import _sha256, data_record, same_data

    x, val, test = torch.rand(10, 3), torch.rand(4, 3), torch.rand(5, 3)
    saved = data_record(x, val, test)
    assert (saved["test_examples"], saved["test_hash"]) == (5, _sha256(test))
    assert saved == {**data_record(x, val), "test_examples": 5, "test_hash": _sha256(test)}
    other = data_record(x, val, test + 1)
    assert other["test_hash"] != saved["test_hash"] and same_data(saved, other)
    assert not same_data(saved, data_record(x, val + 1, test))
