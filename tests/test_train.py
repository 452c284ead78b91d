"""vaekit.train pieces not covered through the command line: the device choice, the
TensorBoard hook, extending a run (``resume=True, epochs=N``) and the time budget."""

import dataclasses
import shutil
import threading

import pytest
import torch

import vaekit.train as train
from test_cli import snapshot, steps_per_epoch, tiny_config
from vaekit.cli import build_config
from vaekit.io import load_checkpoint, read_json, save_checkpoint


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
    args = ["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--no-progress", "--run-dir", str(run)]
    assert main(args) == 0
    assert (run / "checkpoint.pt").is_file() and not list(run.glob(".*.tmp"))
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
    ({}, 1, ValueError, r"^epochs \(--epochs\) must be greater than the 1 epochs \S+ has done, got 1$"),
    ({}, 0, ValueError, r"greater than the 1 epochs \S+ has done, got 0$"),
    ({}, 2.0, TypeError, r"^epochs \(--epochs\) must be an integer, got 2\.0$"),
    ({}, True, TypeError, r"must be an integer, got True$"),
    ({"train__epochs": 3, "train__early_stopping": 1, "since_best": 1}, 3, ValueError,
     r"cannot extend \S+: it stopped early after epoch 1, 1 epochs without a better validation ELBO "
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
    save, step = train.save_checkpoint, train._eager_step

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
