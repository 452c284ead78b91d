"""Datasets, their configuration, checks, binarization and splits.

Every loader returns float32 images ``[N, C, H, W]`` (or ``[N, D]`` for flat arrays)
scaled to [0, 1]: uint8 grey levels are divided by 255, scikit-learn's digits (0..16)
by 16; float arrays are taken as they are (finite; range-checked only if binarized).
:func:`load_dataset` carves a validation set from the training set and, where a source
has no test set, a test set with a seed fixed at 0 so that it never moves when
``DataConfig.seed`` does. The file formats and the MNIST download are
:mod:`vaekit.readers`; :class:`vaekit.batching.BatchIterator` batches a tensor on the
device, reproducibly and resumably, with the same batches split over DDP ranks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .checks import (
    MAX_SEED, _count_nonfinite, _shown, _value_range, check_choice, check_int, check_number, in_section, refuse_inert,
    reset_inert,
)
from .readers import MNIST_FILES, _load_array, _load_digits, _load_folder, _load_mnist, download_mnist, read_idx
from .sprites import MAX_SPRITES  # sprites_count at most (11.3 GiB in float32)

__all__ = [
    "DataConfig", "SplitData", "load_dataset", "read_idx", "download_mnist",
    "binarize_static", "binarize_dynamic", "check_images", "DATASETS", "FILE_DATASETS", "BINARIZATIONS",
    "MNIST_FILES",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "array", "folder", "sprites")
# the datasets read from files, whose place (data_dir) a run records; the others are made in memory
FILE_DATASETS = ("mnist", "fashion-mnist", "array", "folder")
BINARIZATIONS = ("none", "static", "dynamic")
SPLITS = ("random", "tail")
_DIGITS_TEST, _CARVED_TEST_FRACTION = 297, 0.15



# Fields that act only for some datasets (:func:`vaekit.checks.refuse_inert`).
_ONLY_WITH = {
    "download": (False, ("dataset",), lambda d: d in ("mnist", "fashion-mnist"), "dataset 'mnist' or 'fashion-mnist'"),
    "sprites_count": (50000, ("dataset",), lambda d: d == "sprites", "dataset='sprites'"),
}


def data_without_inert(section: dict, keep=()) -> dict:
    """A saved ``data`` section with the fields earlier versions accepted where they had no
    effect set to their defaults, so the runs saved then still load: a ``data_dir`` for
    "digits" or "sprites" (which read none) dropped, a ``download`` or ``sprites_count``
    the dataset does not use reset."""
    if section.get("dataset", "digits") in ("digits", "sprites") and "data_dir" in section and "data_dir" not in keep:
        section = {k: v for k, v in section.items() if k != "data_dir"}
    return reset_inert(section, {"dataset": "digits"}, _ONLY_WITH, keep)


@dataclass
class DataConfig:
    """Which data, how it is binarized and how validation is carved from training.

    Attributes:
        dataset: "digits" (bundled with scikit-learn), "mnist", "fashion-mnist",
            "array" (a .npy/.npz file, told apart by its content), "folder" (a folder of
            PNG or JPEG images, 8 bits a channel and opaque) or "sprites".
        data_dir: for "mnist"/"fashion-mnist" the directory (not a file in it) holding
            the four IDX files (raw or .gz) or an .npz named ``<dataset>.npz``
            (``mnist.npz``, ``fashion-mnist.npz``; default ``data/<dataset>``); for "array"
            a .npy/.npz file; for "folder" a folder of images. Refused for "digits" and
            "sprites", which read none. ``~`` is expanded; a trained run records the
            absolute path.
        binarize: "none"; "static" (``x > 0.5``, at load time); or "dynamic": training
            batches are fresh Bernoulli samples of the grey levels (drawn by
            :class:`vaekit.batching.BatchIterator`), while validation and test are binarized ONCE, at
            load time, so every evaluation sees the same binary images: validation with a
            generator seeded with ``seed + 1``, test with its own, seeded with ``seed + 3``
            (so the test images do not depend on ``val_size`` or ``split``).
        val_size: a count (int >= 0) or a fraction of the training set (float in [0, 1)).
            The MNIST convention is ``val_size=10000, split="tail"``. With no validation
            examples training keeps its last model (not the best by validation ELBO)
            and cannot stop early.
        split: "random" (a permutation seeded with ``seed``) or "tail" (the last
            ``val_size`` training examples).
        seed: seeds the validation split and the binarization of val/test.
        download: fetch missing MNIST-like files (see :func:`download_mnist`); for "mnist"
            and "fashion-mnist" only.
        sprites_count: how many images of the "sprites" factor data set
            (:mod:`vaekit.sprites`) to render, factors drawn with seed 0; the
            labels are the five factors.
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    binarize: str = "none"
    val_size: Union[int, float] = 0.1
    split: str = "random"
    seed: int = 0
    download: bool = False
    sprites_count: int = 50000

    def __post_init__(self) -> None:
        with in_section("DataConfig"):
            self._check()

    def _check(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)  # keep the config JSON-serialisable
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise TypeError(f"data_dir must be a str or None, got {type(self.data_dir).__name__}")
        if self.data_dir is None and self.dataset in ("array", "folder"):
            raise ValueError(f"data_dir is required for dataset={self.dataset!r}, got None")
        if self.data_dir is not None and self.dataset in ("digits", "sprites"):  # silently unused otherwise
            raise ValueError(f"data_dir is unused for dataset {self.dataset!r}; did you mean --dataset mnist, "
                             f"fashion-mnist, array or folder? got data_dir={self.data_dir!r}")
        check_choice("binarize", self.binarize, BINARIZATIONS)
        check_choice("split", self.split, SPLITS)
        v = self.val_size
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"val_size must be an int count or a float fraction, got {type(v).__name__}")
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ValueError(f"val_size as a fraction must lie in [0, 1), got {v}")
        if isinstance(v, int) and v < 0:
            raise ValueError(f"val_size must be >= 0, got {v}")
        check_int("seed", self.seed, high=MAX_SEED)
        check_int("sprites_count", self.sprites_count, low=2, high=MAX_SPRITES)
        if not isinstance(self.download, bool):
            raise TypeError(f"download must be a bool, got {type(self.download).__name__}")
        refuse_inert(self, _ONLY_WITH)


