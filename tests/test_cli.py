"""The command line (``vaekit train | evaluate | sample``) and the run directory it leaves.

Commands run in-process through :func:`vaekit.cli.main`, which returns the exit status;
a real process (``python -m vaekit``) only where the test is about the process itself.
The commands called as Python functions, not through ``main``, are in test_commands.py.
Every training run is tiny: the bundled 8x8 digits, one hidden layer of 16, two epochs.
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import stat
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.distributions import Independent, Normal, kl_divergence

import vaekit.data
import vaekit.losses
import vaekit.models
import vaekit.pixelcnn
import vaekit.objectives
import vaekit.config
import vaekit.train
from vaekit.cli import build_config, main
from vaekit.data import load_dataset
from vaekit.io import load_checkpoint, read_json
from vaekit.models import VAE
from vaekit.plots import image_grid
from vaekit.config import GROUPS, RunConfig
from vaekit.train import fit, lr_at

TINY = ["--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--batch-size", "128",
        "--no-progress", "--num-threads", "1"]
ENV = {**{k: v for k, v in os.environ.items() if k != "VAEKIT_DEBUG"}, "OMP_NUM_THREADS": "1"}
RUN_FILES = ("config.json", "model/model.safetensors", "model/config.json", "metrics.csv",
             "curves.png", "reconstructions.png", "samples.png", "traversals.png", "checkpoint.pt")


# -- helpers (test_reliability.py imports them) ---------------------------------------


@pytest.fixture(autouse=True)
def no_debug_tracebacks(monkeypatch):
    """VAEKIT_DEBUG=1 turns the one-line errors into tracebacks: not what is tested here."""
    monkeypatch.delenv("VAEKIT_DEBUG", raising=False)


def snapshot(directory) -> dict:
    """``relative path -> sha256`` of every file under ``directory`` (``<dir>`` for folders)."""
    root = Path(directory)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def run_cli(*args, timeout: float = 120):
    """``python -m vaekit ARGS`` in a real process: (status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def call(argv, capsys):
    """``vaekit.cli.main(argv)`` in-process: (status, stdout, stderr). An exception that
    escapes ``main`` is what a user would see as a traceback, so it fails the test."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except BaseException as e:  # SystemExit included: main returns its status
        pytest.fail(f"main({[str(a) for a in argv]}) raised {type(e).__name__}: {e} (a traceback for the user)")
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, err: str, pattern: str) -> None:
    """Status 2, no traceback, and stderr is one line ``vaekit: error: ...`` matching ``pattern``."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaekit: error: "), f"stderr is not one error line: {err!r}"
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
    assert rc == 2, f"status {rc} for {lines[0]!r}"


def steps_per_epoch(config: RunConfig) -> int:
    return math.ceil(load_dataset(config.data).train.shape[0] / config.train.batch_size)


def tiny_config(**overrides) -> RunConfig:
    """The TINY run as a RunConfig (``group__field=value`` overrides more)."""
    base = {"train.epochs": 2, "model.hidden": (16,), "model.latent_dim": 2, "train.batch_size": 128,
            "train.progress": False, "train.num_threads": 1}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return build_config(None, None, base)


# -- one trained run shared by the tests that only read it ----------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--run-dir", str(rd), *TINY]) == 0
    return rd


def test_run_directory_holds_config_model_metrics_pictures_and_checkpoint(run):
    for name in RUN_FILES:
        assert (run / name).is_file(), f"{name} missing from the run directory"
    config = RunConfig.from_dict(read_json(run / "config.json"))  # the resolved config loads back
    assert (config.model.hidden, config.model.latent_dim) == ((16,), 2)
    assert (config.train.epochs, config.train.batch_size, config.data.dataset) == (2, 128, "digits")
    data = load_dataset(config.data)
    assert config.model.input_shape == tuple(data.train.shape[1:])
    meta = read_json(run / "model" / "config.json")
    assert meta["class"] == "VAE" and meta["model"]["latent_dim"] == 2
    assert tuple(meta["model"]["input_shape"]) == tuple(data.train.shape[1:])

    spe = steps_per_epoch(config)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["split"]) for r in rows] == [("1", "train"), ("1", "val"), ("2", "train"), ("2", "val")]
    for r in rows:
        assert int(r["step"]) == spe * int(r["epoch"]) and int(r["skipped"]) == 0
        rec, kl, elbo = float(r["reconstruction"]), float(r["kl"]), float(r["elbo"])
        assert all(map(math.isfinite, (rec, kl, elbo))) and kl >= 0
        assert elbo == pytest.approx(-(rec + kl), rel=1e-6)
    for name in ("curves.png", "reconstructions.png", "samples.png", "traversals.png"):
        with Image.open(run / name) as im:
            im.verify()

    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["step"], state["epoch"]) == (2 * spe, 2)
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in weights.items()}


def test_run_files_get_ordinary_permissions(run):
    # Written through a temporary file (mkstemp makes 0600): the final files must still be
    # readable as the umask allows, like the pictures, or a shared run cannot be read.
    mask = os.umask(0)
    os.umask(mask)
    for name in RUN_FILES:
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~mask, name


def test_sample_writes_the_models_samples_as_a_png(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc, stdout, _ = call(["sample", run, "-n", 16, "-o", out], capsys)
    assert rc == 0 and str(out) in stdout
    model = VAE.from_pretrained(run / "model").eval()
    expected = image_grid(model.sample(16, generator=torch.Generator().manual_seed(0)), nrow=8)
    with Image.open(out) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im)
    h, w = expected.shape[:2]
    scale = pixels.shape[0] // h
    assert scale >= 1 and pixels.shape[:2] == (scale * h, scale * w)  # 2 rows of 8 images, enlarged
    np.testing.assert_array_equal(pixels[::scale, ::scale], expected)
    rc, _, _ = call(["sample", run, "-n", 16, "-o", tmp_path / "other.png", "--seed", 1], capsys)
    with Image.open(tmp_path / "other.png") as im:
        assert rc == 0 and not np.array_equal(np.asarray(im), pixels)


def test_sample_to_jpg_writes_a_jpeg(run, tmp_path, capsys):
    out = tmp_path / "grid.jpg"
    rc, _, _ = call(["sample", run, "-n", 4, "-o", out], capsys)
    with Image.open(out) as im:
        assert rc == 0 and im.format == "JPEG"


def test_a_run_on_vectors_trains_to_the_end_and_sample_refuses_in_one_line(tmp_path, capsys):
    """Vectors of 20 values are not images: training ends with status 0 (curves, no image
    pictures), and `vaekit sample` says why it cannot draw a grid, with status 2."""
    np.save(tmp_path / "flat.npy", np.random.default_rng(0).random((60, 20)).astype(np.float32))
    run = tmp_path / "run"
    rc, out, err = call(["train", "--run-dir", run, *TINY, "--dataset", "array", "--data-dir", tmp_path / "flat.npy",
                         "--binarize", "none", "--likelihood", "gaussian"], capsys)
    assert rc == 0 and "trained 2 epochs" in out, err
    assert (run / "curves.png").exists() and not (run / "samples.png").exists()
    rc, _, err = call(["sample", run, "-o", tmp_path / "s.png"], capsys)
    assert rc == 2 and "models data of shape (20,), not images" in err and not (tmp_path / "s.png").exists()


def test_sample_draws_a_run_on_flat_square_vectors_as_training_drew_it(tmp_path, capsys):
    """[N, 16] vectors show as 4x4 images (training drew samples.png so): `vaekit sample`
    draws them the same way, the same picture for the same seed."""
    np.save(tmp_path / "flat.npy", np.random.default_rng(0).random((60, 16)).astype(np.float32))
    run = tmp_path / "run"
    rc, _, err = call(["train", "--run-dir", run, *TINY, "--dataset", "array", "--data-dir", tmp_path / "flat.npy"],
                      capsys)
    assert rc == 0, err
    rc, _, err = call(["sample", run, "-o", tmp_path / "s.png"], capsys)
    assert rc == 0, err
    with Image.open(tmp_path / "s.png") as drawn, Image.open(run / "samples.png") as trained:
        np.testing.assert_array_equal(np.asarray(drawn), np.asarray(trained))


def _array_run(tmp_path, rng, capsys):
    """A TINY run trained on 60 random 16-vectors in ``tmp_path/a/flat.npy``."""
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "flat.npy", rng.random((60, 16)).astype(np.float32))
    rd = tmp_path / "run-a"
    rc, _, err = call(["train", "--run-dir", rd, *TINY, "--dataset", "array", "--data-dir", tmp_path / "a" / "flat.npy"],
                      capsys)
    assert rc == 0, err
    return rd


def test_evaluate_finds_moved_data_with_data_dir_and_checks_they_are_the_runs(tmp_path, run, capsys):
    """A run records its data as an absolute path; on another machine (or after a move)
    --data-dir says where they are now. Other data are refused while the checkpoint can
    tell; a digits run has no files to point at."""
    rng = np.random.default_rng(0)
    rd = _array_run(tmp_path, rng, capsys)
    rc, _, err = call(["evaluate", rd], capsys)
    assert rc == 0, err
    before = read_json(rd / "metrics-test.json")
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "flat.npy").rename(tmp_path / "b" / "flat.npy")
    rc, _, err = call(["evaluate", rd], capsys)
    assert_usage_error(rc, err, r"names data that are missing: .*\(or give --data-dir where they are now\)")
    rc, _, err = call(["evaluate", rd, "--data-dir", tmp_path / "b" / "flat.npy"], capsys)
    assert rc == 0, err
    after = read_json(rd / "metrics-test.json")
    assert (after["elbo"], after["kl"]) == (before["elbo"], before["kl"])
    assert before["data_dir"] == str((tmp_path / "a" / "flat.npy").resolve())  # the files scored, recorded
    assert after["data_dir"] == str(tmp_path / "b" / "flat.npy")
    np.save(tmp_path / "other.npy", rng.random((60, 16)).astype(np.float32))
    rc, _, err = call(["evaluate", rd, "--data-dir", tmp_path / "other.npy"], capsys)
    assert_usage_error(rc, err, r"--data-dir .*other\.npy: these are not the data .*run-a trained on \(46 training "
                                r"examples of shape \(16,\), hash [0-9a-f]{16}; its checkpoint records 46 of "
                                r"shape \(16,\), hash [0-9a-f]{16}\)")
    assert read_json(rd / "metrics-test.json") == after  # nothing written
    rc, _, err = call(["evaluate", rd, "--data-dir", tmp_path / "none.npy"], capsys)
    assert_usage_error(rc, err, r"--data-dir .*none\.npy: ")
    rc, _, err = call(["evaluate", run, "--data-dir", tmp_path], capsys)
    assert_usage_error(rc, err, r"--data-dir: .* was trained on 'digits', which is made in memory")


