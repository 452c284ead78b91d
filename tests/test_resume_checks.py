"""A checkpoint that loads but holds values vaekit never writes (another version's, or an
edit) is refused before anything is written: a CheckpointError naming the file and the
field (exit status 2 and one line from the CLI), the run directory byte for byte as it
was, extension (``epochs``) or not."""

import math
import re
import shutil

import numpy as np
import pytest
import torch

from test_cli import assert_usage_error, call, snapshot, tiny_config
from vaekit.io import CheckpointError, load_checkpoint, save_checkpoint
from vaekit.runs import read_for_resume, restore
from vaekit.train import fit


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny finished run (1 epoch), copied by each test that changes it."""
    rd = tmp_path_factory.mktemp("resume_checks") / "run"
    fit(tiny_config(train__epochs=1), rd)
    return rd


def edited(finished, tmp_path, **fields):
    """A copy of the finished run whose checkpoint has ``fields`` replaced (a value of
    ``...``: the field removed); returns (run_dir, checkpoint path)."""
    rd = tmp_path / "run"
    shutil.copytree(finished, rd)
    ckpt = rd / "checkpoint.pt"
    state = {k: v for k, v in load_checkpoint(ckpt).items() if k not in ("format", "format_version")}
    for key, value in fields.items():
        if value is ...:
            del state[key]
        else:
            state[key] = value
    save_checkpoint(ckpt, state)
    return rd, ckpt


def refused(ckpt, field) -> str:
    """The pattern of the error that names ``ckpt`` and ``field``."""
    return rf"^{re.escape(str(ckpt))} cannot be resumed: {re.escape(field)} must be .*, got "


ROW = {"epoch": 1, "step": 12, "split": "train", "loss": 40.0, "reconstruction": 39.0, "kl": 1.0, "elbo": -40.0,
       "beta": 1.0, "lr": 1e-3, "skipped": 0, "seconds": 0.5}  # a metric row as fit writes it

BAD = [  # (field written, value, field named in the error)
    ("epoch", -1, "epoch"),
    ("step", "5", "step"),
    ("since_best", True, "since_best"),
    ("skipped", 1.5, "skipped"),
    ("world_size", 0, "world_size"),
    ("best", "x", "best"),
    ("best", math.nan, "best"),
    ("seconds", math.nan, "seconds"),
    ("history", None, "history"),
    ("history", [1], "history[0]"),
    ("sums", "abc", "sums"),
    ("sums", torch.zeros(3, dtype=torch.float64), "sums"),
    ("sums", torch.zeros(4, dtype=torch.int64), "sums"),
    ("batches", {}, "batches"),
    ("batches", {"epoch": 1, "position": -1, "seed": 0}, "batches['position']"),
    ("batches", {"epoch": 1, "position": 0, "seed": "0"}, "batches['seed']"),
    ("rng", None, "rng"),
    ("rng", [], "rng"),
    ("rng", [{"cuda": torch.zeros(16, dtype=torch.uint8)}], "rng[0]"),
    ("rng", [{"cpu": torch.zeros(3, dtype=torch.uint8)}], "rng[0]['cpu']"),  # the wrong size
    ("rng", [{"cpu": torch.zeros(torch.get_rng_state().numel(), dtype=torch.uint8)}], "rng[0]['cpu']"),  # no state
    ("rng", [{"cpu": torch.get_rng_state().float()}], "rng[0]['cpu']"),
    ("data", "x", "data"),
    ("data", {"examples": 5}, "data"),
    ("model", "x", "model"),
    ("optimizer", {}, "optimizer"),
    # a row without the metric fields (the CLI's summary read row['split']: a KeyError), or of another kind
    ("history", [{}], "history[0]"),
    ("history", [{**ROW, "split": "test"}], "history[0]['split']"),
    ("history", [ROW, {**ROW, "epoch": 0}], "history[1]['epoch']"),
    ("history", [{**ROW, "loss": "1.5"}], "history[0]['loss']"),
    ("history", [{**ROW, "skipped": None}], "history[0]['skipped']"),
    ("optimizer", {"state": {}, "param_groups": "x"}, "optimizer['param_groups']"),
    ("optimizer", {"state": {}, "param_groups": [{"params": ["0"]}]}, "optimizer['param_groups'][0]['params']"),
    ("optimizer", {"state": {}, "param_groups": [{"params": [0, 0]}]}, "optimizer['param_groups']"),
    ("optimizer", {"state": [], "param_groups": [{"params": [0]}]}, "optimizer['state']"),
    ("optimizer", {"state": {7: {}}, "param_groups": [{"params": [0]}]}, "optimizer['state']"),
    ("optimizer", {"state": {0: 1.0}, "param_groups": [{"params": [0]}]}, "optimizer['state'][0]"),
]


@pytest.mark.parametrize("key, value, field", BAD, ids=[f"{i:02d}-{field}" for i, (_, _, field) in enumerate(BAD)])
def test_a_bad_field_is_named_and_the_run_is_left_alone(finished, tmp_path, key, value, field):
    rd, ckpt = edited(finished, tmp_path, **{key: value})
    before = snapshot(rd)
    with pytest.raises(CheckpointError, match=refused(ckpt, field)):
        read_for_resume(rd, progress=False, extend_to=None)
    with pytest.raises(CheckpointError, match=refused(ckpt, field)):
        fit(tiny_config(), rd, resume=True)
    with pytest.raises(CheckpointError, match=refused(ckpt, field)):
        fit(tiny_config(), rd, resume=True, epochs=2)  # an extension rewrites the run: not before the check
    assert snapshot(rd) == before


def test_a_valid_checkpoint_still_resumes_and_older_ones_lack_some_fields(finished, tmp_path):
    # written before vaekit recorded these: still read
    rd, _ = edited(finished, tmp_path, world_size=..., data=..., seconds=..., best=math.inf)
    config, state = read_for_resume(rd, progress=False, extend_to=2)
    assert config.train.epochs == 2 and state["epoch"] == 1
    rd, _ = edited(finished, tmp_path / "none", data=None)
    read_for_resume(rd, progress=False, extend_to=None)
    rd, _ = edited(finished, tmp_path / "as_written")
    result = fit(tiny_config(), rd, resume=True, epochs=2)
    assert result.trained and not result.interrupted and len(result.history) == 4


def test_a_data_position_past_the_epoch_is_named_before_anything_is_written(finished, tmp_path):
    # the form is read_for_resume's to check; the place, against the data loaded, restore's
    rd, ckpt = edited(finished, tmp_path, batches={"epoch": 0, "position": 10**6, "seed": 0})
    before = snapshot(rd)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ckpt))} cannot be resumed: batches\['position'\] "
                                              rf"must be <= \d+ batches, got 1000000"):
        fit(tiny_config(), rd, resume=True, epochs=2)
    assert snapshot(rd) == before


def test_restore_names_a_random_number_state_the_process_cannot_take(finished, tmp_path):
    # read_for_resume refuses a bad CPU state; a device's (CUDA's) is known only to restore,
    # whose refusal this is (shown with the CPU's, which read_for_resume would have caught)
    from vaekit.batching import BatchIterator
    from vaekit.data import load_dataset
    from vaekit.models import VAE, ModelConfig

    config, state = read_for_resume(finished, progress=False, extend_to=None)
    model = VAE(ModelConfig(**{**config.model.__dict__, "input_shape": (1, 8, 8)}))
    batches = BatchIterator(load_dataset(config.data).train, config.train.batch_size, shuffle=True, seed=0)
    bad = {**state, "rng": [{"cpu": torch.zeros_like(state["rng"][0]["cpu"])}]}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'checkpoint.pt'))} cannot be resumed: "
                                              rf"rng\[0\] is not a random-number state this process can take"):
        restore(bad, tmp_path / "checkpoint.pt", model=model, optimizer=torch.optim.Adam(model.parameters()),
                batches=batches, device=torch.device("cpu"), rank=0, world=1)
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_cli_says_it_in_one_line_and_exits_2(finished, tmp_path, capsys):
    rd, ckpt = edited(finished, tmp_path, epoch=-1)
    before = snapshot(rd)
    rc, _, err = call(["train", "--resume", rd, "--epochs", 2, "--no-progress"], capsys)
    assert_usage_error(rc, err, rf"{re.escape(str(ckpt))} cannot be resumed: epoch must be an int >= 0, got -1$")
    assert snapshot(rd) == before


def test_a_data_dir_that_cannot_be_resolved_is_named(tmp_path):
    """A run's data moved to a link that leads to itself: refused naming data_dir, before
    anything is written (Path.resolve raises RuntimeError for a loop before Python 3.13)."""
    x = (np.random.default_rng(0).random((300, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x, x_test=x[:50])
    rd = tmp_path / "run"
    fit(tiny_config(train__epochs=1, data__dataset="array", data__data_dir=str(tmp_path / "a.npz")), rd)
    (tmp_path / "loop.npz").symlink_to(tmp_path / "loop.npz")
    before = snapshot(rd)
    with pytest.raises(ValueError, match=r"^data_dir '\S+loop\.npz': cannot be resolved \("):
        read_for_resume(rd, progress=False, extend_to=2, data_dir=str(tmp_path / "loop.npz"))
    assert snapshot(rd) == before


def adam(n, **entries):
    """An edit of the checkpoint: parameter ``n``'s Adam state updated (a value of ``...``: removed)."""
    def edit(state):
        entry = state["optimizer"]["state"][n]
        entry.update({k: v for k, v in entries.items() if v is not ...})
        for k in (k for k, v in entries.items() if v is ...):
            del entry[k]
    return edit