class SplitData(NamedTuple):
    """Float32 data ``[N, C, H, W]`` (C = 1 grey, 3 RGB) or ``[N, D]``, int64 labels ``[N]``
    or None, and a name for messages (the dataset, or the path of the array file / folder)."""

    train: Tensor
    val: Tensor
    test: Tensor
    train_labels: Optional[Tensor]
    val_labels: Optional[Tensor]
    test_labels: Optional[Tensor]
    name: str


# ---------------------------------------------------------------------------------------
# Checks and binarization


def check_images(x, name: str = "x", support: str = "unit") -> Tensor:
    """Raise unless ``x`` is a non-empty floating tensor ``[N, *event]`` of finite values,
    in [0, 1] when ``support == "unit"`` (any real when ``"real"``). Returns ``x``."""
    check_choice("support", support, ("unit", "real"))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [N, *event] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    # One pass for the smallest and largest values, with no mask of x's size (a data set's
    # masks and their sums took 2.3 times its memory); NaN or an infinity shows in them.
    lo, hi = _value_range(x)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} holds {_count_nonfinite(x)} NaN or infinite values out of {x.numel()}")
    if support == "unit" and not (lo >= 0 and hi <= 1):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{_shown(lo, lo < 0)}, {_shown(hi, hi > 1)}]")
    return x


def binarize_static(x: Tensor, threshold: float = 0.5) -> Tensor:
    """``1[x > threshold]`` in the dtype of ``x``; ``x`` and ``threshold`` must lie in [0, 1]."""
    check_images(x, "x")
    check_number("threshold", threshold, high=1.0)
    return (x > threshold).to(x.dtype)


