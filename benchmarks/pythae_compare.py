"""Trustworthy evaluation: pythae's VAE and vaekit's, trained alike, scored by one estimator.

Both models get the same binarized MNIST (static: x > 0.5, or dynamic: a fresh Bernoulli
draw of the grey levels per batch), the same MLP (784-200-200-50 tanh by default, a
Bernoulli decoder), the same optimiser (Adam), batch size and number of epochs; each is
trained by its own library's loop (pythae's BaseTrainer, vaekit.train.fit), both on the
same 59,000 training images with the last 1,000 as validation set. Then both test NLLs
are measured with the *same* estimator, vaekit.evaluate.iw_nll (k importance samples,
the same noise seed), pythae's networks being wrapped in an adapter that implements
vaekit's model interface. Wall times of the two training runs are printed too.

pythae lives in its own virtual environment (see benchmarks/README.md); without it the
pythae contender is skipped with the reason printed. This file also holds what the other
benchmarks share: the MNIST loader and the pythae wrappers.

  /tmp/pythae-venv/bin/python benchmarks/pythae_compare.py --epochs 3 --k 100 --n-test 1000
  /tmp/pythae-venv/bin/python benchmarks/pythae_compare.py --small --epochs 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist.npz"
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


# ---------------------------------------------------------------------------------------
# Arguments shared by the benchmarks


def device_arg(text: str) -> str:
    """argparse type for --device: the name of a device this machine has (argparse prints
    a refusal on one line after the usage and exits with status 2)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"this machine has no CUDA device (torch {torch.__version__}); "
                                         f"use --device cpu, got {text!r}")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    return text


# ---------------------------------------------------------------------------------------
# Data shared by the benchmarks


def load_mnist(path) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x_train [60000, 784], x_test [10000, 784])`` as uint8 grey levels, and a label.

    ``path == "synthetic"`` (or the default file, :data:`DEFAULT_DATA`, when missing) gives
    seeded random images of the same shape whose pixels are 0 or 255 with MNIST's ink rate
    (~13 %): good for timing, meaningless for likelihoods. Any other missing path is an
    error (a mistyped ``--data`` would otherwise report likelihoods of noise).
    """
    if str(path) != "synthetic" and Path(path).is_file():
        with np.load(path) as f:
            x, xt = f["x_train"], f["x_test"]
        return x.reshape(len(x), -1), xt.reshape(len(xt), -1), f"MNIST ({path})"
    if str(path) != "synthetic":
        if Path(path).resolve() != DEFAULT_DATA.resolve():
            raise SystemExit(f"--data {path}: no such file (an MNIST .npz with x_train, x_test, or 'synthetic')")
        print(f"note: {path} not found; using synthetic binary data of MNIST's shape (timing only)")
    rng = np.random.default_rng(0)
    make = lambda n: (rng.random((n, 784)) < 0.13).astype(np.uint8) * 255  # noqa: E731
    return make(60000), make(10000), "synthetic binary data (timing only)"


def binarize(x: np.ndarray, mode: str = "static", seed: int = 0) -> torch.Tensor:
    """uint8 grey levels -> float32 {0, 1}: ``x / 255 > 0.5`` or one seeded Bernoulli draw."""
    grey = torch.from_numpy(x.astype(np.float32) / 255.0)
    if mode == "static":
        return (grey > 0.5).float()
    return torch.bernoulli(grey, generator=torch.Generator().manual_seed(seed))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# pythae, optional


def import_pythae():
    """``(pythae modules, None)`` or ``(None, reason)``."""
    try:
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except Exception as e:  # ImportError, or a pythae that breaks on this torch
        return None, f"pythae is not importable here ({type(e).__name__}: {e}); see benchmarks/README.md"
    for name in ("pythae", "pythae.trainers.base_trainer.base_trainer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return SimpleNamespace(VAE=VAE, VAEConfig=VAEConfig, ModelOutput=ModelOutput,
                           BaseEncoder=BaseEncoder, BaseDecoder=BaseDecoder), None


class MLPEncoder(nn.Module):
    """x [B, 784] -> (mu, logvar) [B, d], a plain MLP with one linear head."""

    def __init__(self, hidden, latent, activation, n_in=784):
        super().__init__()
        layers, width = [], n_in
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent)

    def forward(self, x):
        return self.head(self.body(x.reshape(x.shape[0], -1))).chunk(2, dim=-1)


def mlp_decoder(hidden, latent, activation, n_out=784) -> nn.Sequential:
    """z [N, d] -> Bernoulli logits [N, 784]."""
    layers, width = [], latent
    for h in reversed(hidden):
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def pythae_vae(pythae, encoder: nn.Module, decoder: nn.Module, latent: int, n_in: int = 784):
    """pythae's VAE around ``encoder`` (x -> (mu, logvar)) and ``decoder`` (z -> logits).

    pythae's Bernoulli VAE wants probabilities from its decoder (its loss is
    ``binary_cross_entropy`` on them), so the wrapper applies the sigmoid; the logits stay
    reachable as ``model.decoder.logits(z)`` for the vaekit adapter.
    """

    class Encoder(pythae.BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = encoder

        def forward(self, x):
            mu, logvar = self.net(x)
            return pythae.ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(pythae.BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = decoder

        def logits(self, z):
            return self.net(z)

        def forward(self, z):
            return pythae.ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    config = pythae.VAEConfig(input_dim=(n_in,), latent_dim=latent, reconstruction_loss="bce")
    return pythae.VAE(config, encoder=Encoder(), decoder=Decoder())


class PythaeAdapter(nn.Module):
    """vaekit's model interface (config, encode_params, decode, nll) over a pythae VAE."""

    def __init__(self, model, latent: int, n_in: int = 784):
        super().__init__()
        self.inner = model
        self.config = SimpleNamespace(input_shape=(n_in,), latent_dim=latent, likelihood="bernoulli")

    def encode_params(self, x):
        out = self.inner.encoder(x)
        return out.embedding, out.log_covariance

    def decode(self, z):
        return self.inner.decoder.logits(z)

    def nll(self, decoder_out, x):
        from vaekit.losses import bernoulli_nll

        return bernoulli_nll(decoder_out, x, validate_args=False)