def adam_group(**settings):
    """An edit of the checkpoint: its optimiser's parameter group with ``settings``."""
    def edit(state):
        state["optimizer"]["param_groups"][0].update(settings)
    return edit


def model_tensor(index, dtype):
    """An edit of the checkpoint: its ``index``-th model tensor cast to ``dtype``."""
    def edit(state):
        key = list(state["model"])[index]
        state["model"][key] = state["model"][key].to(dtype)
    return edit


ADAM = r"optimizer\['state'\]\[0\]"
AGAINST_THE_MODEL = [  # (edit of the checkpoint, the error after "cannot be resumed: ")
    # the fused CPU Adam wrote past the end of this one: exit 134 or 139
    (adam(0, exp_avg=torch.zeros(1)),
     rf"{ADAM}\['exp_avg'\] must be a torch\.float32 tensor of shape \(16, 64\) \(parameter \S+\.weight's\), "
     rf"got a torch\.float32 tensor of shape \(1,\) on cpu$"),
    (adam(1, exp_avg_sq=torch.zeros(16, dtype=torch.float64)),
     r"optimizer\['state'\]\[1\]\['exp_avg_sq'\] must be a torch\.float32 tensor of shape \(16,\) "
     r"\(parameter \S+\.bias's\), got a torch\.float64 tensor"),
    (adam(0, max_exp_avg_sq=torch.zeros(3, 3)), rf"{ADAM}\['max_exp_avg_sq'\] must be a torch\.float32 tensor"),
    (adam(0, exp_avg_sq=...), rf"{ADAM}\['exp_avg_sq'\] must be .*, got None$"),
    (adam(0, step="x"),
     rf"{ADAM}\['step'\] must be a 0-dim floating-point tensor >= 0 \(the parameter's Adam step count\), got 'x'$"),
    (adam(0, step=torch.zeros(0)), rf"{ADAM}\['step'\] must be a 0-dim"),
    (adam(0, step=torch.tensor(-1.0)), rf"{ADAM}\['step'\] must be a 0-dim"),
    # the moments would start again from zero, with no word
    (lambda state: state["optimizer"]["state"].pop(0),
     r"optimizer\['state'\] has no Adam state for parameter 0 \(\S+\.weight\), though the run has taken \d+ "
     r"optimiser steps$"),
    # Adam's arithmetic other than the run's config gives: maximize climbed the loss
    (adam_group(maximize=True),
     r"optimizer\['param_groups'\]\[0\]\['maximize'\] must be False, as the run's config gives, got True$"),
    (adam_group(betas=(0.5, 0.9)),
     r"optimizer\['param_groups'\]\[0\]\['betas'\] must be \(0\.9, 0\.999\), as the run's config gives, "
     r"got a tuple of 2 items$"),
    (adam_group(weight_decay=0.1), r"optimizer\['param_groups'\]\[0\]\['weight_decay'\] must be 0\.0, as"),
    (adam_group(amsgrad=True), r"optimizer\['param_groups'\]\[0\]\['amsgrad'\] must be False, as"),
    (adam_group(lr=math.nan), r"optimizer\['param_groups'\]\[0\]\['lr'\] must be a finite number >= 0, got nan$"),
    (adam_group(lr=-1e-3), r"optimizer\['param_groups'\]\[0\]\['lr'\] must be a finite number >= 0, got -0\.001$"),
    # load_state_dict would cast these
    (model_tensor(0, torch.int32), r"model\['\S+'\] must be a torch\.float32 tensor, as the model's, got a "
                                   r"torch\.int32 tensor"),
    (model_tensor(-1, torch.float64), r"model\['\S+'\] must be a torch\.float32 tensor, as the model's, got a "
                                      r"torch\.float64 tensor"),
]