def test_resume_finds_moved_data_with_data_dir_and_records_where(tmp_path, run, capsys):
    """--resume RUN --data-dir DIR: the run goes on with its data where they are now (the
    same data, checked), and records the new place for a later plain resume or evaluate."""
    rng = np.random.default_rng(1)
    rd = _array_run(tmp_path, rng, capsys)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "flat.npy").rename(tmp_path / "b" / "flat.npy")
    np.save(tmp_path / "other.npy", rng.random((60, 16)).astype(np.float32))
    rc, _, err = call(["train", "--resume", rd, "--epochs", "3", "--data-dir", tmp_path / "other.npy"], capsys)
    assert_usage_error(rc, err, r"cannot be resumed on other training data: dataset 'array' \(\S*other\.npy\) now")
    rc, out, err = call(["train", "--resume", rd, "--epochs", "3", "--data-dir", tmp_path / "b" / "flat.npy"], capsys)
    assert rc == 0 and "vaekit: trained 1 more epoch (3 in all); " in out, err
    where = str((tmp_path / "b" / "flat.npy").resolve())
    assert read_json(rd / "config.json")["data"]["data_dir"] == where
    assert load_checkpoint(rd / "checkpoint.pt")["config"]["data"]["data_dir"] == where
    rc, _, err = call(["evaluate", rd], capsys)  # the new place, recorded
    assert rc == 0, err
    (tmp_path / "c").mkdir()  # moved again: a finished run records the move and trains nothing
    (tmp_path / "b" / "flat.npy").rename(tmp_path / "c" / "flat.npy")
    before = load_checkpoint(rd / "checkpoint.pt")
    rc, out, err = call(["train", "--resume", rd, "--data-dir", tmp_path / "c" / "flat.npy"], capsys)
    assert rc == 0 and "is finished (3 epochs); nothing to train" in out and "new place of its data" in out, err
    after = load_checkpoint(rd / "checkpoint.pt")
    where = str((tmp_path / "c" / "flat.npy").resolve())
    assert after["config"]["data"]["data_dir"] == read_json(rd / "config.json")["data"]["data_dir"] == where
    assert after["step"] == before["step"] and after["history"] == before["history"]
    rc, _, err = call(["train", "--resume", run, "--data-dir", tmp_path], capsys)
    assert_usage_error(rc, err, r"data_dir: .* trains on 'digits', which is made in memory")


def test_quick_disentanglement_scores_say_so_in_the_metrics_file(tmp_path, capsys):
    run = tmp_path / "sprites"
    rc, _, err = call(["train", "--run-dir", run, "--dataset", "sprites", "--sprites-count", 300, "--hidden", 16,
                       "--latent-dim", 4, "--epochs", 1, "--no-progress"], capsys)
    assert rc == 0, err
    rc, _, err = call(["evaluate", run, "--disentanglement", "--quick", "--no-progress"], capsys)
    metrics = read_json(run / "metrics-test.json")
    assert rc == 0 and metrics["disentanglement_quick"] is True and 0 <= metrics["beta_vae"] <= 1, err
    # the scores' time apart from the likelihood estimate's ("seconds"), which it used to pass for
    assert metrics["disentanglement_seconds"] > 0 and metrics["seconds"] > 0


def test_evaluate_scores_a_dynamically_binarized_training_split_on_one_fixed_draw(run, monkeypatch, capsys):
    """The training images of a dynamic-binarization run are grey; scored with a Bernoulli
    likelihood they gave no log-likelihood. They are binarized once, the same draw each time."""
    import vaekit.evaluate
    from vaekit.data import binarize_dynamic

    seen, real = [], vaekit.evaluate.evaluate_model
    monkeypatch.setattr(vaekit.evaluate, "evaluate_model", lambda model, x, **kw: (seen.append(x), real(model, x, **kw))[1])
    for _ in range(2):
        rc, _, err = call(["evaluate", run, "--split", "train", "--limit", 50], capsys)
        assert rc == 0, err
    config = RunConfig.from_dict(read_json(run / "config.json"))
    assert config.data.binarize == "dynamic"
    grey = load_dataset(config.data).train[:50]
    want = binarize_dynamic(grey, torch.Generator().manual_seed(config.data.seed + 2))
    assert torch.equal(seen[0], want) and torch.equal(seen[1], want) and not torch.equal(want, grey)


def test_a_run_records_where_its_data_are_so_it_evaluates_from_anywhere(tmp_path, monkeypatch, capsys):
    (tmp_path / "a" / "arr").mkdir(parents=True)
    np.save(tmp_path / "a" / "arr" / "u8.npy", np.random.default_rng(0).integers(0, 256, (60, 4, 4), np.uint8))
    monkeypatch.chdir(tmp_path / "a")
    rc, _, err = call(["train", "--run-dir", tmp_path / "run", *TINY, "--dataset", "array", "--data-dir",
                       "arr/u8.npy"], capsys)  # relative to this directory
    assert rc == 0, err
    recorded = read_json(tmp_path / "run" / "config.json")["data"]["data_dir"]
    assert recorded == str((tmp_path / "a" / "arr" / "u8.npy").resolve())
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(["evaluate", tmp_path / "run"], capsys)
    assert rc == 0, err


def _test_data(run):
    return load_dataset(RunConfig.from_dict(read_json(run / "config.json")).data).test


def test_evaluate_prints_a_table_and_writes_metrics_checked_by_hand(run, capsys):
    rc, out, _ = call(["evaluate", run], capsys)
    assert rc == 0
    m = read_json(run / "metrics-test.json")
    assert {"elbo", "reconstruction", "kl"} <= set(m) and "iw_nll" not in m
    assert (m["seed"], m["batch_size"]) == (0, 500)  # the estimates depend on both: recorded
    for key in ("elbo", "reconstruction", "kl"):
        assert re.search(rf"^{key}\s+{re.escape(f'{m[key]:.4f}')}$", out, re.M), out

    torch.manual_seed(0)
    model, x = VAE.from_pretrained(run / "model").eval(), _test_data(run)
    n = x.shape[0]
    with torch.no_grad():
        q = model.encode(x)
        prior = Independent(Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean)), 1)
        assert m["kl"] == pytest.approx(float(kl_divergence(q, prior).mean()), rel=1e-5)
        z = q.sample((64,))  # [64, N, d]: a Monte Carlo reconstruction term to compare with
        nll = model.nll(model.decode(z.flatten(0, 1)), x.repeat(64, 1, 1, 1)).view(64, n).double()
    se = math.sqrt(float(nll.var(0).mean()) * (1 + 1 / 64) / n)
    assert abs(m["reconstruction"] - float(nll.mean())) < 6 * se + 1e-4
    assert m["elbo"] == pytest.approx(-(m["reconstruction"] + m["kl"]), rel=1e-6)

    rc, out, _ = call(["evaluate", run, "--iw-samples", 10], capsys)
    m10 = read_json(run / "metrics-test.json")
    iw_text = f"{m10['iw_nll']:.4f}"
    assert rc == 0 and re.search(rf"^iw_nll\s+{re.escape(iw_text)}$", out, re.M), out
    assert m10["elbo"] == pytest.approx(m["elbo"], rel=1e-12)  # the ELBO draws do not move
    with torch.no_grad():  # 16 independent IWAE-10 estimates from torch.distributions
        z = q.sample((16, 10))  # [16, 10, N, d]
        log_px = -model.nll(model.decode(z.reshape(-1, z.shape[-1])), x.repeat(160, 1, 1, 1)).view(16, 10, n)
        log_w = log_px + prior.log_prob(z) - q.log_prob(z)
        iw = -(torch.logsumexp(log_w.double(), 1) - math.log(10))  # [16, N]
    se = math.sqrt(float(iw.var(0).mean()) * (1 + 1 / 16) / n)
    assert abs(m10["iw_nll"] - float(iw.mean())) < 6 * se + 1e-4


def test_evaluate_iw_nll_is_the_documented_estimate_recomputed_by_hand(run, tmp_path, capsys):
    """metrics-test.json's iw_nll, recomputed exactly: per batch of --batch-size examples the
    noise of its k samples is drawn in blocks randn(min(64, left), B, d)
    (vaekit.evaluate.iw_log_likelihood) by one generator seeded with --seed + 1 (the ELBO's
    draws take --seed itself); log w = log p(x|z) + log N(z; 0, I) - log q(z|x), by
    torch.distributions. bits_per_dim is iw_nll / (D ln 2)."""
    rd = tmp_path / "run"
    shutil.copytree(run, rd)  # the shared run's metrics files stay as other tests left them
    k, batch, seed = 100, 128, 5
    rc, _, err = call(["evaluate", rd, "--iw-samples", k, "--batch-size", batch, "--seed", seed, "--device", "cpu"],
                      capsys)
    assert rc == 0, err
    m = read_json(rd / "metrics-test.json")
    model, x = VAE.from_pretrained(rd / "model").eval(), _test_data(rd)
    assert x.shape[0] > 2 * batch and set(x.unique().tolist()) == {0.0, 1.0}  # a short last batch; binary data
    g, log_px = torch.Generator().manual_seed(seed + 1), []
    with torch.no_grad():
        for xb in x.split(batch):
            mu, logvar = model.encode_params(xb)
            eps = torch.cat([torch.randn(64, *mu.shape, generator=g), torch.randn(k - 64, *mu.shape, generator=g)])
            q = Normal(mu, torch.exp(0.5 * logvar))
            z = q.mean + q.stddev * eps  # [k, B, d]
            logits = model.decode(z.flatten(0, 1)).view(k, len(xb), -1)
            log_w = (-torch.nn.functional.binary_cross_entropy_with_logits(
                logits, xb.flatten(1).expand(k, -1, -1), reduction="none").sum(-1)
                + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
            log_px.append(torch.logsumexp(log_w.double(), 0) - math.log(k))
    assert (m["iw_samples"], m["seed"], m["batch_size"]) == (k, seed, batch)
    assert m["iw_nll"] == pytest.approx(-float(torch.cat(log_px).mean()), rel=1e-6)
    assert m["bits_per_dim"] == pytest.approx(m["iw_nll"] / (x[0].numel() * math.log(2)), rel=1e-12)


def test_evaluate_limit_scores_the_first_examples_into_its_own_file(run, capsys):
    rc, _, _ = call(["evaluate", run], capsys)
    whole = (run / "metrics-test.json").read_bytes()
    rc, out, _ = call(["evaluate", run, "--limit", 7], capsys)
    assert rc == 0 and "metrics-test-first7.json" in out
    m = read_json(run / "metrics-test-first7.json")
    assert m["n"] == 7 and (run / "metrics-test.json").read_bytes() == whole  # the full result is kept
    model, x = VAE.from_pretrained(run / "model").eval(), _test_data(run)[:7]
    with torch.no_grad():  # the KL of the first 7 examples, from torch.distributions
        q = model.encode(x)
        prior = Independent(Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean)), 1)
        assert m["kl"] == pytest.approx(float(kl_divergence(q, prior).mean()), rel=1e-5)
    n = _test_data(run).shape[0]
    rc, out, _ = call(["evaluate", run, "--limit", n + 1000], capsys)  # the whole split: its own name
    assert rc == 0 and "metrics-test.json" in out and not (run / f"metrics-test-first{n + 1000}.json").exists()
    assert read_json(run / "metrics-test.json")["n"] == n


