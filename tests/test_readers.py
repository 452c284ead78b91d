"""Tests of vaekit.readers: IDX files (against an encoder written here) and the MNIST
download (urlopen replaced by a local server of bytes). The loaders behind load_dataset
are tested through it in test_data.py."""

import gzip
import hashlib
import http.client
import io
import os
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data import idx_bytes, mnist_like, write_mnist
from vaekit import readers
from vaekit.data import DataConfig, load_dataset
from vaekit.readers import download_mnist, read_idx


# ---------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4).astype(dtype)
    raw = idx_bytes(a)
    # a misleading suffix: compression is detected from the bytes
    path = tmp_path / ("data.idx" if compress else "data.gz")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw[:-1], "payload has"),                     # truncated payload
    (lambda raw: raw + b"\x00", "payload has"),                # trailing bytes
    (lambda raw: raw[:6], "header truncated"),                 # truncated dims
    (lambda raw: b"\x01\x02" + raw[2:], "not an IDX file"),    # wrong magic
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "dtype code"),   # unknown dtype
    (lambda raw: b"", "not an IDX file"),
    (lambda raw: gzip.compress(raw)[:-10], "gzip"),            # truncated gzip stream
    (lambda raw: gzip.compress(raw + b"\x00"), r"payload has more than the 18 bytes that dims \(2, 3, 3\)"),
    (lambda raw: raw[:4] + b"\xff" * 12, r"need \d{20,} \(truncated"),  # absurd dims: no int64 overflow
])
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "bad-idx3-ubyte" in str(info.value)


def test_a_gzip_idx_is_decompressed_no_further_than_its_header_announces(tmp_path, monkeypatch):
    """A small .gz whose header announces 18 bytes but that inflates to 10 MB (a gzip bomb
    would to gigabytes) was decompressed whole before its header was read."""
    raw = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw + bytes(10**7)))
    read, real = [], gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: read.append(len(out := real(self, n))) or out)
    with pytest.raises(ValueError, match=r"bomb-idx3-ubyte\.gz: payload has more than the 18 bytes that dims "
                                         r"\(2, 3, 3\) of uint8 need \(trailing data, or corrupt\)"):
        read_idx(path)
    assert 0 < sum(read) <= len(raw) + 1


@pytest.mark.parametrize("make, error, message", [
    (lambda p: p.mkdir(), ValueError, r"idx: a folder, not a file; expected an IDX file"),
    (lambda p: __import__("os").mkfifo(p), ValueError, r"idx: not a regular file \(a pipe"),  # before: hung
    (lambda p: p.symlink_to(p), ValueError, r"idx: a link that leads nowhere"),
    (lambda p: None, FileNotFoundError, r"idx: no such file"),
], ids=["folder", "pipe", "loop", "absent"])
def test_read_idx_names_a_path_that_is_no_file(tmp_path, make, error, message):
    make(tmp_path / "idx")
    with pytest.raises(error, match=message):
        read_idx(tmp_path / "idx")


def test_read_idx_names_a_path_that_is_not_a_path():
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got NoneType"):
        read_idx(None)


def test_mnist_files_that_are_no_files_are_named_not_just_missing(tmp_path):
    import os

    write_mnist(tmp_path, mnist_like(np.random.default_rng(0)), gz=(False,) * 4)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte").mkdir()
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    os.mkfifo(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"missing \['train-images-idx3-ubyte', 't10k-labels-idx1-ubyte'\]; "
                       r"train-images-idx3-ubyte: a folder, not a file; t10k-labels-idx1-ubyte\.gz: not a regular "
                       r"file \(a pipe"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path), val_size=0))


# ---------------------------------------------------------------------------------------
# Download, with urlopen replaced by a local server of bytes