def pythae_dataset(x: torch.Tensor, dynamic: bool):
    """pythae's BaseDataset; ``dynamic`` draws a fresh Bernoulli image at every access."""
    from pythae.data.datasets import BaseDataset, DatasetOutput

    class Dynamic(BaseDataset):
        def __getitem__(self, index):
            return DatasetOutput(data=torch.bernoulli(self.data[index]), labels=self.labels[index])

    return (Dynamic if dynamic else BaseDataset)(x, torch.zeros(len(x)))


def pythae_trainer(model, train, val, *, batch: int, lr: float, epochs: int, device, seed: int, out_dir,
                   callbacks=None):
    """pythae's BaseTrainer with Adam."""
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    config = BaseTrainerConfig(
        output_dir=str(out_dir), per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        num_epochs=epochs, learning_rate=lr, optimizer_cls="Adam", seed=seed,
        no_cuda=torch.device(device).type != "cuda",
    )
    return BaseTrainer(model, train, val, config, callbacks=callbacks)


def epoch_timer():
    """A pythae callback recording each epoch's training pass: from the epoch's start to
    the start of its evaluation (``train_step`` runs in between)."""
    from pythae.trainers.training_callbacks import TrainingCallback

    class Timer(TrainingCallback):
        def __init__(self):
            self.starts, self.seconds = [], []

        def on_epoch_begin(self, training_config, **kwargs):
            self.starts.append(time.perf_counter())

        def on_eval_step_begin(self, training_config, **kwargs):
            self.seconds.append(time.perf_counter() - self.starts[-1])

    return Timer()


def warm_up_torch() -> None:
    """Pay one-time costs before any clock runs: the first optimiser imports torch._dynamo."""
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])


@contextlib.contextmanager
def quiet():
    """Hide pythae's tqdm bars and log lines (they still run: they are part of its loop).

    pythae's loggers hold their own handle on the console, so logging is switched off too.
    """
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------------------
# The comparison


def write_npz(path, x_train: np.ndarray, x_val: np.ndarray, x_test: np.ndarray) -> None:
    """An npz that vaekit's "array" dataset reads, flat [N, 784] uint8 so that the model's
    input_shape is (784,); the validation set is the tail of x_train."""
    np.savez(path, x_train=np.concatenate([x_train, x_val]), x_test=x_test)


def train_vaekit(args, x_train, x_val, x_test, workdir):
    from vaekit import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig, fit

    npz = Path(workdir) / "data.npz"
    write_npz(npz, x_train, x_val, x_test)
    config = RunConfig(
        model=ModelConfig(arch="mlp", input_shape=(784,), hidden=tuple(args.hidden), latent_dim=args.latent,
                          activation=args.activation, likelihood="bernoulli"),
        data=DataConfig(dataset="array", data_dir=str(npz), binarize=args.binarize, val_size=len(x_val),
                        split="tail", seed=args.seed),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, device=args.device,
                          seed=args.seed, progress=False),
        objective=ObjectiveConfig(),
    )
    t0 = time.perf_counter()
    result = fit(config, Path(workdir) / "vaekit-run")
    wall = time.perf_counter() - t0
    first = next(row["seconds"] for row in result.history if row["split"] == "train")
    return result.model, wall, first