# -- help ------------------------------------------------------------------------------

CHOICES = {  # fields whose value is one of a fixed set: the help must list the set
    ("data", "dataset"): vaekit.data.DATASETS,
    ("data", "binarize"): vaekit.data.BINARIZATIONS,
    ("data", "split"): vaekit.data.SPLITS,
    ("model", "arch"): vaekit.models.ARCHS,
    ("model", "activation"): tuple(vaekit.models.ACTIVATIONS),
    ("model", "likelihood"): vaekit.losses.RECONSTRUCTIONS,
    ("model", "decoder_variance"): vaekit.models.DECODER_VARIANCES,
    ("model", "pixelcnn_fusion"): vaekit.pixelcnn.FUSIONS,
    ("train", "lr_schedule"): vaekit.config.LR_SCHEDULES,
    ("train", "amp"): vaekit.config.AMP_MODES,
    ("train", "fast"): vaekit.config.FAST_MODES,
    ("objective", "name"): vaekit.objectives.OBJECTIVES,
    ("objective", "beta_schedule"): vaekit.objectives.SCHEDULES,
}


def _help(command, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: no wrapping inside names
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _option_blocks(text: str) -> list[str]:
    """The help text of each option: its line and the lines indented under it."""
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            blocks.append(line)
        elif blocks and line.startswith("   "):
            blocks[-1] += " " + line.strip()
    return blocks


# Fields the run derives (the data decide the input shape), so no flag sets them.
NOT_FLAGS = {("model", "input_shape")}


def test_train_help_documents_every_config_field(monkeypatch, capsys):
    blocks = _option_blocks(_help("train", monkeypatch, capsys))
    for flag in ("--preset", "--config", "--run-dir", "--resume"):
        assert any(re.match(rf"^  {flag}\b", b) for b in blocks), flag
    for group, klass in GROUPS.items():
        for f in dataclasses.fields(klass):
            if (group, f.name) in NOT_FLAGS:
                assert f"--{group}.{f.name.replace('_', '-')}" not in "".join(blocks)
                continue
            flag = f"--{group}.{f.name.replace('_', '-')}"
            block = next((b for b in blocks if re.search(rf"{re.escape(flag)}\b", b)), None)
            assert block is not None, f"{flag} is not in vaekit train --help"
            assert re.search(rf"\({group}\) (?!\[default)\S", block), f"{flag} has no description: {block}"
            # the value a plain `vaekit train` uses (the default preset's), not the dataclass's
            used = getattr(getattr(build_config(), group), f.name)
            shown = re.sub(r"\s+", " ", block.split("[default: ", 1)[-1])
            said = ",".join(map(str, used)) if isinstance(used, tuple) else repr(used)  # as the flag takes it
            assert shown.startswith(f"{said}]"), f"{flag} says [default: {shown} but vaekit train uses {said}"
            assert not re.search(r":\w+:`|``", block), f"{flag}: docstring markup in --help: {block}"
            for choice in CHOICES.get((group, f.name), ()):
                assert re.search(rf"\b{re.escape(choice)}\b", block), f"{flag} does not list {choice!r}: {block}"


@pytest.mark.parametrize("command, flags", [
    ("evaluate", ("--split", "--iw-samples", "--batch-size", "--seed", "--device", "--disentanglement", "--limit",
                  "--num-threads", "--no-progress")),
    ("sample", ("-n", "--output", "--seed", "--nrow")),
])
def test_evaluate_and_sample_help_document_every_flag(command, flags, monkeypatch, capsys):
    text = _help(command, monkeypatch, capsys)
    assert "RUN" in text
    blocks = _option_blocks(text)
    for flag in flags:
        block = next((b for b in blocks if re.search(rf"(^  |, ){re.escape(flag)}\b", b)), None)
        assert block is not None and len(block.split()) > 3, f"{command} --help: {flag} undocumented"


@pytest.mark.parametrize("command, flags", [
    ("evaluate", ("--split", "--iw-samples", "--batch-size", "--seed", "--device", "--limit", "--num-threads",
                  "--precision")),
    ("sample", ("-n", "--output", "--seed", "--nrow")),
])
def test_evaluate_and_sample_help_show_each_default(command, flags, monkeypatch, capsys):
    blocks = _option_blocks(_help(command, monkeypatch, capsys))
    for flag in flags:
        block = next(b for b in blocks if re.search(rf"(^  |, ){re.escape(flag)}\b", b))
        assert "[default: " in block, f"{command} --help: {flag} does not show its default: {block}"


def test_sample_help_says_where_a_relative_output_goes(monkeypatch, capsys):
    block = next(b for b in _option_blocks(_help("sample", monkeypatch, capsys)) if "--output" in b)
    assert re.sub(r"\s+", " ", block).endswith("output image file, .png or .jpg; a relative path is taken from the "
                                               "current directory, not RUN [default: samples.png, in the current "
                                               "directory]")


def test_top_level_help_lists_the_commands(monkeypatch, capsys):
    text = _help(None, monkeypatch, capsys)
    assert all(re.search(rf"\b{c}\b", text) for c in ("train", "evaluate", "sample"))


# -- reproducibility and persistence ---------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(run, tmp_path):
    assert main(["train", "--run-dir", str(tmp_path / "same"), *TINY]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "other"), *TINY, "--seed", "1"]) == 0
    ref = load_file(str(run / "model" / "model.safetensors"))
    same = load_file(str(tmp_path / "same" / "model" / "model.safetensors"))
    other = load_file(str(tmp_path / "other" / "model" / "model.safetensors"))
    assert set(ref) == set(same) == set(other)
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref)
    last_ref = load_checkpoint(run / "checkpoint.pt")["model"]
    last_same = load_checkpoint(tmp_path / "same" / "checkpoint.pt")["model"]
    assert all(torch.equal(last_ref[k], last_same[k]) for k in last_ref)