@pytest.mark.parametrize("edit, message", AGAINST_THE_MODEL, ids=[f"{i:02d}" for i in range(len(AGAINST_THE_MODEL))])
def test_optimiser_state_and_model_tensors_unlike_the_model_are_named(finished, tmp_path, capsys, edit, message):
    """What only the model tells: each Adam state of its parameter's shape and dtype (a
    smaller exp_avg made the fused CPU Adam write outside its memory: exit 134/139), a
    parameter with no state once the optimiser has stepped, model tensors of the model's
    dtype. Refused before anything is written; from the CLI, one line and exit 2."""
    rd = tmp_path / "run"
    shutil.copytree(finished, rd)
    ckpt = rd / "checkpoint.pt"
    state = {k: v for k, v in load_checkpoint(ckpt).items() if k not in ("format", "format_version")}
    edit(state)
    save_checkpoint(ckpt, state)
    before = snapshot(rd)
    pattern = rf"^{re.escape(str(ckpt))} cannot be resumed: {message}"
    with pytest.raises(CheckpointError, match=pattern):
        fit(tiny_config(), rd, resume=True)  # a finished run: nothing would be trained, were it let through
    with pytest.raises(CheckpointError, match=pattern):
        fit(tiny_config(), rd, resume=True, epochs=2)
    rc, _, err = call(["train", "--resume", rd, "--epochs", 2, "--no-progress"], capsys)
    assert_usage_error(rc, err, pattern[1:])
    assert snapshot(rd) == before