@pytest.fixture
def fake_mirrors(monkeypatch, tmp_path):
    """Two mirrors: the first always fails, the second serves gz files from disk."""
    served = tmp_path / "served"
    write_mnist(served, mnist_like(np.random.default_rng(5)), gz=(True,) * 4)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://down.invalid/", "http://ok.invalid/"), sums))
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if url.startswith("http://down.invalid/"):
            raise urllib.error.URLError("mirror down")
        return io.BytesIO((served / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(readers, "urlopen", fake_urlopen)
    return served, sums, calls


def test_download_mnist_tries_mirrors_and_checks_sha256(tmp_path, fake_mirrors):
    served, sums, calls = fake_mirrors
    root = tmp_path / "dl"
    paths = download_mnist(root, "mnist")
    assert sorted(p.name for p in root.iterdir()) == sorted(sums)  # no temporary files left
    for p in paths:
        assert p.read_bytes() == (served / p.name).read_bytes()
    assert len(calls) == 8 and calls[0].startswith("http://down.invalid/")
    download_mnist(root, "mnist")  # files present with the right sum: nothing fetched
    assert len(calls) == 8
    d = load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path / "dl2"), download=True, val_size=0))
    assert d.train.shape == (20, 1, 4, 5) and len(d.val) == 0


def test_download_mnist_bad_checksum_leaves_nothing(tmp_path, fake_mirrors, monkeypatch):
    _, sums, _ = fake_mirrors
    wrong = dict(sums, **{"train-images-idx3-ubyte.gz": "0" * 64})
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://ok.invalid/",), wrong))
    root = tmp_path / "dl"
    with pytest.raises(OSError, match="train-images-idx3-ubyte.gz.*sha256"):
        download_mnist(root, "mnist")
    left = {p.name for p in root.iterdir()} if root.exists() else set()  # files fetched before may stay
    assert "train-images-idx3-ubyte.gz" not in left and not any(n.endswith(".part") for n in left)
    assert all(hashlib.sha256((root / n).read_bytes()).hexdigest() == sums[n] for n in left)


def test_a_failed_download_leaves_no_folders_it_made(tmp_path, fake_mirrors, monkeypatch):
    _, sums, _ = fake_mirrors
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://ok.invalid/",), {n: "0" * 64 for n in sums}))
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match="sha256"):
        download_mnist(tmp_path / "kept" / "new" / "mnist", "mnist")
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()




def test_a_broken_http_reply_is_a_failed_mirror(tmp_path, fake_mirrors, monkeypatch):
    """A connection cut mid-reply or a server that does not speak HTTP raise http.client
    errors (not OSError): the mirror counts as failed and the next one is tried."""
    import http.client

    served, sums, _ = fake_mirrors
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://cut.invalid/", "http://ok.invalid/"), sums))
    good = readers.urlopen

    def flaky(url, timeout=None):
        if url.startswith("http://cut.invalid/"):
            raise http.client.IncompleteRead(b"partial")
        return good(url.replace("cut.invalid", "ok.invalid"), timeout)

    monkeypatch.setattr(readers, "urlopen", flaky)
    paths = download_mnist(tmp_path / "dl", "mnist")
    assert all(p.read_bytes() == (served / p.name).read_bytes() for p in paths)
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://cut.invalid/",), sums))
    with pytest.raises(OSError, match=r"could not download .*IncompleteRead"):
        download_mnist(tmp_path / "new" / "dl", "mnist")
    assert not (tmp_path / "new").exists()


def test_download_into_a_file_names_it(tmp_path, fake_mirrors):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(ValueError, match=r"data_dir '.*afile' is a file; expected a folder to download mnist into"):
        download_mnist(tmp_path / "afile", "mnist")