def test_resolved_config_json_reproduces_the_run(run, tmp_path):
    assert main(["train", "--config", str(run / "config.json"), "--run-dir", str(tmp_path / "again")]) == 0
    ref = load_file(str(run / "model" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model" / "model.safetensors"))
    assert set(ref) == set(again) and all(torch.equal(ref[k], again[k]) for k in ref)


def _metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_with_epochs_extends_a_finished_run(run, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(run, rd)
    before = _metrics(rd)
    rc, out, err = call(["train", "--resume", rd, "--epochs", "4", "--no-progress"], capsys)
    assert rc == 0, err
    assert "vaekit: trained 2 more epochs (4 in all); " in out  # what this call trained, and the run in all
    rows = _metrics(rd)
    assert rows[: len(before)] == before  # the history carries on
    assert [r["epoch"] for r in rows if r["split"] == "train"] == ["1", "2", "3", "4"]
    spe = steps_per_epoch(tiny_config())
    state = load_checkpoint(rd / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["config"]["train"]["epochs"]) == (4, 4 * spe, 4)
    config = RunConfig.from_dict(read_json(rd / "config.json"))
    assert config.train.epochs == 4 and config.train.lr_schedule == "cosine"
    # From the resume point on, the cosine runs over the new total of steps (a row's lr
    # is the one of its epoch's last step).
    for r in rows[len(before):]:
        assert float(r["lr"]) == lr_at(int(r["step"]) - 1, 4 * spe, config.train)
    # A later plain resume finds the run finished: it trains no more, says only that and
    # rewrites nothing (config.json, pictures).
    before = snapshot(rd)
    rc, out, err = call(["train", "--resume", rd, "--no-progress"], capsys)
    assert rc == 0 and out == f"vaekit: {rd} is finished (4 epochs); nothing to train (extend it with --epochs N)\n"
    assert err == "" and snapshot(rd) == before


def test_from_pretrained_reconstructs_like_the_model_fit_returned(tmp_path):
    config = tiny_config(train__epochs=1)  # one epoch: model/ holds the final weights
    result = fit(config, tmp_path / "run")
    loaded = VAE.from_pretrained(tmp_path / "run" / "model")
    assert loaded.config == result.model.config
    x = load_dataset(config.data).test
    result.model.eval()
    loaded.eval()
    assert torch.equal(result.model.reconstruct(x), loaded.reconstruct(x))
    a, b = result.model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


FILE_CONFIG = {
    "model": {"hidden": [16], "latent_dim": 3, "activation": "tanh"},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.005, "num_threads": 1, "progress": False},
    "objective": {"beta": 0.5},
}


def _toml(d: dict) -> str:
    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_then_flags(suffix, tmp_path, capsys):
    path = tmp_path / f"run{suffix}"
    path.write_text(_toml(FILE_CONFIG) if suffix == ".toml" else json.dumps(FILE_CONFIG))
    rd = tmp_path / "run"
    rc, _, err = call(["train", "--config", path, "--latent-dim", 2, "--lr", 0.002, "--run-dir", rd], capsys)
    assert rc == 0, err
    resolved = read_json(rd / "config.json")
    assert resolved["model"]["hidden"] == [16] and resolved["model"]["activation"] == "tanh"  # file
    assert resolved["model"]["latent_dim"] == 2 and resolved["train"]["lr"] == 0.002  # flags win
    assert resolved["train"]["epochs"] == 1 and resolved["train"]["batch_size"] == 64  # file
    assert resolved["objective"]["beta"] == 0.5  # file
    assert resolved["data"]["binarize"] == "dynamic"  # the preset, untouched
    model = VAE.from_pretrained(rd / "model")
    assert (model.config.latent_dim, model.config.activation) == (2, "tanh")


# -- bad input: status 2, one line, nothing changed ------------------------------------

BAD_INPUT = [  # (id, argv with {run}/{empty}/{tmp} placeholders, regex the one-line error must match)
    ("unknown-dataset", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "nope"], r"dataset.*'nope'"),
    ("mnist-without-data", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "mnist",
                            "--data-dir", "{tmp}/no-mnist-here"],
     r"no-mnist-here.*, or add --download to fetch them\.$"),
    ("mnist-data-dir-the-npz-itself", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "mnist",
                                       "--data-dir", "{tmp}/mnist/mnist.npz"],
     r"data_dir '\S+mnist\.npz' is a file; expected the folder that holds the four mnist IDX files or mnist\.npz; "
     r"give its folder, '\S+/mnist'$"),
    ("negative-epochs", ["train", "--run-dir", "{empty}", *TINY, "--epochs", "-1"], r"epochs.*-1"),
    ("unknown-option", ["train", "--run-dir", "{empty}", *TINY, "--no-such-option"], r"--no-such-option"),
    # a prefix is not a flag: argparse would have read --n 16 as --nrow 16
    ("flag-prefix", ["sample", "{run}", "--n", "16", "-o", "{tmp}/prefix.png"], r"unrecognized arguments: --n 16"),
    ("train-flag-prefix", ["train", "--run-dir", "{empty}", *TINY, "--epoch", "2"], r"unrecognized arguments: --epoch 2"),
    ("missing-config", ["train", "--run-dir", "{empty}", "--config", "{tmp}/missing.toml"], r"missing\.toml"),
    ("invalid-toml", ["train", "--run-dir", "{empty}", "--config", "{tmp}/bad.toml"], r"bad\.toml.*TOML"),
    ("invalid-json", ["train", "--run-dir", "{empty}", "--config", "{tmp}/bad.json"], r"bad\.json.*JSON"),
    # named by the file, as a bad value from it is
    ("unknown-config-key", ["train", "--run-dir", "{empty}", "--config", "{tmp}/typo.toml"],
     r"error: --config \S+typo\.toml: unknown key\(s\) in config section 'train': epoch; known: "),
    # only the second file was read
    ("config-twice", ["train", "--run-dir", "{empty}", "--config", "{tmp}/value.json", "--config", "{tmp}/typo.toml"],
     r"argument --config: given twice \(\S+value\.json, then \S+typo\.toml\); give one file \(flags override its "
     r"values\)"),
    # a bad value from the file names the file and its key, not a flag the user did not give
    ("config-bad-value", ["train", "--run-dir", "{empty}", "--config", "{tmp}/value.json"],
     r"error: --config \S+value\.json: model\.latent_dim must be an integer in \[1, 2147483647\], got 'x'$"),
    ("run-dir-not-empty", ["train", "--run-dir", "{run}", *TINY], r"--run-dir.*not empty"),
    ("resume-without-checkpoint", ["train", "--resume", "{empty}"], r"--resume.*checkpoint"),
    ("resume-no-such-directory", ["train", "--resume", "{tmp}/nowhere"], r"--resume \S+nowhere: no such run directory$"),
    ("negative-limit", ["evaluate", "{run}", "--limit", "-3"], r"--limit.*-3"),
    # the default preset binarizes: real values say which setting refuses them
    ("real-values-binarized", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "array", "--data-dir",
                               "{tmp}/real.npy", "--likelihood", "gaussian"],
     r"binarize='dynamic'.*'none' keeps the values\) must lie in \[0, 1\], got values in \[-2, 2\]"),
    # a value the user never set says where it came from
    ("preset-conflict", ["train", "--run-dir", "{empty}", "--preset", "mnist-pixelcnn", "--likelihood", "gaussian",
                         "--binarize", "none"],
     r"error: --likelihood: ModelConfig\.likelihood must be 'bernoulli' when pixelcnn_layers > 0, got 'gaussian'; "
     r"the preset 'mnist-pixelcnn' sets pixelcnn_layers=4 \(--pixelcnn-layers\): override it$"),
    ("quick-without-disentanglement", ["evaluate", "{run}", "--quick"], r"--quick sizes the --disentanglement"),
    ("tf32-on-the-cpu", ["evaluate", "{run}", "--device", "cpu", "--precision", "tf32"],
     r"--precision tf32 is CUDA's arithmetic; on cpu"),
    ("resume-epochs-as-many", ["train", "--resume", "{run}", "--epochs", "2"],
     r"--epochs\).*greater than the 2 epochs \S+ has done, got 2$"),
    ("resume-epochs-fewer", ["train", "--resume", "{run}", "--epochs", "1", "--no-progress"],
     r"--epochs\).*greater than the 2 epochs \S+ has done, got 1$"),
    ("resume-epochs-and-lr", ["train", "--resume", "{run}", "--epochs", "4", "--lr", "0.1"],
     r"--resume.*takes only --epochs, --data-dir and --no-progress, not --lr$"),
    ("resume-run-dir-preset-seed", ["train", "--resume", "{run}", "--run-dir", "{tmp}/x", "--preset", "digits",
                                    "--seed", "1"], r"--resume.*not --preset, --run-dir, --seed$"),
    ("sample-n-0", ["sample", "{run}", "-n", "0", "-o", "{tmp}/never.png"], r"-n\b.*0"),
    ("evaluate-missing-run", ["evaluate", "{tmp}/no-such-run"], r"no-such-run"),
    ("evaluate-seed-too-large", ["evaluate", "{run}", "--seed", str(2**64 - 1)], r"--seed must be an integer in "
                                                                                 r"\[0, 18446744073709551613\]"),
    # a data folder the dataset would not read
    ("data-dir-with-digits", ["train", "--run-dir", "{empty}", *TINY, "--data-dir", "{tmp}"],
     r"data_dir is unused for dataset 'digits'; did you mean --dataset mnist"),
    ("data-dir-with-sprites", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "sprites", "--data-dir", "{tmp}"],
     r"data_dir is unused for dataset 'sprites'"),
    # where the output goes, named by its flag, before anything is loaded
    ("run-dir-a-file", ["train", "--run-dir", "{tmp}/afile", *TINY], r"--run-dir \S+afile is a file, not a directory"),
    ("run-dir-under-a-file", ["train", "--run-dir", "{tmp}/afile/run", *TINY],
     r"--run-dir \S+afile/run: \S+afile is a file, not a directory"),
    ("run-dir-not-writable", ["train", "--run-dir", "/proc/vaekit-run", *TINY],
     r"--run-dir /proc/vaekit-run: cannot create files in /proc"),
    ("sample-to-a-directory", ["sample", "{run}", "-o", "{tmp}/d.png"], r"-o/--output \S+d\.png is a directory"),
    ("sample-under-a-file", ["sample", "{run}", "-o", "{tmp}/afile/never.png"],
     r"-o/--output \S+never\.png: \S+afile is a file, not a directory"),
    ("sample-not-writable", ["sample", "{run}", "-o", "/proc/never.png"],
     r"-o/--output /proc/never\.png: cannot create files in /proc"),
    # found by a sweep of bad input (the fourteenth session): each was a traceback, an
    # unnamed argument, a silent acceptance or several lines
    ("sample-n-too-many", ["sample", "{run}", "-n", "10001", "-o", "{tmp}/never.png"],
     r"-n must be an integer in \[1, 10000\].*got 10001$"),
    ("sample-seed-negative", ["sample", "{run}", "--seed", "-1", "-o", "{tmp}/never.png"],
     r"--seed must be an integer in \[0, 18446744073709551613\], got -1$"),
    # (a grid too large for a JPEG at the run's scale is drawn smaller: these pass 65500 at scale 1)
    ("sample-jpeg-too-tall", ["sample", "{run}", "-n", "6600", "--nrow", "1", "-o", "{tmp}/never.jpg"],
     r"-o/--output \S+never\.jpg: a JPEG image is at most 65500 pixels a side, and this grid is \d+x\d+; "
     r"write a \.png, or put more images in a row \(--nrow\)$"),
    ("sample-jpeg-too-wide", ["sample", "{run}", "-n", "6600", "--nrow", "6600", "-o", "{tmp}/never.jpg"],
     r"this grid is \d+x\d+; write a \.png, or put fewer images in a row \(--nrow\)$"),
    ("pixelcnn-layers-too-many", ["train", "--run-dir", "{empty}", *TINY, "--pixelcnn-layers", "2147483647"],
     r"pixelcnn_layers must be an integer in \[0, 1000\], got 2147483647$"),
    ("batch-size-beyond-int64", ["train", "--run-dir", "{empty}", *TINY, "--batch-size", str(2**63)],
     r"batch_size must be an integer in \[1, 2147483647\], got 9223372036854775808$"),
    ("sprites-count-too-many", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "sprites",
                                "--sprites-count", "2147483648"],
     r"sprites_count must be an int in \[2, 737280\], got 2147483648$"),
    ("iw-samples-beyond-int64", ["train", "--run-dir", "{empty}", *TINY, "--objective", "iwae", "--iw-samples",
                                 str(2**63)], r"iw_samples must be an int in \[1, 1000000\], got 9223372036854775808$"),
    ("config-name-too-long", ["train", "--run-dir", "{empty}", *TINY, "--config", "{tmp}/" + "c" * 300 + ".toml"],
     r"--config \S+\.toml: cannot be read \(File name too long\)$"),
    ("config-a-folder", ["train", "--run-dir", "{empty}", *TINY, "--config", "{tmp}/d.png"],
     r"--config \S+d\.png: a folder, not a file$"),
    ("sample-name-too-long", ["sample", "{run}", "-o", "{tmp}/" + "a" * 300 + ".png"],
     r"-o/--output \S+\.png: File name too long$"),
    ("train-seed-too-large", ["train", "--run-dir", "{empty}", *TINY, "--seed", str(2**63)],
     r"error: --seed: TrainConfig\.seed must be an integer in \[0, 9223372036854775807\], got 9223372036854775808$"),
    ("train-data-seed-too-large", ["train", "--run-dir", "{empty}", *TINY, "--data.seed", str(2**64)],
     r"error: --data\.seed: DataConfig\.seed must be an int in \[0, 9223372036854775807\], got 18446744073709551616$"),
    ("train-epochs-too-many", ["train", "--run-dir", "{empty}", *TINY, "--epochs", str(10**20)],
     r"epochs must be an integer in \[0, 2147483647\], got 100000000000000000000$"),
    ("train-max-steps-too-many", ["train", "--run-dir", "{empty}", *TINY, "--max-steps", str(2**31)],
     r"max_steps must be an integer in \[0, 2147483647\], got 2147483648$"),
    ("resume-epochs-too-many", ["train", "--resume", "{run}", "--epochs", str(2**31)],
     r"epochs \(--epochs\) must be an integer in \[3, 2147483647\], got 2147483648$"),
    ("train-num-threads-too-many", ["train", "--run-dir", "{empty}", *TINY, "--num-threads", "100000"],
     r"num_threads must be an integer in \[0, 1024\], got 100000$"),
    ("evaluate-num-threads-too-many", ["evaluate", "{run}", "--num-threads", "100000"],
     r"--num-threads must be an integer in \[0, 1024\].*got 100000$"),
    ("evaluate-iw-samples-too-many", ["evaluate", "{run}", "--iw-samples", str(10**11)],
     r"--iw-samples must be an integer in \[0, 1000000\], got 100000000000$"),
    ("latent-dim-too-large", ["train", "--run-dir", "{empty}", *TINY, "--latent-dim", str(10**11)],
     r"error: --latent-dim: ModelConfig\.latent_dim must be an integer in \[1, 2147483647\], got 100000000000$"),
    ("fixed-logvar-beyond-float32", ["train", "--run-dir", "{empty}", *TINY, "--likelihood", "gaussian",
                                     "--binarize", "none", "--fixed-logvar", "1e308"],
     r"fixed_logvar must be a number in \[-80, 80\] \(its exp a normal float32\), got 1e\+308$"),
    # the schedule's length is named by the flag (or the file's key) that asked for the schedule
    ("linear-schedule-without-warmup", ["train", "--run-dir", "{empty}", *TINY, "--beta-schedule", "linear"],
     r"error: --beta-schedule linear needs --warmup-steps N >= 1, got 0$"),
    ("cyclical-schedule-without-cycle", ["train", "--run-dir", "{empty}", *TINY, "--beta-schedule", "cyclical"],
     r"error: --beta-schedule cyclical needs --cycle-steps N >= 1, got 0$"),
    ("linear-schedule-in-a-file", ["train", "--run-dir", "{empty}", *TINY, "--config", "{tmp}/linear.json"],
     r"error: --config \S+linear\.json: objective\.beta_schedule 'linear' needs objective\.warmup_steps >= 1 "
     r"\(or --warmup-steps N\), got 0$"),
    ("resume-empty", ["train", "--resume", ""], r"--resume needs a path, got an empty one$"),
    ("config-empty", ["train", "--run-dir", "{empty}", *TINY, "--config", ""], r"--config needs a path, got an empty one$"),
    ("run-dir-empty", ["train", "--run-dir", "", *TINY], r"--run-dir needs a path, got an empty one$"),
    ("evaluate-run-empty", ["evaluate", ""], r"RUN needs a path, got an empty one$"),
    ("evaluate-data-dir-empty", ["evaluate", "{run}", "--data-dir", ""], r"--data-dir needs a path, got an empty one$"),
    ("logvar-limit-not-positive", ["train", "--run-dir", "{empty}", *TINY, "--logvar-limit", "-5"],
     r"logvar_limit must be a number in \(0, 80\] \(its exp a normal float32\), got -5"),
    ("sample-jpeg-path-with-a-colon", ["sample", "{run}", "-n", "6600", "--nrow", "1", "-o", "{tmp}/a: b.jpg"],
     r"-o/--output \S+a: b\.jpg: a JPEG image is at most 65500 pixels a side"),
    ("run-dir-a-link-loop", ["train", "--run-dir", "{tmp}/loop", *TINY],
     r"--run-dir \S+loop is a link that leads to no directory"),
    ("run-dir-name-too-long", ["train", "--run-dir", "{tmp}/" + "a" * 300, *TINY], r"--run-dir \S+: File name too long$"),
    ("array-data-a-folder", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "array", "--data-dir",
                             "{tmp}/dir.npz"], r"data_dir '\S+dir\.npz' is a folder; expected an \.npy or \.npz file$"),
    ("array-data-beyond-float32", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "array", "--binarize",
                                   "none", "--likelihood", "gaussian", "--data-dir", "{tmp}/huge.npy"],
     r"huge\.npy: 240 of 240 values are NaN or infinite \(in float32\)$"),
    ("download-where-no-folder-can-be", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "mnist", "--data-dir",
                                         "/proc/vaekit-mnist", "--download"],
     r"data_dir '/proc/vaekit-mnist': cannot be created to download mnist into"),
    # the fifteenth session: a named pipe blocked the reader forever; a loop of links was "no such file"
    ("array-data-a-pipe", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "array", "--data-dir",
                           "{tmp}/pipe.npy"],
     r"data_dir '\S+pipe\.npy': not a regular file \(a pipe, socket or device\); expected an \.npy or \.npz file$"),
    ("config-a-pipe", ["train", "--run-dir", "{empty}", *TINY, "--config", "{tmp}/pipe.npy"],
     r"--config \S+pipe\.npy: not a regular file \(a pipe, socket or device\)$"),
    ("config-a-link-loop", ["train", "--run-dir", "{empty}", *TINY, "--config", "{tmp}/loop"],
     r"--config \S+loop: a link that leads nowhere \(or a loop of links\)$"),
    ("array-data-a-link-loop", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "array", "--data-dir",
                                "{tmp}/loop.npy"], r"data_dir '\S+loop\.npy': a link that leads nowhere \(or a loop of links\)"),
    # settings that would change nothing (the fifteenth session)
    ("pixelcnn-width-without-a-head", ["train", "--run-dir", "{empty}", *TINY, "--pixelcnn-width", "32"],
     r"error: --pixelcnn-width: ModelConfig\.pixelcnn_width=32 has no effect with pixelcnn_layers=0; "
     r"use pixelcnn_layers > 0$"),
    ("fixed-logvar-with-bernoulli", ["train", "--run-dir", "{empty}", *TINY, "--fixed-logvar", "-2"],
     r"error: --fixed-logvar: ModelConfig\.fixed_logvar=-2 has no effect with likelihood='bernoulli'"),
    ("download-with-digits", ["train", "--run-dir", "{empty}", *TINY, "--download"],
     r"error: --download: DataConfig\.download=True has no effect with dataset='digits'"),
    # the checks a run makes as it is set up (the fuzz of the twentieth session): they name
    # config fields for a Python caller, and here the flag, the file or the preset they came from
    ("discretized-logistic-on-the-digits", ["train", "--run-dir", "{empty}", *TINY, "--likelihood",
                                            "discretized_logistic", "--binarize", "none"],
     r"error: --likelihood discretized_logistic: digits train data must be 8-bit levels k/255 in \[0, 1\] for "
     r"likelihood='discretized_logistic'; they are 17 levels k/16: use --binarize static, or another likelihood$"),
    ("presets-val-size-beyond-the-data", ["train", "--run-dir", "{empty}", *TINY, "--preset", "mnist-burda",
                                          "--dataset", "digits"],
     r"error: val_size=10000 leaves no training examples out of 1500; the preset 'mnist-burda' sets val_size=10000 "
     r"\(--val-size\): override it$"),
    ("val-size-flag-beyond-the-data", ["train", "--run-dir", "{empty}", *TINY, "--val-size", "1500"],
     r"error: --val-size 1500: val_size=1500 leaves no training examples out of 1500$"),
    ("tf32-training-on-the-cpu", ["train", "--run-dir", "{empty}", *TINY, "--device", "cpu", "--amp", "tf32"],
     r"error: --amp tf32: train\.amp='tf32' is CUDA's arithmetic .*: use --amp none there, or 'bf16'$"),
    ("tf32-training-from-a-file", ["train", "--run-dir", "{empty}", *TINY, "--device", "cpu", "--config",
                                   "{tmp}/tf32.json"],
     r"error: --config \S+tf32\.json: train\.amp='tf32' is CUDA's arithmetic .*: use amp='none' there"),
    ("early-stopping-without-validation", ["train", "--run-dir", "{empty}", *TINY, "--val-size", "0",
                                           "--early-stopping", "2"],
     r"error: --early-stopping 2: train\.early_stopping=2 needs validation examples, and data\.val_size=0 leaves "
     r"none$"),
    ("graph-steps-for-the-eager-step", ["train", "--run-dir", "{empty}", *TINY, "--graph-steps", "2", "--objective",
                                        "iwae", "--iw-samples", "2"],
     r"error: --graph-steps 2: train\.graph_steps=2 \(blocks of static steps\) cannot serve this run: .*; use "
     r"--graph-steps 1$"),
    ("fast-static-for-the-eager-step", ["train", "--run-dir", "{empty}", *TINY, "--fast", "static", "--objective",
                                        "iwae", "--iw-samples", "2"],
     r"error: --fast static: train\.fast='static' cannot serve this run: .*; use --fast auto or 'off'$"),
    ("adam-kernel-for-the-eager-step", ["train", "--run-dir", "{empty}", *TINY, "--device", "cpu", "--adam-kernel"],
     r"error: --adam-kernel: train\.adam_kernel=True .* cannot serve this run: .*; use --no-adam-kernel$"),
    ("stratified-tc-of-batches-of-one", ["train", "--run-dir", "{empty}", *TINY, "--objective", "beta_tcvae",
                                         "--tc-estimator", "stratified", "--batch-size", "1"],
     r"error: --batch-size 1: train\.batch_size must be at least 2 for objective\.tc_estimator='stratified', "
     r"got 1; use objective\.tc_estimator='mws' for batches of one$"),
    ("array-without-data-dir", ["train", "--run-dir", "{empty}", *TINY, "--dataset", "array"],
     r"error: --dataset array: DataConfig\.data_dir \(--data-dir\) is required for dataset='array', got None$"),
    # the data decide the input shape: a different one asked for is refused, not replaced
    ("config-input-shape", ["train", "--run-dir", "{empty}", *TINY, "--config", "{tmp}/shape.toml"],
     r"shape\.toml: \[model\] input_shape \[3, 32, 32\] is not the shape of the data, \[1, 8, 8\]"),
]