def test_a_parameter_without_adam_state_resumes_where_no_step_was_taken(finished, tmp_path):
    """Adam makes a parameter's state in its first step: a run whose every step so far was
    skipped (non-finite) has none, and resumes."""
    state = load_checkpoint(finished / "checkpoint.pt")
    rd, _ = edited(finished, tmp_path, skipped=state["step"], optimizer={**state["optimizer"], "state": {}})
    result = fit(tiny_config(), rd, resume=True, epochs=2)
    assert result.trained and len(result.history) == 4


def test_how_a_saved_adam_ran_is_this_process_choice_not_the_checkpoints(finished, tmp_path):
    """A group's fused / foreach / capturable / differentiable say how the process that
    saved it ran the update, not what the update is: the resumed run takes its own, and
    trains what the unedited checkpoint trains, bit for bit."""
    plain = tmp_path / "plain"
    shutil.copytree(finished, plain)
    optimizer = load_checkpoint(finished / "checkpoint.pt")["optimizer"]
    group = optimizer["param_groups"][0]
    group.update(fused=not group["fused"], foreach=True, capturable=True, differentiable=True)
    rd, _ = edited(finished, tmp_path, optimizer=optimizer)
    a = fit(tiny_config(), plain, resume=True, epochs=2)
    b = fit(tiny_config(), rd, resume=True, epochs=2)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    sa, sb = load_checkpoint(plain / "checkpoint.pt"), load_checkpoint(rd / "checkpoint.pt")
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    assert sb["optimizer"]["param_groups"][0]["capturable"] is False


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_resume_of_a_cuda_run_without_cuda_names_the_saved_device(finished, tmp_path, monkeypatch, device):
    """A run saved with train.device 'cuda' resumed where there is no CUDA: --resume takes no
    --device, so the error says the device is the run's and where to resume it."""
    saved = load_checkpoint(finished / "checkpoint.pt")["config"]
    rd, _ = edited(finished, tmp_path, config={**saved, "train": {**saved["train"], "device": device}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = snapshot(rd)
    with pytest.raises(ValueError, match=rf"^train\.device is '{device}' in the saved config of {re.escape(str(rd))}, "
                                         r"but no CUDA device is available: .*resume it on a machine with CUDA$"):
        fit(tiny_config(), rd, resume=True, epochs=2)
    assert snapshot(rd) == before