def test_download_into_a_folder_that_cannot_be_written_says_so_before_any_mirror(tmp_path, fake_mirrors, monkeypatch):
    """Each mirror's failure to write the .part file read as a network failure."""
    _, _, calls = fake_mirrors
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(readers.os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    with pytest.raises(ValueError, match=r"^data_dir '.*ro' is not writable; cannot download mnist into it$"):
        download_mnist(tmp_path / "ro", "mnist")
    assert calls == []


def test_download_onto_a_folder_names_it_before_any_mirror(tmp_path, fake_mirrors):
    _, _, calls = fake_mirrors
    (tmp_path / "dl" / "train-labels-idx1-ubyte.gz").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz is a folder; expected the downloaded file"):
        download_mnist(tmp_path / "dl", "mnist")
    assert not any("train-labels" in url for url in calls)


class CutBody(io.BytesIO):
    """A reply whose connection is cut after the first chunk: http.client raises
    IncompleteRead from read()."""

    def __init__(self, data):
        super().__init__(data)
        self.reads = 0

    def read(self, n=-1):
        self.reads += 1
        if self.reads > 1:
            raise http.client.IncompleteRead(b"", 1234)
        return super().read(16)


@pytest.mark.parametrize("reply, error", [
    (CutBody, r"IncompleteRead\(0 bytes read, 1234 more expected\)"),
    (lambda data: io.BytesIO(data[:len(data) // 2]), r"sha256 [0-9a-f]{64} does not match the published [0-9a-f]{64}"),
], ids=["cut-mid-read", "short-without-length"])
def test_a_reply_cut_short_is_a_failed_mirror_and_leaves_nothing(tmp_path, fake_mirrors, monkeypatch, reply, error):
    """Some bytes reach the .part file, then the reply ends early (cut, or short with no
    length to tell): the next mirror is tried, and no partial file is left."""
    served, sums, calls = fake_mirrors
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://cut.invalid/", "http://ok.invalid/"), sums))
    good = readers.urlopen

    def flaky(url, timeout=None):
        if not url.startswith("http://cut.invalid/"):
            return good(url, timeout)
        calls.append(url)
        return reply((served / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(readers, "urlopen", flaky)
    root = tmp_path / "dl"
    paths = download_mnist(root, "mnist")
    assert all(p.read_bytes() == (served / p.name).read_bytes() for p in paths)
    assert sorted(p.name for p in root.iterdir()) == sorted(sums)
    assert [url.split("/")[2] for url in calls] == ["cut.invalid", "ok.invalid"] * 4
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://cut.invalid/",), sums))
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match=r"could not download \S+ into .*kept: http://cut\.invalid/\S+\.gz: " + error):
        download_mnist(tmp_path / "kept", "mnist")
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_file_present_with_another_sum_is_replaced_and_one_with_the_right_sum_kept(tmp_path, fake_mirrors,
                                                                                       monkeypatch):
    """As download_mnist documents: another sum is replaced by the download (and kept when
    no mirror delivers); the right sum is neither fetched again nor rewritten."""
    served, sums, calls = fake_mirrors
    root = tmp_path / "dl"
    root.mkdir()
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"another version")
    right = root / "train-labels-idx1-ubyte.gz"
    right.write_bytes((served / right.name).read_bytes())
    before = right.stat()
    download_mnist(root, "mnist")
    assert (root / "train-images-idx3-ubyte.gz").read_bytes() == (served / "train-images-idx3-ubyte.gz").read_bytes()
    assert {url.rsplit("/", 1)[1] for url in calls} == set(sums) - {right.name}
    assert (right.stat().st_ino, right.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in root.iterdir()) == sorted(sums)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"another version")
    monkeypatch.setitem(readers._MNIST_SOURCES, "mnist", (("http://down.invalid/",), sums))
    with pytest.raises(OSError, match=r"could not download t10k-images-idx3-ubyte\.gz .*mirror down"):
        download_mnist(root, "mnist")
    assert (root / "t10k-images-idx3-ubyte.gz").read_bytes() == b"another version"


def test_the_published_sums_are_sha256_digests_of_the_four_files():
    for kind, (mirrors, sums) in readers._MNIST_SOURCES.items():
        assert sorted(sums) == sorted(f"{name}.gz" for name in readers.MNIST_FILES), kind
        assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in sums.values()), kind
        assert mirrors and all(m.startswith(("https://", "http://")) and m.endswith("/") for m in mirrors), kind


# ---------------------------------------------------------------------------------------
# Memory: one float copy of the data, the same values


def test_dividing_in_place_gives_the_float32_quotients_of_the_division_out_of_place():
    """uint8 levels are divided by 255 in place: for every level, the same float32 as
    ``astype(float32) / 255`` (the computation before) and as the exact quotient rounded
    once to float32 (float64's quotient, rounded again, is that: 53 >= 2 * 24 + 2 bits)."""
    levels = np.arange(256, dtype=np.uint8)
    before = levels.astype(np.float32) / 255
    rounded_once = (levels.astype(np.float64) / 255).astype(np.float32)
    got = readers._as_images(np.tile(levels, (3, 1)), "levels").numpy()
    assert got.dtype == np.float32
    for row in got:
        assert row.tobytes() == before.tobytes() == rounded_once.tobytes()


def _arrays(tmp_path, rng):
    x, y, xt, yt = mnist_like(rng, n_train=40, n_test=7, hw=(6, 5))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "split.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    write_mnist(tmp_path / "idx", (x, y, xt, yt))
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "mnist.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    return x, y, xt, yt


@pytest.mark.parametrize("source", ["npy", "npz", "idx", "mnist.npz"])
@pytest.mark.parametrize("split, binarize", [("tail", "none"), ("random", "none"), ("random", "static")])
def test_loaded_splits_are_the_old_computation_held_in_one_copy(tmp_path, source, split, binarize):
    """load_dataset's splits hold, bit for bit, what it computed before: the images as
    ``x.astype(np.float32) / 255`` (a .npy, an .npz, the MNIST IDX files and mnist.npz),
    indexed by the split's indices (a test set carved with seed 0 where the file has none),
    binarized as ``(t > 0.5)`` in float32; and they are views of one copy of the data
    (a random split moves the rows in place), not copies of it."""
    from vaekit.data import _split

    x, y, xt, yt = _arrays(tmp_path, np.random.default_rng(5))
    config = {"npy": dict(dataset="array", data_dir=str(tmp_path / "x.npy")),
              "npz": dict(dataset="array", data_dir=str(tmp_path / "split.npz")),
              "idx": dict(dataset="mnist", data_dir=str(tmp_path / "idx")),
              "mnist.npz": dict(dataset="mnist", data_dir=str(tmp_path / "npz"))}[source]
    data = load_dataset(DataConfig(**config, val_size=9, split=split, seed=3, binarize=binarize))
    whole = torch.from_numpy(x.astype(np.float32) / 255)[:, None]
    labels = None if source == "npy" else torch.from_numpy(y.astype(np.int64))
    if source == "npy":  # no test set: 15 % carved, seed 0
        keep, held = _split(len(x), 6, 0, tail=False)
        whole, test, test_labels = whole[keep], whole[held], None
    else:
        test = torch.from_numpy(xt.astype(np.float32) / 255)[:, None]
        test_labels = torch.from_numpy(yt.astype(np.int64))
    keep, held = _split(len(whole), 9, 3, tail=split == "tail")
    want = [whole[keep], whole[held], test]
    if binarize == "static":
        want = [(t > 0.5).to(torch.float32) for t in want]
    for got, expected in zip((data.train, data.val, data.test), want):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert got.numpy().tobytes() == expected.numpy().tobytes()
    if labels is not None:
        assert torch.equal(data.train_labels, labels[keep]) and torch.equal(data.val_labels, labels[held])
        assert torch.equal(data.test_labels, test_labels)
    # one copy: train and val (and a carved test set) share one tensor's memory, no more than they use
    parts = (data.train, data.val, data.test) if source == "npy" else (data.train, data.val)
    storage = data.train.untyped_storage()
    assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in parts)
    assert storage.nbytes() == sum(t.nbytes for t in parts)


def test_uint8_images_become_floats_in_one_copy():
    """The conversion holds the uint8 array and one float32 copy (NumPy's allocations,
    traced), not a float32 copy and then its quotient (twice the data)."""
    import tracemalloc

    a = np.random.default_rng(0).integers(0, 256, (500, 28, 28), dtype=np.uint8)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        t = readers._as_images(a, "a")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.nbytes <= peak <= 1.05 * t.nbytes


def test_a_random_split_moves_rows_in_a_few_blocks_of_memory(tmp_path, monkeypatch):
    """A random split allocates the held-out rows and a block of rows at a time (here 10,
    as the allocator records it), not a copy of the kept ones."""
    from test_latents import _peak_allocated
    from vaekit import data as data_module

    x = np.random.default_rng(1).integers(0, 256, (400, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    row = 28 * 28 * 4
    monkeypatch.setattr(data_module, "_MOVE_BYTES", 10 * row)
    config = DataConfig(dataset="array", data_dir=str(tmp_path / "x.npy"), val_size=50, split="random")
    out = []
    peak = _peak_allocated(lambda: out.append(load_dataset(config)))
    # held-out rows (the carved test set's 60, then validation's 50), a block, and the indices
    assert peak <= (60 + 10) * row + 400 * 8 * 6, peak / row
    assert out[0].train.shape == (290, 1, 28, 28)