@pytest.fixture
def places(run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_text("[train\nepochs = 2\n")
    (tmp_path / "bad.json").write_text('{"train": {"epochs": 2,}')
    (tmp_path / "typo.toml").write_text("[train]\nepoch = 3\n")
    (tmp_path / "value.json").write_text('{"model": {"latent_dim": "x"}}')
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.npz").write_bytes(b"never read")
    (tmp_path / "shape.toml").write_text("[model]\ninput_shape = [3, 32, 32]\n")
    (tmp_path / "linear.json").write_text('{"objective": {"beta_schedule": "linear"}}')
    (tmp_path / "tf32.json").write_text('{"train": {"amp": "tf32"}}')
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "d.png").mkdir()
    np.save(tmp_path / "real.npy", np.linspace(-2, 2, 40 * 6, dtype=np.float32).reshape(40, 6))
    np.save(tmp_path / "huge.npy", np.full((40, 6), 1e300))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dir.npz").mkdir()
    os.mkfifo(tmp_path / "pipe.npy")
    (tmp_path / "loop.npy").symlink_to(tmp_path / "loop.npy")
    return {"run": str(run), "empty": str(tmp_path / "empty"), "tmp": str(tmp_path)}


@pytest.mark.parametrize("argv, pattern", [row[1:] for row in BAD_INPUT], ids=[row[0] for row in BAD_INPUT])
def test_bad_command_line_input(argv, pattern, places, capsys):
    before = {name: snapshot(places[name]) for name in ("run", "empty")}
    rc, _, err = call([a.format(**places) for a in argv], capsys)
    assert_usage_error(rc, err, pattern)
    assert {name: snapshot(places[name]) for name in ("run", "empty")} == before
    assert not Path(places["tmp"], "never.png").exists()


@pytest.mark.parametrize("error, pattern", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 400000000000 bytes.\nmore"), r"out of memory \(\[enforce fail.*400000000000 bytes\.\)"),
    (MemoryError("Unable to allocate 93.6 GiB for an array"), r"out of memory \(Unable to allocate 93\.6 GiB"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), r"out of memory \(CUDA out"),
])
def test_a_failed_allocation_is_one_line_that_asks_for_less(error, pattern, places, capsys, monkeypatch):
    """A setting too large for the machine (a latent size, a sample count, a data set)
    fails where memory is asked for, in PyTorch or NumPy: one line, status 2."""
    import vaekit.cli

    def allocate(*args, **kwargs):
        raise error

    for command in ("sample", "evaluate", "train"):
        monkeypatch.setattr(vaekit.cli, f"{command}_command", allocate)
    rc, _, err = call(["sample", places["run"], "-o", f"{places['tmp']}/never.png"], capsys)
    assert_usage_error(rc, err, pattern + r".*; ask for less: fewer images \(-n\)$")
    rc, _, err = call(["evaluate", places["run"]], capsys)  # each command names its own settings
    assert_usage_error(rc, err, pattern + r".*; ask for less: a smaller --batch-size or --iw-samples$")
    rc, _, err = call(["train", "--run-dir", places["empty"] + "/oom", *TINY], capsys)
    assert_usage_error(rc, err, pattern + r".*; ask for less: a smaller --batch-size, model \(--hidden, --latent-dim\) "
                                          r"or --iw-samples$")


