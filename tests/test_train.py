"""vaekit.train pieces not covered through the command line: the learning-rate schedule,
the device choice and the TensorBoard hook."""

import math

import pytest
import torch

import vaekit.train as train
from vaekit.cli import build_config
from vaekit.config import TrainConfig


def test_cosine_learning_rate_is_the_closed_form():
    cfg = TrainConfig(lr=0.01, lr_schedule="cosine")
    total = 40
    for step in (0, 1, 13, 20, 39, 40, 55):
        expected = 0.5 * 0.01 * (1 + math.cos(math.pi * min(step, total) / total))
        assert train.lr_at(step, total, cfg) == pytest.approx(expected, abs=1e-15)
    assert train.lr_at(7, total, TrainConfig(lr=0.01)) == 0.01


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