def binarize_dynamic(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One Bernoulli draw per pixel, ``b ~ Bernoulli(x)`` so ``E[b] = x``; ``x`` in [0, 1].

    ``generator`` must live on ``x``'s device; the draws are a function of its state.
    """
    check_images(x, "x")
    return torch.bernoulli(x, generator=generator)


# ---------------------------------------------------------------------------------------
# Splits


def _split(n: int, count: int, seed: int, tail: bool) -> tuple:
    """Indices (kept, held out), each in increasing order; ``count`` examples held out."""
    if tail:
        return torch.arange(n - count), torch.arange(n - count, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu")
    return perm[count:].sort().values, perm[:count].sort().values


def _take(t: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    return None if t is None else t[idx]


# The rows :func:`_parted` moves at once: a few MB, whatever the data set.
_MOVE_BYTES = 1 << 24


def _parted(x: Tensor, keep: Tensor, held: Tensor, tail: bool) -> tuple[Tensor, Tensor]:
    """``(x[keep], x[held])`` (indices from :func:`_split`) as two views of ``x``'s own
    memory, so that a split costs no second copy of the data set: ``x``'s rows are
    reordered in place, the kept ones first, for a random split (a tail split is in order
    already). ``x`` must be the loader's own tensor, shared with nothing else."""
    if not tail and len(held):
        held_rows = x[held]  # (a copy of the smaller part, for the moment)
        rows = max(1, _MOVE_BYTES // max(1, x[0].numel() * x.element_size()))
        for start in range(0, len(keep), rows):
            # keep increases, so keep[j] >= j: each block's rows lie at or after where they go,
            # and after every row an earlier block wrote; x[...] gathers them before they move
            idx = keep[start : start + rows]
            x[start : start + len(idx)] = x[idx]
        x[len(keep) :] = held_rows
    return x[: len(keep)], x[len(keep) :]


def load_dataset(config: DataConfig) -> SplitData:
    """Load ``config.dataset`` and split it into train / val / test (see :class:`DataConfig`).

    Sources without a test set ("array" without x_test, "folder") lose a fixed 15 %
    (seed 0) to test; "digits" loses 297 of its 1,797 images the same way.
    """
    if not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig, got {type(config).__name__}")
    config.__post_init__()  # again: a field assigned since (val_size = -5 swapped train and val)
    name = config.dataset
    if name == "digits":
        x, y = _load_digits()
        xt = yt = None
    elif name in ("mnist", "fashion-mnist"):
        root = Path(config.data_dir or os.path.join("data", name)).expanduser()
        x, y, xt, yt = _load_mnist(root, name, config.download)
    elif name == "sprites":
        from .sprites import make_sprites

        x, y = make_sprites(config.sprites_count, seed=0)
        xt = yt = None
    else:
        path = Path(config.data_dir).expanduser()
        if name == "array" and path.suffix.lower() not in (".npy", ".npz"):  # (read by content: either)
            raise ValueError(f"data_dir for dataset='array' must be a .npy or .npz file, got {str(path)!r}")
        x, y, xt, yt = (_load_array if name == "array" else _load_folder)(path)
        name = str(path)  # the file or folder, as errors about its contents must name it
    if xt is not None and len(xt) and tuple(xt.shape[1:]) != tuple(x.shape[1:]):  # not only after training
        raise ValueError(f"{name}: the test images have shape {tuple(xt.shape[1:])} but the training images "
                         f"{tuple(x.shape[1:])}")
    if xt is None:
        n_test = _DIGITS_TEST if config.dataset == "digits" else max(1, round(_CARVED_TEST_FRACTION * len(x)))
        if len(x) - n_test < 1:
            raise ValueError(f"{name}: {len(x)} examples are too few to carve a test set of {n_test}")
        keep, held = _split(len(x), n_test, 0, tail=False)
        (x, xt), y, yt = _parted(x, keep, held, tail=False), _take(y, keep), _take(y, held)
    v = config.val_size
    n_val = v if isinstance(v, int) else int(round(v * len(x)))
    if n_val >= len(x):
        raise ValueError(f"val_size={v} leaves no training examples out of {len(x)}")
    keep, held = _split(len(x), n_val, config.seed, tail=config.split == "tail")
    (train, val), ytr, yv = _parted(x, keep, held, config.split == "tail"), _take(y, keep), _take(y, held)
    if config.binarize == "static":
        for label, t in (("train", train), ("val", val), ("test", xt)):
            if len(t):
                check_images(t, f"{name} {label} (binarize='static'; 'none' keeps the values)")
                # binarize_static's values, (t > 0.5) in t's dtype, written over the loader's own
                # tensors: no second copy, and no second check
                t.gt_(0.5)
    elif config.binarize == "dynamic":
        check_images(train, f"{name} train (binarize='dynamic': grey levels to draw from; 'none' keeps the values)")
        # One generator each: the test draw must not depend on how many validation images
        # were drawn before it (seed + 2 is `vaekit evaluate --split train`'s draw).
        val, xt = (binarize_dynamic(t, torch.Generator().manual_seed(config.seed + offset)) if len(t) else t
                   for t, offset in ((val, 1), (xt, 3)))
    return SplitData(train, val, xt, ytr, yv, yt, name)