def test_a_runtime_error_that_is_not_about_memory_is_not_hidden(places, monkeypatch):
    """Any other RuntimeError is a bug of vaekit's or PyTorch's: its traceback is kept."""
    import vaekit.cli

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(vaekit.cli, "sample_command", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        main(["sample", places["run"], "-o", f"{places['tmp']}/never.png"])


def test_bad_input_in_a_real_process_prints_one_line_without_traceback(places):
    before = snapshot(places["run"])
    rc, out, err = run_cli("train", "--run-dir", places["run"], *TINY)
    assert_usage_error(rc, err, r"--run-dir.*not empty")
    assert out == "" and snapshot(places["run"]) == before


def test_evaluate_num_threads_is_used_and_restored(run, capsys, monkeypatch):
    seen = []
    import vaekit.evaluate as ev

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return ev_real(*args, **kwargs)

    ev_real = ev.evaluate_model
    monkeypatch.setattr(ev, "evaluate_model", spy)
    before = torch.get_num_threads()
    rc, _, err = call(["evaluate", run, "--num-threads", 1], capsys)
    assert rc == 0, err
    assert seen == [1] and torch.get_num_threads() == before
    rc, _, err = call(["evaluate", run, "--no-progress"], capsys)
    assert rc == 0 and seen == [1, before]
    rc, _, err = call(["evaluate", run, "--num-threads", -1], capsys)
    assert rc == 2 and "--num-threads must be an integer in [0, 1024]" in err and "Traceback" not in err


def test_a_failed_fast_path_is_one_line_naming_the_way_out(tmp_path, capsys, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise OSError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    rc, _, err = call(["train", "--run-dir", tmp_path / "run", *TINY, "--fast", "compile"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "vaekit: error: TrainConfig.fast='compile': torch.compile could not compile the step "
        "(OSError: no C++ compiler found); train with fast='auto' or 'off'"]


def test_evaluate_precision_is_asked_for_and_recorded_with_the_machine(run, capsys, monkeypatch):
    import vaekit.checks as c

    rc, _, err = call(["evaluate", run], capsys)
    assert rc == 0, err
    m = read_json(Path(run) / "metrics-test.json")
    assert m["precision"] == "fp32" and m["device"] == "cpu" and m["torch"] == torch.__version__ and m["seconds"] > 0
    rc, _, err = call(["evaluate", run, "--precision", "bf16"], capsys)
    assert rc == 0, err
    assert read_json(Path(run) / "metrics-test.json")["precision"] == "bf16"
    # a CPU whose bfloat16 would be many times slower than float32 is told so, on one line
    slow = bool(c.slow_bf16_note("cpu", "--precision bf16"))
    assert ("vaekit: --precision bf16: this CPU has no bfloat16 instructions" in err) == slow
    monkeypatch.setattr(c, "_cpu_bf16_fast", lambda: False)
    rc, _, err = call(["evaluate", run, "--precision", "bf16"], capsys)
    assert rc == 0 and err.startswith("vaekit: --precision bf16: this CPU has no bfloat16 instructions"), err
    rc, _, err = call(["evaluate", run, "--precision", "fp16"], capsys)
    assert_usage_error(rc, err, r"--precision: invalid choice: 'fp16'")


def test_version_names_vaekit_and_torch(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"vaekit {vaekit.__version__} (torch {torch.__version__})"


def test_time_budget_sets_the_epochs_it_says(tmp_path, capsys):
    tiny = [a for i, a in enumerate(TINY) if a != "--epochs" and (i == 0 or TINY[i - 1] != "--epochs")]
    rc, out, err = call(["train", "--run-dir", tmp_path / "run", *tiny, "--time-budget", 0.5], capsys)
    assert rc == 0, err
    said = re.search(r"calibration: ([0-9.]+) s an epoch -> (\d+) epochs? for a 0.5 s budget", out)
    assert said, out
    epochs, per_epoch = int(said.group(2)), float(said.group(1))  # printed to 3 decimals
    assert max(1, int(0.5 / (per_epoch + 5e-4))) <= epochs <= max(1, int(0.5 / max(per_epoch - 5e-4, 1e-9)))
    assert read_json(tmp_path / "run" / "config.json")["train"]["epochs"] == epochs
    assert f"trained {epochs} epoch{'' if epochs == 1 else 's'};" in out
    assert ("one epoch takes longer than the budget" in out) == (per_epoch > 0.5)


def test_a_time_budget_under_torchrun_is_refused_before_any_calibration_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    tiny = [a for i, a in enumerate(TINY) if a != "--epochs" and (i == 0 or TINY[i - 1] != "--epochs")]
    rc, out, err = call(["train", "--run-dir", tmp_path / "run", *tiny, "--time-budget", 5], capsys)
    assert_usage_error(rc, err, r"--time-budget is not supported under torchrun")
    assert out == "" and not (tmp_path / "run").exists()


def test_a_time_budget_below_one_epoch_says_the_epoch_overruns_it(tmp_path, capsys, monkeypatch):
    import vaekit.budget

    monkeypatch.setattr(vaekit.budget, "epochs_for_budget", lambda config, seconds: (1, 80.0))
    tiny = [a for i, a in enumerate(TINY) if a != "--epochs" and (i == 0 or TINY[i - 1] != "--epochs")]
    rc, out, err = call(["train", "--run-dir", tmp_path / "run", *tiny, "--time-budget", 5], capsys)
    assert rc == 0, err
    assert ("vaekit: --time-budget 5: one epoch takes longer than the budget; this run trains one epoch (about 80 s); "
            "--max-steps N trains fewer steps") in out


@pytest.mark.parametrize("argv, pattern", [
    (["--time-budget", "5", "--epochs", "3"], "give --epochs or --time-budget, not both"),
    # the file's epochs, which the budget would replace silently
    (["--time-budget", "5", "--config", "{tmp}/ep3.json"],
     r"--time-budget sets the number of epochs, and --config \S+ep3\.json sets train\.epochs; remove the key from "
     r"the file, or leave out --time-budget$"),
    (["--time-budget", "0"], r"--time-budget must be a number of seconds in \(0, 31536000\] \(a year\), got 0$"),
    (["--time-budget", "nan"], r"--time-budget must be a number of seconds in \(0, 31536000\].*got nan$"),
    (["--time-budget", "1e300"], r"--time-budget must be a number of seconds in \(0, 31536000\].*got 1e\+300$"),
])
def test_time_budget_refusals(argv, pattern, tmp_path, capsys):
    (tmp_path / "ep3.json").write_text('{"train": {"epochs": 3}}')
    rc, _, err = call(["train", "--run-dir", tmp_path / "run", *[a.format(tmp=tmp_path) for a in argv]], capsys)
    assert_usage_error(rc, err, pattern)
    assert not (tmp_path / "run").exists()


# -- Ctrl-C, run names, checks before the work -----------------------------------------


@pytest.mark.parametrize("argv, where", [
    # main calls the commands by their names in vaekit.cli, so they are replaced there
    (["evaluate", "{run}"], "vaekit.cli.evaluate_command"),  # all of evaluate
    (["sample", "{run}", "-o", "{tmp}/s.png"], "vaekit.cli.sample_command"),
    (["train", "--run-dir", "{tmp}/new", *TINY], "vaekit.wiring.load_dataset"),  # start-up, before the loop
    (["train", "--run-dir", "{tmp}/new", *TINY], "vaekit.train.save_run_pictures"),  # after it
], ids=["evaluate", "sample", "train-data", "train-pictures"])
def test_ctrl_c_outside_the_training_loop_is_one_line_and_status_130(argv, where, run, tmp_path, monkeypatch,
                                                                     capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{name}", interrupted)
    rc, _, err = call([a.format(run=run, tmp=tmp_path) for a in argv], capsys)
    assert rc == 130 and err == "vaekit: interrupted\n"


def test_a_run_without_run_dir_is_named_after_its_dataset(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "flat.npy", np.random.default_rng(0).random((60, 16)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    rc, out, err = call(["train", *TINY, "--epochs", 1, "--dataset", "array", "--data-dir", "flat.npy"], capsys)
    assert rc == 0, err
    made = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(made) == 1 and re.fullmatch(r"array-\d{8}-\d{6}", made[0]) and made[0] in out


def test_disentanglement_on_a_run_not_trained_on_sprites_is_refused_before_evaluating(run, monkeypatch, capsys):
    import vaekit.evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluated before refusing")

    monkeypatch.setattr(vaekit.evaluate, "evaluate_model", never)
    monkeypatch.setattr(vaekit.data, "load_dataset", never)
    rc, _, err = call(["evaluate", run, "--disentanglement"], capsys)
    assert_usage_error(rc, err, rf"--disentanglement needs a model trained on the sprites.*{re.escape(str(run))} "
                                r"was trained on 'digits'")


def test_evaluate_names_the_runs_config_file_and_where_its_data_were(run, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(run, rd, ignore=shutil.ignore_patterns("*.png", "checkpoint.pt"))
    saved = read_json(rd / "config.json")
    (rd / "config.json").write_text(json.dumps({**saved, "train": {**saved["train"], "epoch": 3}}))
    rc, _, err = call(["evaluate", rd], capsys)
    assert_usage_error(rc, err, rf"^vaekit: error: {re.escape(str(rd / 'config.json'))}: unknown key\(s\) in config "
                                r"section 'train': epoch;")
    missing = tmp_path / "no-mnist"
    (rd / "config.json").write_text(json.dumps({**saved, "data": {**saved["data"], "dataset": "mnist",
                                                                  "data_dir": str(missing)}}))
    before = snapshot(rd)
    rc, _, err = call(["evaluate", rd], capsys)
    assert_usage_error(rc, err, rf"config\.json names data that are missing: mnist not found in data_dir .*fetch "
                                rf"them there with vaekit train --dataset mnist --data-dir {re.escape(str(missing))} "
                                r"--download")
    assert "download=True" not in err and snapshot(rd) == before


@pytest.mark.parametrize("local_rank, waits", [(None, False), ("0", False), ("1", True)])
def test_under_torchrun_each_machine_says_an_error_once(local_rank, waits, capsys, monkeypatch):
    """Every process of a torchrun job meets the same bad input: the first process of each
    machine prints the line at once; another waits first (torchrun stops it once the first
    has exited), and says the line itself only if it is still running: the line is never
    lost to a process that exited before the first one spoke."""
    import vaekit.cli

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.delenv("VAEKIT_DEBUG", raising=False)
    slept = []
    monkeypatch.setattr(vaekit.cli.time, "sleep", slept.append)
    rc, out, err = call(["train", "--epochs", "0"], capsys)
    assert rc == 2 and out == ""
    assert_usage_error(rc, err, "epochs")
    assert slept == ([vaekit.cli._PEER_GRACE_S] if waits else [])


# -- the README walk-through's findings (the seventeenth session) ---------------------


def test_resume_of_a_run_whose_data_are_gone_says_the_flags_that_find_or_fetch_them(tmp_path, capsys):
    """The readers' advice is the Python API's (download=True): a resume says how to point
    at the data (--data-dir) and how a run fetches them (--download)."""
    from test_data import mnist_like, write_mnist

    write_mnist(tmp_path / "m", mnist_like(np.random.default_rng(0)))
    rd = tmp_path / "run"
    rc, _, err = call(["train", "--run-dir", rd, *TINY, "--dataset", "mnist", "--data-dir", tmp_path / "m"], capsys)
    assert rc == 0, err
    (tmp_path / "m").rename(tmp_path / "moved")
    before = snapshot(rd)
    rc, _, err = call(["train", "--resume", rd, "--epochs", 3], capsys)
    assert_usage_error(rc, err, rf"--resume \S+run: the run's data are missing: mnist not found in data_dir "
                                rf".*, or fetch them there with vaekit train --dataset mnist --data-dir "
                                rf"{re.escape(str(tmp_path / 'm'))} --download\. "
                                r"\(or give --data-dir where they are now\)$")
    rc, _, err = call(["train", "--resume", rd, "--data-dir", tmp_path / "nothere"], capsys)
    assert_usage_error(rc, err, r"--data-dir \S+nothere: mnist not found in data_dir .*--data-dir \S+nothere "
                                r"--download\.$")
    assert "download=True" not in err and snapshot(rd) == before


@pytest.mark.parametrize("largest, size", [(1_000_000, 984), (500, 492)], ids=["pixels", "jpeg-side"])
def test_sample_draws_a_grid_too_large_at_the_runs_scale_smaller(largest, size, run, tmp_path, monkeypatch, capsys):
    """sample has no scale flag: a grid of n images that the run's scale (14 for 8x8) would
    make too large for Pillow (or a JPEG's side) is drawn at the largest scale that fits."""
    import vaekit.plots

    jpeg = largest < 65500
    monkeypatch.setattr(vaekit.plots, "JPEG_MAX_SIDE" if jpeg else "MAX_GRID_PIXELS", largest)
    out = tmp_path / ("s.jpg" if jpeg else "s.png")
    rc, _, err = call(["sample", run, "-n", 64, "-o", out], capsys)
    assert rc == 0, err
    with Image.open(out) as im:  # 82 pixels a side at scale 1 (8 images of 8 + 2 of padding, 2 more)
        assert im.size == (size, size)


def test_sample_says_which_n_fits_when_even_scale_one_does_not(run, tmp_path, monkeypatch, capsys):
    import vaekit.models
    import vaekit.plots

    monkeypatch.setattr(vaekit.plots, "MAX_GRID_PIXELS", 6000)  # 64 images 8x8, 8 a row: 82x82 at scale 1
    monkeypatch.setattr(vaekit.models.VAE, "sample", lambda *a, **k: pytest.fail("drew before refusing"))
    rc, _, err = call(["sample", run, "-n", 64, "-o", tmp_path / "s.png"], capsys)
    assert_usage_error(rc, err, r"-n/--nrow: 64 images 8 a row make a grid of 82x82 pixels, more than the 6000 that "
                                r"Pillow opens; with --nrow 8 at most -n 56 fit$")
    assert not (tmp_path / "s.png").exists()


def test_evaluate_of_a_run_with_no_saved_model_yet_says_how_to_continue_it(run, tmp_path, capsys):
    """A run interrupted before its first epoch ended has a checkpoint but no model/."""
    rd = tmp_path / "run"
    shutil.copytree(run, rd, ignore=shutil.ignore_patterns("model", "*.png"))
    for command in (["evaluate", rd], ["sample", rd, "-o", tmp_path / "s.png"]):
        rc, _, err = call(command, capsys)
        assert_usage_error(rc, err, rf"RUN {re.escape(str(rd))} has no saved model yet \(it stopped before its first "
                                    rf"epoch ended\); continue it with vaekit train --resume {re.escape(str(rd))}$")
    (rd / "checkpoint.pt").unlink()
    rc, _, err = call(["evaluate", rd], capsys)
    assert_usage_error(rc, err, r"has no saved model \(it stopped before its first epoch ended, and before its first "
                                rf"checkpoint\); vaekit train --resume {re.escape(str(rd))} trains it again from the "
                                r"start$")


def test_evaluate_and_sample_of_a_saved_models_directory_say_to_give_the_run(run, tmp_path, capsys):
    """RUN/model (model.safetensors and the model's config.json) was refused as a config
    with unknown sections."""
    for command in (["evaluate", run / "model"], ["sample", run / "model", "-o", tmp_path / "never.png"]):
        rc, _, err = call(command, capsys)
        assert_usage_error(rc, err, rf"^vaekit: error: RUN {re.escape(str(run / 'model'))} is a saved model's "
                                    r"directory \(model\.safetensors and its config\.json\), not a run directory: "
                                    rf"give the run directory that holds it \({re.escape(str(run))}\)$")
    shutil.copytree(run / "model", tmp_path / "alone")  # no run around it
    rc, _, err = call(["evaluate", tmp_path / "alone"], capsys)
    assert_usage_error(rc, err, r"is a saved model's directory .*: give the run directory that vaekit train wrote "
                                r"\(a saved model alone loads in Python with VAE\.from_pretrained\)$")
    assert not (tmp_path / "never.png").exists() and not list((run / "model").glob("metrics*"))


def test_a_resumed_runs_summary_says_what_this_call_trained_and_in_all():
    from vaekit.cli import _trained_more
    from vaekit.train import FitResult

    rows = [{"split": "train", "epoch": e, "step": 10 * e} for e in (1, 2, 3)]
    assert _trained_more(FitResult(None, rows, "r", False, steps_per_epoch=10), 2, 20) == "1 more epoch (3 in all)"
    # resumed from a checkpoint part way through epoch 3 (an interrupted run)
    assert (_trained_more(FitResult(None, rows, "r", False, steps_per_epoch=10), 2, 24)
            == "6 more steps (0.6 epochs; 3 epochs in all)")


def test_resume_of_a_run_without_a_checkpoint(run, tmp_path, capsys):
    """A run killed before its first checkpoint (config.json, maybe the first epoch's files)
    is trained again from the start by --resume; one whose metrics record more epochs than
    that is refused, and left as it was; a folder with neither file is no run."""
    rd = tmp_path / "run"
    shutil.copytree(run, rd, ignore=shutil.ignore_patterns("checkpoint.pt", "*.png"))
    before = snapshot(rd)
    rc, _, err = call(["train", "--resume", rd], capsys)
    assert_usage_error(rc, err, r"no checkpoint at .*checkpoint\.pt, but .*metrics\.csv records 2 epochs")
    assert snapshot(rd) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run / "config.json", fresh / "config.json")
    rc, out, _ = call(["train", "--resume", fresh], capsys)
    assert rc == 0 and f"{fresh} stopped before its first checkpoint; training it from the start" in out, out
    assert (fresh / "checkpoint.pt").is_file()
    (tmp_path / "empty").mkdir()
    rc, _, err = call(["train", "--resume", tmp_path / "empty"], capsys)
    assert_usage_error(rc, err, r"no checkpoint\.pt \(nor config\.json\) there to resume from$")


@pytest.mark.parametrize("checkpoint", ["missing", "truncated"])
def test_evaluate_data_dir_that_cannot_be_checked_says_so(checkpoint, tmp_path, capsys):
    rd = _array_run(tmp_path, np.random.default_rng(2), capsys)
    if checkpoint == "missing":
        (rd / "checkpoint.pt").unlink()
    else:
        (rd / "checkpoint.pt").write_bytes((rd / "checkpoint.pt").read_bytes()[:100])
    np.save(tmp_path / "other.npy", np.random.default_rng(3).random((60, 16)).astype(np.float32))
    rc, _, err = call(["evaluate", rd, "--data-dir", tmp_path / "other.npy"], capsys)
    assert rc == 0 and err == (f"vaekit: note: --data-dir {tmp_path / 'other.npy'} is not checked against the data "
                               f"{rd} trained on: it has no readable checkpoint.pt\n"), err


def test_evaluate_prints_the_example_count_once_and_says_where_bits_per_dim_come_from(run, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(run, rd)  # the shared run's metrics files stay as other tests left them
    for argv, source in ((["--iw-samples", 0], "elbo"), (["--iw-samples", 5], "iw_nll")):
        rc, out, err = call(["evaluate", rd, *argv], capsys)
        assert rc == 0, err
        m = read_json(rd / "metrics-test.json")
        assert m["bits_per_dim_from"] == source and m["n"] == m["num_examples"]  # both keys kept in the file
        assert re.search(rf"^num_examples\s+{m['n']}$", out, re.M) and not re.search(r"^n\s", out, re.M), out
        shown = f"{m['bits_per_dim']:.4f}"
        assert re.search(rf"^bits_per_dim\s+{re.escape(shown)}  \(from {source}\)$", out, re.M), out
        nll = -m["elbo"] if source == "elbo" else m["iw_nll"]
        assert m["bits_per_dim"] == pytest.approx(nll / (64 * math.log(2)), rel=1e-12)


def test_a_ctrl_c_while_torch_is_imported_is_one_line_and_status_130(monkeypatch, capsys):
    """The ``vaekit`` command (pyproject's entry point) and ``python -m vaekit`` start in
    ``vaekit.__main__.run``, which imports the command line (and PyTorch) itself: a Ctrl-C
    in that second is answered as one in main is, not with a traceback from ``import torch``."""
    import tomllib

    import vaekit.__main__ as entry

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vaekit": "vaekit.__main__:run"}

    class Interrupted:  # a finder: the import of vaekit.cli is where the Ctrl-C lands
        def find_spec(self, name, path=None, target=None):
            if name == "vaekit.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "vaekit.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert entry.run() == 130
    assert capsys.readouterr().err == "vaekit: interrupted\n"


def test_a_ctrl_c_during_an_import_is_held_until_the_import_ends(tmp_path, monkeypatch):
    """The command's process lets no Ctrl-C into the middle of an import (a half-made
    module fails later with an unrelated error): the interrupt comes where the outermost
    import returns, the module whole; a second Ctrl-C there goes through at once. The
    import function and the handler are put back afterwards."""
    import builtins
    import signal

    from vaekit.__main__ import _HeldDuringImports

    (tmp_path / "vk_inner.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\nwhole = True\n")
    (tmp_path / "vk_outer.py").write_text("import vk_inner\nouter_whole = True\n")
    (tmp_path / "vk_twice.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\n"
                                          "signal.raise_signal(signal.SIGINT)\nwhole = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real, handler = builtins.__import__, signal.getsignal(signal.SIGINT)
    for name in ("vk_inner", "vk_outer", "vk_twice"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with _HeldDuringImports():
        with pytest.raises(KeyboardInterrupt):
            import vk_outer  # noqa: F401
        assert sys.modules["vk_inner"].whole and sys.modules["vk_outer"].outer_whole
        with pytest.raises(KeyboardInterrupt):
            import vk_twice  # noqa: F401
        assert "vk_twice" not in sys.modules  # the second went through, mid-import
        with pytest.raises(KeyboardInterrupt):  # outside an import: at once, as always
            signal.raise_signal(signal.SIGINT)
            pytest.fail("not interrupted")
    assert builtins.__import__ is real and signal.getsignal(signal.SIGINT) is handler


def test_an_evaluation_that_would_drop_a_costlier_one_keeps_it_aside(run, tmp_path, capsys):
    """metrics-test.json holding an importance-weighted NLL of more samples than the new
    evaluation takes (or disentanglement scores it lacks) is moved to
    metrics-test-earlier<n>.json, byte for byte, and the move is said; an evaluation that
    loses nothing replaces the file as before."""
    rd = tmp_path / "run"
    shutil.copytree(run, rd, ignore=shutil.ignore_patterns("metrics-*.json"))  # the other tests' evaluations
    assert call(["evaluate", rd, "--iw-samples", 10], capsys)[0] == 0
    with_iw = (rd / "metrics-test.json").read_bytes()
    rc, out, _ = call(["evaluate", rd], capsys)
    assert rc == 0 and (rd / "metrics-test-earlier1.json").read_bytes() == with_iw
    assert (f"vaekit: the earlier metrics-test.json held an importance-weighted NLL of 10 samples, which this "
            f"evaluation does not: kept as {rd / 'metrics-test-earlier1.json'}") in out
    assert "iw_nll" not in read_json(rd / "metrics-test.json")
    for argv in (["evaluate", rd], ["evaluate", rd, "--iw-samples", 4]):  # nothing lost: replaced
        assert call(argv, capsys)[0] == 0 and not (rd / "metrics-test-earlier2.json").exists()
    assert call(["evaluate", rd, "--iw-samples", 3], capsys)[0] == 0  # 3 < 4
    assert read_json(rd / "metrics-test-earlier2.json")["iw_samples"] == 4
    scored = {**read_json(rd / "metrics-test.json"), "mig": 0.5, "disentanglement_quick": True}
    (rd / "metrics-test.json").write_text(json.dumps(scored))
    rc, out, _ = call(["evaluate", rd, "--iw-samples", 3], capsys)
    assert rc == 0 and "held disentanglement scores, which" in out
    assert read_json(rd / "metrics-test-earlier3.json") == scored


def test_evaluate_model_with_its_defaults_reproduces_vaekit_evaluate(run, tmp_path, capsys):
    """The Python call with the command's seed and batch size (both defaults) draws the same
    noise: the same numbers, not merely close ones."""
    from vaekit.evaluate import evaluate_model

    rd = tmp_path / "run"
    shutil.copytree(run, rd, ignore=shutil.ignore_patterns("metrics-*.json"))
    assert call(["evaluate", rd, "--iw-samples", 10], capsys)[0] == 0
    m = read_json(rd / "metrics-test.json")
    got = evaluate_model(VAE.from_pretrained(rd / "model"), _test_data(rd), iw_samples=10)
    assert m["batch_size"] == 500 and m["n"] > 256  # more than one batch of the old default
    for key in ("elbo", "kl", "iw_nll", "mutual_information"):
        assert got[key] == m[key], key


def test_the_summary_line_gives_the_best_validation_elbo_of_the_metrics(tmp_path, capsys):
    """'best val ELBO' is the highest validation ELBO in metrics.csv (the model kept), not
    the last or the lowest; with no validation split, the last training row's ELBO."""
    rd = tmp_path / "run"
    rc, out, err = call(["train", "--run-dir", rd, *TINY, "--epochs", 4, "--lr", "0.05"], capsys)
    assert rc == 0, err
    with open(rd / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["elbo"]) for r in rows if r["split"] == "val"]
    assert round(min(val), 3) < round(max(val), 3)  # the lowest would be another number
    line = re.search(r"^vaekit: trained 4 epochs; best val ELBO (-?\d+\.\d{3}) nats; run in (.*)$", out, re.M)
    assert line and float(line.group(1)) == round(max(val), 3) and line.group(2) == str(rd), out
    rd2 = tmp_path / "noval"
    rc, out, err = call(["train", "--run-dir", rd2, *TINY, "--val-size", 0], capsys)
    with open(rd2 / "metrics.csv", newline="") as f:
        last = [r for r in csv.DictReader(f) if r["split"] == "train"][-1]
    assert rc == 0 and (f"no validation split, the last model kept (train ELBO {float(last['elbo']):.3f} nats)"
                        in out), out


def test_a_refused_run_under_a_made_up_name_leaves_no_directory(tmp_path, monkeypatch, capsys):
    """vaekit train without --run-dir claims runs/<name>-<time> before loading anything: a
    run refused afterwards (here: its data are missing) removes it again, and the runs/
    folder it made for it."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(["train", *TINY, "--dataset", "mnist", "--data-dir", tmp_path / "nowhere"], capsys)
    assert rc == 2 and "--download" in err
    assert not (tmp_path / "runs").exists()


def test_evaluate_into_a_run_directory_it_cannot_write_is_refused_before_evaluating(run, tmp_path, monkeypatch,
                                                                                    capsys):
    import vaekit.evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluated before refusing")

    rd = tmp_path / "run"
    shutil.copytree(run, rd, ignore=shutil.ignore_patterns("metrics-*.json"))
    monkeypatch.setattr(vaekit.evaluate, "evaluate_model", never)
    real = tempfile.TemporaryDirectory

    def read_only(*args, dir=None, **kwargs):  # as a read-only folder answers (root ignores the mode bits)
        if Path(dir) == rd:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", read_only)
    rc, _, err = call(["evaluate", rd], capsys)
    assert_usage_error(rc, err, rf"RUN {re.escape(str(rd))}: cannot create files in {re.escape(str(rd))} "
                                r"\(Permission denied\)$")
    assert not list(rd.glob("metrics-*.json"))


def test_evaluate_data_dir_checks_the_split_it_scores(tmp_path, capsys):
    """Moved data whose training examples are the run's but whose test images differ are
    refused for --split test, before scoring (the checkpoint records each split's hash);
    the training and validation splits, unchanged, are scored."""
    rng = np.random.default_rng(0)
    x_train, x_test = rng.random((80, 16)).astype(np.float32), rng.random((20, 16)).astype(np.float32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "a" / "data.npz", x_train=x_train, x_test=x_test)
    x_test[3] = 1 - x_test[3]  # one image's pixels, each on the other side of the threshold
    np.savez(tmp_path / "b" / "data.npz", x_train=x_train, x_test=x_test)
    rd = tmp_path / "run"
    assert call(["train", "--run-dir", rd, *TINY, "--epochs", 1, "--dataset", "array", "--binarize", "static",
                 "--data-dir", tmp_path / "a" / "data.npz"], capsys)[0] == 0
    moved = tmp_path / "b" / "data.npz"
    rc, _, err = call(["evaluate", rd, "--data-dir", moved], capsys)
    assert_usage_error(rc, err, rf"--data-dir {re.escape(str(moved))}: the test split there is not the one "
                                rf"{re.escape(str(rd))} recorded \(20 examples, hash [0-9a-f]{{16}}; its checkpoint "
                                r"records 20, hash [0-9a-f]{16}\), though its training examples are the run's$")
    assert not list(rd.glob("metrics-*.json"))
    for split in ("val", "train"):
        assert call(["evaluate", rd, "--data-dir", moved, "--split", split], capsys)[0] == 0
    assert call(["evaluate", rd, "--data-dir", tmp_path / "a" / "data.npz"], capsys)[0] == 0


def test_train_into_folders_it_cannot_write_says_which_in_one_line(run, tmp_path, monkeypatch, capsys):
    """A made-up run name in a folder that takes no files is named as such (no --run-dir
    was given); a run to resume whose folder takes no files is refused before its data
    are loaded, naming --resume (it failed on a checkpoint's temporary file)."""
    rd = tmp_path / "run"
    shutil.copytree(run, rd)
    real = tempfile.TemporaryDirectory

    def read_only(*args, dir=None, **kwargs):  # as a read-only folder answers (root ignores the mode bits)
        if Path(dir).resolve() in (tmp_path.resolve(), rd.resolve()):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", read_only)
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(["train", *TINY], capsys)
    assert_usage_error(rc, err, r"error: the run directory \(no --run-dir given\) runs/digits-\d{8}-\d{6}: cannot "
                                r"create files in \. \(Permission denied\)$")
    before = snapshot(rd)
    rc, _, err = call(["train", "--resume", rd, "--epochs", 3], capsys)
    assert_usage_error(rc, err, rf"error: --resume {re.escape(str(rd))}: cannot create files in "
                                rf"{re.escape(str(rd))} \(Permission denied\)$")
    assert snapshot(rd) == before


# -- the command-line fuzz's findings (the twentieth session) -------------------------


def test_a_refusal_is_said_alone_without_the_bf16_note(tmp_path, monkeypatch, capsys):
    """The note that bfloat16 is slow on this CPU comes once the checks have passed: a
    refused train or evaluate prints its one error line alone."""
    import vaekit.checks

    monkeypatch.setattr(vaekit.checks, "_cpu_bf16_fast", lambda: False)
    rc, _, err = call(["train", "--run-dir", tmp_path / "run", *TINY, "--device", "cpu", "--amp", "bf16",
                       "--val-size", "0", "--early-stopping", "2"], capsys)
    assert_usage_error(rc, err, r"error: --early-stopping 2: train\.early_stopping=2 needs validation examples")
    rd = tmp_path / "noval"
    assert call(["train", "--run-dir", rd, *TINY, "--epochs", "1", "--val-size", "0"], capsys)[0] == 0
    rc, _, err = call(["evaluate", rd, "--split", "val", "--device", "cpu", "--precision", "bf16"], capsys)
    assert_usage_error(rc, err, r"error: --split val: the split is empty for dataset 'digits'$")


def test_a_run_refused_in_new_folders_removes_the_folders_it_made(tmp_path, capsys):
    """--run-dir a/b/run, refused once the run lock had made it: a, a/b and a/b/run go
    again; a folder that was there before stays."""
    (tmp_path / "kept").mkdir()
    for rd in (tmp_path / "a" / "b" / "run", tmp_path / "kept" / "b" / "run"):
        rc, _, err = call(["train", "--run-dir", rd, *TINY, "--val-size", "0", "--early-stopping", "2"], capsys)
        assert_usage_error(rc, err, r"error: --early-stopping 2: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_resume_help_says_a_run_ended_by_max_steps_is_not_extended(monkeypatch, capsys):
    block = next(b for b in _option_blocks(_help("train", monkeypatch, capsys)) if b.startswith("  --resume"))
    assert "--epochs N extends the run to N epochs in all" in block
    assert "not a run that stopped early or at its --max-steps" in block