def train_pythae(args, pythae, x_train, x_val_bin, workdir):
    torch.manual_seed(args.seed)
    enc = MLPEncoder(args.hidden, args.latent, args.activation)
    model = pythae_vae(pythae, enc, mlp_decoder(args.hidden, args.latent, args.activation), args.latent)
    grey = torch.from_numpy(x_train.astype(np.float32) / 255.0)
    train = pythae_dataset(grey if args.binarize == "dynamic" else (grey > 0.5).float(), args.binarize == "dynamic")
    timer = epoch_timer()
    t0 = time.perf_counter()
    with quiet():
        trainer = pythae_trainer(model, train, pythae_dataset(x_val_bin, False), batch=args.batch, lr=args.lr,
                                 epochs=args.epochs, device=args.device, seed=args.seed,
                                 out_dir=Path(workdir) / "pythae-run", callbacks=[timer])
        trainer.train()
    return trainer.model, time.perf_counter() - t0, timer.seconds[0]


def score(model, x, k, device, seed) -> tuple[torch.Tensor, float]:
    """(per-image NLL [N] from vaekit.evaluate.iw_nll, seconds)."""
    from vaekit.evaluate import iw_nll

    g = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    nll = iw_nll(model, x.to(device), k, batch_size=500, generator=g).double().cpu()
    sync(device)
    return nll, time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST .npz or 'synthetic'")
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",")], default=[200, 200])
    parser.add_argument("--latent", type=int, default=50)
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    parser.add_argument("--small", action="store_true", help="stand-in: 784-64-16 tanh")
    parser.add_argument("--binarize", choices=("static", "dynamic"), default="static")
    parser.add_argument("--k", type=int, default=100, help="importance samples for the test NLL")
    parser.add_argument("--n-test", type=int, default=1000, help="test images scored (<= 10000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.small:
        args.hidden, args.latent = [64], 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, xt, source = load_mnist(args.data)
    n_val = min(1000, x.shape[0] // 2)  # MNIST: the last 1,000 of its 60,000
    x_train, x_val = x[:-n_val], x[-n_val:]
    # The same binary val/test images for both (dynamic: one seeded draw, as vaekit does).
    x_val_bin = binarize(x_val, args.binarize, seed=args.seed + 1)
    x_test_bin = binarize(xt[: args.n_test], args.binarize, seed=args.seed + 2)
    arch = "-".join(map(str, [784, *args.hidden, args.latent]))
    print(f"data: {source}; {args.binarize} binarization; {x_train.shape[0]:,} train / {x_val.shape[0]:,} val; "
          f"{args.n_test} test images scored")
    print(f"model: {arch} {args.activation}, Bernoulli decoder; Adam lr {args.lr}, batch {args.batch}, "
          f"{args.epochs} epoch(s); device {device}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"estimator for both: vaekit.evaluate.iw_nll, k={args.k}, same noise seed\n")

    warm_up_torch()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model, wall, first = train_vaekit(args, x_train, x_val, xt, work)
        rows.append(("vaekit (train.fit)", wall, first, *score(model, x_test_bin, args.k, device, args.seed)))
        pythae, reason = import_pythae()
        if pythae is None:
            print(f"pythae: skipped: {reason}")
        else:
            model, wall, first = train_pythae(args, pythae, x_train, x_val_bin, work)
            adapter = PythaeAdapter(model, args.latent).to(device)
            rows.append(("pythae 0.1.2 (BaseTrainer)", wall, first,
                         *score(adapter, x_test_bin, args.k, device, args.seed)))

    print("train wall: the library's whole training call (vaekit.train.fit also reads and binarizes\n"
          "its npz, checkpoints and draws pictures; pythae's BaseTrainer also saves its model);\n"
          "epoch 1: the first epoch's training pass alone.\n")
    print(f"{'library':<28} {'train wall s':>12} {'epoch 1 s':>10} {'test NLL (nats)':>16} {'eval s':>7}")
    for name, wall, first, nll, secs in rows:
        print(f"{name:<28} {wall:12.1f} {first:10.2f} {float(nll.mean()):16.2f} {secs:7.1f}")
    for name, wall, first, nll, secs in rows:
        print(f"SUMMARY pythae_compare {name}: test NLL {float(nll.mean()):.2f} (k={args.k}, {args.n_test} images; "
              f"{arch} {args.activation}, {args.epochs} ep); train {wall:.1f} s, epoch 1 {first:.2f} s")
    if len(rows) == 2:
        d = rows[1][3] - rows[0][3]  # paired by image: the images' own difficulty cancels
        print(f"SUMMARY pythae_compare NLL difference pythae - vaekit: {float(d.mean()):+.2f} "
              f"+/- {float(d.std()) / math.sqrt(len(d)):.2f} nats (paired s.e.); "
              f"train wall pythae/vaekit {rows[1][1] / rows[0][1]:.2f}, epoch 1 {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
