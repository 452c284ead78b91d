"""Tests of vaekit.data: every loader through load_dataset on tiny files written here, the
splits and binarization (the IDX reader and the download: test_readers.py)."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit.data import DataConfig, MNIST_FILES, binarize_dynamic, binarize_static, check_images, load_dataset


def idx_bytes(a: np.ndarray) -> bytes:
    """Encode an array as IDX independently of read_idx: struct header + big-endian payload."""
    code = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
            np.float32: 0x0D, np.float64: 0x0E}[a.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def mnist_like(rng, n_train=20, n_test=6, hw=(4, 5)):
    return (rng.integers(0, 256, (n_train, *hw), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, *hw), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8))


def write_mnist(root, arrays, gz=(False, True, False, True)):
    root.mkdir(parents=True, exist_ok=True)
    for name, a, z in zip(MNIST_FILES, arrays, gz):
        raw = idx_bytes(a)
        (root / (name + ".gz" if z else name)).write_bytes(gzip.compress(raw) if z else raw)


# ---------------------------------------------------------------------------------------
# DataConfig


@pytest.mark.parametrize("kwargs, error, field", [
    (dict(dataset="cifar"), ValueError, "dataset"),
    (dict(dataset=3), TypeError, "dataset"),
    (dict(binarize="otsu"), ValueError, "binarize"),
    (dict(split="head"), ValueError, "split"),
    (dict(val_size=-1), ValueError, "val_size"),
    (dict(val_size=1.5), ValueError, "val_size"),
    (dict(val_size=1.0), ValueError, r"val_size as a fraction must lie in \[0, 1\), got 1\.0"),
    (dict(val_size="10"), TypeError, "val_size"),
    (dict(val_size=True), TypeError, "val_size"),
    (dict(seed=-2), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(download="yes"), TypeError, "download"),
    (dict(data_dir=5), TypeError, "data_dir"),
    (dict(dataset="array"), ValueError, "data_dir"),
    # read by neither: a data_dir there is a mistake (--data-dir without --dataset mnist)
    (dict(data_dir="data/mnist"), ValueError, r"data_dir is unused for dataset 'digits'; did you mean --dataset mnist"),
    (dict(dataset="sprites", data_dir="x"), ValueError, r"data_dir is unused for dataset 'sprites'"),
    # settings the dataset would not use
    (dict(download=True), ValueError, r"download=True has no effect with dataset='digits'; use dataset 'mnist' or "
                                      r"'fashion-mnist'$"),
    (dict(dataset="array", data_dir="x.npy", download=True), ValueError, r"download=True has no effect"),
    (dict(sprites_count=100), ValueError, r"sprites_count=100 has no effect with dataset='digits'; "
                                          r"use dataset='sprites'$"),
    (dict(dataset="sprites", sprites_count=1), ValueError, r"sprites_count must be .*got 1"),
])
def test_config_rejects_bad_fields(kwargs, error, field):
    with pytest.raises(error, match=field):
        DataConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(val_size=math.nextafter(1.0, 0.0)),  # the largest fraction below 1
    dict(val_size=0.0),
    dict(dataset="sprites", sprites_count=2),
])
def test_config_accepts_the_edges_of_each_range(kwargs):
    config = DataConfig(**kwargs)
    assert all(getattr(config, k) == v for k, v in kwargs.items())


def test_val_size_may_leave_one_training_example_but_not_none():
    with pytest.raises(ValueError, match=r"val_size=1500 leaves no training examples out of 1500"):
        load_dataset(DataConfig(val_size=1500))  # the digits' 1,797 less the 297 held out for test
    with pytest.raises(ValueError, match=r"val_size=0\.9999999999999999 leaves no training examples out of 1500"):
        load_dataset(DataConfig(val_size=math.nextafter(1.0, 0.0)))
    d = load_dataset(DataConfig(val_size=1499))
    assert (len(d.train), len(d.val), len(d.test)) == (1, 1499, 297)


def test_the_same_settings_where_they_act_are_taken():
    assert DataConfig(dataset="mnist", download=True).download
    assert DataConfig(dataset="fashion-mnist", download=True).download
    assert DataConfig(dataset="sprites", sprites_count=100).sprites_count == 100


def test_config_accepts_paths(tmp_path):
    c = DataConfig(dataset="mnist", data_dir=tmp_path, val_size=10000, split="tail")
    assert c.data_dir == str(tmp_path) and c.val_size == 10000


# ---------------------------------------------------------------------------------------
# MNIST-like loaders


def test_mnist_from_idx_files_tail_split(tmp_path):
    arrays = mnist_like(np.random.default_rng(0))
    write_mnist(tmp_path, arrays)
    d = load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path), val_size=5, split="tail"))
    x, y, xt, yt = arrays
    assert d.train.shape == (15, 1, 4, 5) and d.val.shape == (5, 1, 4, 5) and d.test.shape == (6, 1, 4, 5)
    assert d.train.dtype == torch.float32
    expected = torch.from_numpy(x.astype(np.float64) / 255.0)  # scaling computed in float64
    torch.testing.assert_close(d.val[:, 0].double(), expected[15:], rtol=0, atol=1e-7)
    torch.testing.assert_close(d.train[:, 0].double(), expected[:15], rtol=0, atol=1e-7)
    assert d.val_labels.tolist() == y[15:].tolist() and d.test_labels.tolist() == yt.tolist()
    assert d.test_labels.dtype == torch.long


def test_fashion_mnist_from_npz(tmp_path):
    x, y, xt, yt = mnist_like(np.random.default_rng(1))
    np.savez(tmp_path / "fashion-mnist.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    d = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), val_size=0.25, seed=3))
    assert (len(d.train), len(d.val), len(d.test)) == (15, 5, 6)
    # the random split is a partition of the training set: match images back to rows
    rows = torch.cat([d.train, d.val])[:, 0].mul(255).round().to(torch.uint8).numpy()
    assert sorted(map(bytes, rows)) == sorted(map(bytes, x))
    # labels of any integer type (int64 is what most tools write); images must stay 8-bit
    np.savez(tmp_path / "fashion-mnist.npz", x_train=x, y_train=y.astype(np.int64), x_test=xt, y_test=yt)
    wide = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), val_size=0.25, seed=3))
    assert torch.equal(wide.train_labels, d.train_labels)
    np.savez(tmp_path / "fashion-mnist.npz", x_train=x.astype(np.float32), y_train=y, x_test=xt, y_test=yt)
    with pytest.raises(ValueError, match=r"x_train\]: expected uint8 with 3 dims, got float32"):
        load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))


def test_missing_mnist_files_error_lists_files(tmp_path):
    (tmp_path / MNIST_FILES[0]).write_bytes(idx_bytes(np.zeros((1, 2, 2), np.uint8)))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    msg = str(info.value)
    assert str(tmp_path) in msg and "download=True" in msg and "mnist.npz" in msg
    assert all(name in msg for name in MNIST_FILES)


@pytest.mark.parametrize("dataset, make, data_dir, error, pattern", [
    # the .npz itself given for its folder: say so, and what the folder's file must be named
    ("mnist", "mnist.npz", "mnist.npz", ValueError, r"^data_dir '\S+/mnist\.npz' is a file; expected the folder that "
                                                    r"holds the four mnist IDX files or mnist\.npz; give its folder, "
                                                    r"'\S+'$"),
    ("mnist", "data.npz", "data.npz", ValueError, r"give its folder, '\S+', with the file named mnist\.npz$"),
    ("fashion-mnist", "notes.txt", "notes.txt", ValueError, r"^data_dir '\S+notes\.txt' is a file; expected the "
                                                            r"folder that holds the four fashion-mnist IDX files or "
                                                            r"fashion-mnist\.npz$"),
    # a folder whose .npz has another name than the one read
    ("mnist", "data.npz", ".", FileNotFoundError, r"; '\S+' holds data\.npz, but the \.npz read must be named "
                                                  r"mnist\.npz\. Put"),
    ("fashion-mnist", "mnist.npz", ".", FileNotFoundError, r"holds mnist\.npz, but the \.npz read must be named "
                                                           r"fashion-mnist\.npz\."),
])
def test_mnist_data_dir_that_is_a_file_or_holds_another_npz_says_what_is_read(tmp_path, dataset, make, data_dir,
                                                                                error, pattern):
    (tmp_path / make).write_bytes(b"never read")
    with pytest.raises(error, match=pattern):
        load_dataset(DataConfig(dataset=dataset, data_dir=str(tmp_path / data_dir)))


def test_mnist_wrong_dims_named(tmp_path):
    x, y, xt, yt = mnist_like(np.random.default_rng(2))
    write_mnist(tmp_path, (x, y, xt, yt[:, None]))  # labels of 2 dims (int32 labels are taken)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte(\.gz)?: expected integers with 1 dims"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------
# Arrays and image folders


def test_array_npy_carves_a_fixed_test_set(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 3, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", x)
    d1 = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "a.npy"), val_size=4, seed=1))
    d2 = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "a.npy"), val_size=4, seed=2))
    assert (len(d1.train), len(d1.val), len(d1.test)) == (30, 4, 6) and d1.train_labels is None
    assert d1.name == str(tmp_path / "a.npy") and d1.train.shape[1:] == (1, 3, 3)  # errors name the file
    assert torch.equal(d1.test, d2.test) and not torch.equal(d1.val, d2.val)


def indexed(n, hw=(3, 4)):
    """``n`` uint8 images whose first two pixels spell their index (high byte, low byte),
    the others random."""
    x = np.random.default_rng(0).integers(0, 256, (n, *hw), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x


def index_of(images):
    """The indices that ``indexed`` images (loaded: float [N, 1, H, W]) spell."""
    v = (images[:, 0, 0, :2] * 255).round().long()
    return v[:, 0] * 256 + v[:, 1]


def test_splits_partition_the_array_keep_labels_aligned_and_carve_a_test_set_that_stays(tmp_path):
    """300 index-coded images, each labelled (7 i + 3) mod 300 (one label per index): for a
    count and a fraction, both splits and two seeds, train / val / test partition them, each
    image keeps its own label and its exact uint8 / 255, "tail" holds out the last val_size
    of the training set, and the carved 15 % test set (seed 0) is the same every time,
    as it is with the images binarized (the labels tell the indices then)."""
    n, n_test = 300, 45
    x, label = indexed(n), lambda i: (7 * i + 3) % n
    np.savez(tmp_path / "a.npz", x=x, y=label(np.arange(n)))
    config = lambda **kw: DataConfig(dataset="array", data_dir=str(tmp_path / "a.npz"), **kw)  # noqa: E731
    test = None
    for seed in (0, 3):
        for val_size in (0, 1, 40, 0.0, 0.25, 0.5):
            for split in ("random", "tail"):
                d = load_dataset(config(val_size=val_size, split=split, seed=seed))
                case = (seed, val_size, split)
                parts = [index_of(t) for t in (d.train, d.val, d.test)]
                assert sorted(torch.cat(parts).tolist()) == list(range(n)), case
                for idx, images, labels in zip(parts, (d.train, d.val, d.test),
                                               (d.train_labels, d.val_labels, d.test_labels)):
                    assert torch.equal(labels, label(idx)), case
                    assert torch.equal(images[:, 0], torch.from_numpy(x[idx.numpy()]).float() / 255), case
                test = parts[2] if test is None else test
                assert torch.equal(parts[2], test), case
                n_val = val_size if isinstance(val_size, int) else int(round(val_size * (n - n_test)))
                assert len(parts[1]) == n_val, case
                if split == "tail":
                    pool = sorted(set(range(n)) - set(test.tolist()))
                    assert parts[1].tolist() == pool[len(pool) - n_val:], case
                    assert parts[0].tolist() == pool[:len(pool) - n_val], case
        assert len(test) == n_test
    val = {seed: index_of(load_dataset(config(val_size=40, seed=seed)).val) for seed in (0, 3)}
    assert not torch.equal(val[0], val[3])  # the random split follows the data seed
    for binarize in ("static", "dynamic"):
        d = load_dataset(config(val_size=40, seed=3, binarize=binarize))
        assert torch.equal(d.test_labels, label(test))


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_images_are_their_uint8_values_over_255_exactly(tmp_path, gz):
    """Every grey level 0..255, read from IDX files: the float32 quotient v / 255 itself
    (not a product by 1/255, which misses it by a bit for some v), labels as written."""
    levels = np.random.default_rng(0).permutation(np.arange(20 * 4 * 5) % 256).astype(np.uint8)
    x, xt = levels.reshape(20, 4, 5), levels[::-1].reshape(20, 4, 5)[:6].copy()
    y, yt = np.arange(20, dtype=np.uint8) % 10, np.arange(6, dtype=np.uint8)
    write_mnist(tmp_path, (x, y, xt, yt), gz=(gz,) * 4)
    d = load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path), val_size=5, split="tail"))
    assert d.train.dtype == d.test.dtype == torch.float32
    assert torch.equal(torch.cat([d.train, d.val])[:, 0], torch.from_numpy(x).float() / 255)
    assert torch.equal(d.test[:, 0], torch.from_numpy(xt).float() / 255)
    assert torch.equal(torch.cat([d.train_labels, d.val_labels]), torch.from_numpy(y).long())
    assert torch.equal(d.test_labels, torch.from_numpy(yt).long())


def test_an_array_npz_with_a_test_split_gives_its_images_over_255_and_its_labels(tmp_path):
    """x_train, y_train, x_test, y_test: the test split is x_test / 255 exactly (uint8),
    labelled y_test as given; none of it is carved from the training set."""
    rng = np.random.default_rng(0)
    x, xt = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8), rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    y, yt = np.arange(20) % 7, np.array([9, 8, 7, 6, 5])
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    d = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "a.npz"), val_size=0))
    assert torch.equal(d.test[:, 0], torch.from_numpy(xt).float() / 255)
    assert d.test_labels is not None and d.test_labels.tolist() == yt.tolist()
    assert torch.equal(d.train[:, 0], torch.from_numpy(x).float() / 255) and d.train_labels.tolist() == y.tolist()


def test_array_npz_channels_last_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=x, y_train=np.arange(10), x_test=xt)
    d = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "c.npz"), val_size=0))
    assert d.train.shape == (10, 3, 4, 5) and d.test_labels is None
    assert d.train[7, 2, 1, 4].item() == pytest.approx(x[7, 1, 4, 2] / 255)
    assert d.train_labels.tolist() == list(range(10))
    flat = rng.random((20, 6))
    np.savez(tmp_path / "f.npz", x=flat, y=np.arange(20))
    d = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "f.npz"), val_size=0))
    assert d.train.shape == (17, 6) and d.test.shape == (3, 6)
    rows = {tuple(r) for r in flat.astype(np.float32).tolist()}
    assert all(tuple(r) in rows for r in d.test.tolist())


def test_a_shape_that_fits_both_layouts_is_read_channels_last_with_a_warning(tmp_path, recwarn):
    """[N, 3, 5, 3] is a 3 x 5 RGB image or a 3-channel 5 x 3 one: it was read the first way
    without a word. A folder of 3 x 3 RGB files is known to be channels last: no warning."""
    x = np.random.default_rng(1).integers(0, 256, (12, 3, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "amb.npy", x)
    with pytest.warns(UserWarning, match=r"amb\.npy: shape \(12, 3, 5, 3\) reads as \[N, H, W, C\] and as "
                                         r"\[N, C, H, W\]; taken as \[N, H, W, C\]"):
        d = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "amb.npy"), val_size=0))
    assert d.train.shape[1:] == (3, 3, 5)
    np.save(tmp_path / "plain.npy", x[:, :, :4, :].transpose(0, 2, 1, 3))  # [N, 4, 3, 3]: channels last only
    recwarn.clear()
    load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "plain.npy"), val_size=0))
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(x[i, :, :3, :]).save(tmp_path / "imgs" / f"{i}.png")
    d = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path / "imgs"), val_size=0))
    assert d.train.shape[1:] == (3, 3, 3)
    assert not [w for w in recwarn if "reads as" in str(w.message)]


def test_a_test_split_of_another_shape_is_refused_at_load_time(tmp_path):
    """It was found only after training, when the run's pictures scored the test images."""
    np.savez(tmp_path / "m.npz", x_train=np.zeros((40, 6, 5), np.uint8), x_test=np.zeros((7, 5, 6), np.uint8))
    with pytest.raises(ValueError, match=r"m\.npz: the test images have shape \(1, 5, 6\) but the training images "
                                         r"\(1, 6, 5\)"):
        load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "m.npz")))


@pytest.mark.parametrize("array, error, message", [
    (np.array([[0.5, np.nan, np.inf]] * 3), ValueError, "6 of 9 values"),
    (np.zeros((0, 4), np.uint8), ValueError, "empty"),
    (np.zeros((4, 4), np.int64), TypeError, "int64"),
    (np.zeros((4, 2, 2, 5), np.uint8), ValueError, "shape"),
])
def test_array_rejects_bad_arrays(tmp_path, array, error, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(error, match=message) as info:
        load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "bad.npy")))
    assert "bad.npy" in str(info.value)


def _odd_zip(path, flag: int = 0, method: int = 0, **arrays) -> None:
    """An .npz of ``arrays`` (``x`` by default) whose zip headers claim ``flag`` (1: encrypted)
    and ``method`` (a compression method zipfile lacks), as another zip tool may write."""
    np.savez(path, **(arrays or {"x": np.zeros((6, 2, 2), np.uint8)}))
    raw = bytearray(path.read_bytes())
    for magic, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # each local header, each central directory entry
        i = raw.find(magic)
        while i >= 0:
            raw[i + at] |= flag
            if method:
                raw[i + at + 2 : i + at + 4] = struct.pack("<H", method)
            i = raw.find(magic, i + 4)
    path.write_bytes(bytes(raw))


def _claims_1tib(path, npz: bool = False) -> None:
    """An .npy (or an .npz of ``x``) whose header claims 2**40 bytes of float32 over 16 bytes of data."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**18, 1024, 1024)})
    raw = buf.getvalue() + bytes(16)
    if npz:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("name, make, message", [
    ("e.npz", lambda p: _odd_zip(p, flag=1), r"e\.npz: not a readable \.npy or \.npz array file \(File 'x\.npy' is "
                                             r"encrypted"),
    ("m.npz", lambda p: _odd_zip(p, method=99), r"m\.npz: not a readable .* \(That compression method is not "
                                                r"supported\)"),
    ("big.npy", _claims_1tib, r"big\.npy: its header claims an array of shape \(262144, 1024, 1024\) and dtype "
                              r"float32 \(1099511627776 bytes\), but the file holds 16 bytes of data \(truncated or "
                              r"corrupt\)$"),
    ("big.npz", lambda p: _claims_1tib(p, npz=True), r"big\.npz\[x\]: its header claims .* but the entry holds 16 "
                                                     r"bytes of data"),
], ids=["encrypted", "unknown-compression", "header-claims-1TiB", "npz-entry-claims-1TiB"])
def test_array_files_damaged_past_numpys_own_checks_are_named(tmp_path, name, make, message):
    """zipfile's RuntimeError and NotImplementedError, and a header whose claim np.load would
    try to allocate (out of memory), were tracebacks or a misleading advice."""
    make(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / name)))


def test_an_array_file_is_read_by_its_content_whatever_its_suffix_says(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 2, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", x)
    (tmp_path / "a.npy").rename(tmp_path / "npy-named.npz")
    np.savez(tmp_path / "b.npz", x=x)
    (tmp_path / "b.npz").rename(tmp_path / "npz-named.npy")
    with open(tmp_path / "UPPER.NPY", "wb") as f:  # (np.save would add .npy to the name)
        np.save(f, x)
    for name in ("npy-named.npz", "npz-named.npy", "UPPER.NPY"):
        d = load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / name), val_size=0))
        got = torch.cat([d.train, d.test])
        assert got.shape == (10, 1, 2, 3) and sorted(got.flatten().tolist()) == sorted((x / 255.0).astype(np.float32)
                                                                                      .flatten().tolist())
    # the MNIST reader's mnist.npz, an .npy or an encrypted .npz, named too
    np.save(tmp_path / "mnist.npy", x)
    (tmp_path / "mnist.npy").rename(tmp_path / "mnist.npz")
    with pytest.raises(ValueError, match=r"mnist\.npz holds an \.npy array despite its name; expected an \.npz"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    _odd_zip(tmp_path / "mnist.npz", flag=1, **dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                                        mnist_like(np.random.default_rng(0)))))
    with pytest.raises(ValueError, match=r"mnist\.npz: not a readable \.npz file \(File 'x_train\.npy' is encrypted"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))


def test_binarize_rejects_data_outside_unit_interval(tmp_path):
    np.save(tmp_path / "real.npy", np.full((10, 4), 2.0, np.float32))
    assert load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "real.npy"))).train.max() == 2.0
    for mode in ("static", "dynamic"):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            load_dataset(DataConfig(dataset="array", data_dir=str(tmp_path / "real.npy"), binarize=mode))


def test_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    grey = {c: [rng.integers(0, 256, (3, 4), dtype=np.uint8) for _ in range(5)] for c in ("cat", "dog")}
    for c, imgs in grey.items():
        (tmp_path / c).mkdir()
        for i, a in enumerate(imgs):
            Image.fromarray(a, mode="L").save(tmp_path / c / f"{i}.png")
    d = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), val_size=0))
    assert d.train.shape == (8, 1, 3, 4) and d.test.shape == (2, 1, 3, 4)
    x = torch.cat([d.train, d.test])
    labels = torch.cat([d.train_labels, d.test_labels])
    # every loaded image is one written image, under its class's label (0 cat, 1 dog)
    for img, lab in zip(x, labels):
        written = np.stack(grey[("cat", "dog")[lab]])
        assert ((written / 255.0 - img[0].numpy()) ** 2).sum((1, 2)).min() < 1e-10
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    # a grey image stored with a palette (as PNG optimisers write them) stays grey
    Image.fromarray(grey["cat"][0], mode="L").convert("P").save(tmp_path / "cat" / "palette.png")
    d = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), val_size=0))
    assert d.train.shape[1:] == (1, 3, 4) and len(d.train) + len(d.test) == 11
    (tmp_path / "cat" / "palette.png").unlink()
    # an RGB file whose channels happen to be equal stays RGB, as it always loaded
    Image.fromarray(np.repeat(grey["cat"][0][..., None], 3, axis=-1)).save(tmp_path / "cat" / "rgb.png")
    d = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), val_size=0))
    assert d.train.shape[1:] == (3, 3, 4)
    (tmp_path / "cat" / "rgb.png").unlink()
    # one colour JPEG makes the whole set RGB
    Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).save(tmp_path / "dog" / "c.jpg")
    d = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), val_size=0))
    assert d.train.shape[1:] == (3, 3, 4) and len(d.train) + len(d.test) == 11


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path)))
    Image.new("L", (4, 3)).save(tmp_path / "a.png")
    Image.new("L", (5, 3)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b\.png is 5x3"):
        load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path)))


def test_folder_refuses_16_bit_and_damaged_images_by_name(tmp_path):
    """A 16-bit grey PNG would be clipped to 8 bits (and read as colour); a truncated file
    stopped the load with PIL's message alone. Both name the file now."""
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.array([[0, 1000, 65535]], np.uint16)).save(deep / "a.png")
    with pytest.raises(ValueError, match=r"a\.png has mode 'I;16'.*8-bit images"):
        load_dataset(DataConfig(dataset="folder", data_dir=str(deep)))
    cut = tmp_path / "cut"
    cut.mkdir()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(cut / "a.png")
    raw = (cut / "a.png").read_bytes()
    (cut / "b.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"b\.png is not a readable image"):
        load_dataset(DataConfig(dataset="folder", data_dir=str(cut)))


def _png_rgb16(path, a: np.ndarray) -> None:
    """A 16-bit RGB PNG of ``a`` ([H, W, 3] uint16), written here: Pillow writes none."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = a.shape
    rows = b"".join(b"\0" + a[r].astype(">u2").tobytes() for r in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _alpha_digit(mode):
    """A 4 x 4 image drawn in its alpha alone (white everywhere, a transparent frame)."""
    a = np.full((4, 4, 4), 255, np.uint8)
    a[0, :, 3] = 0
    if mode == "P":  # a palette with a transparent entry, used by the top row
        im = Image.fromarray(a[..., 0]).convert("P")
        im.putpixel((0, 0), 7)
        im.info["transparency"] = 7
        return im
    return Image.fromarray(a, "RGBA").convert(mode)


@pytest.mark.parametrize("write, message", [
    (lambda p: _alpha_digit("RGBA").save(p), r"a\.png has transparency \(4 of 16 pixels not opaque, mode 'RGBA'\); "
                                             r"the folder reader expects opaque images"),
    (lambda p: _alpha_digit("LA").save(p), r"a\.png has transparency \(4 of 16 pixels not opaque, mode 'LA'\)"),
    (lambda p: _alpha_digit("P").save(p, transparency=7), r"a\.png has transparency \(1 of 16 pixels not opaque, "
                                                          r"mode 'P'\)"),
    (lambda p: _png_rgb16(p, np.full((4, 4, 3), 1000, np.uint16)),
     r"a\.png has mode 'RGB' stored as 'RGB;16B' \(more than 8 bits a channel\); the folder reader takes 8-bit"),
    (lambda p: Image.new("L", (4, 4)).save(p), r"a\.png is too large to read: Image size \(16 pixels\) exceeds limit "
                                               r"of 2 pixels"),
], ids=["rgba", "la", "palette-transparency", "rgb-16-bit", "decompression-bomb"])
def test_folder_refuses_what_it_would_read_wrong_by_name(tmp_path, monkeypatch, write, message):
    """Transparency was dropped (a digit drawn in alpha alone became blank), a 16-bit RGB
    PNG cut to its high bytes (16-bit grey is refused), and an image past Pillow's bound
    on pixels (DecompressionBombError, no OSError) was a traceback."""
    Image.new("L", (4, 4), 128).save(tmp_path / "b.png")
    write(tmp_path / "a.png")
    if "too large" in message:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1)  # 16 pixels > 2 * 1: Pillow's DecompressionBombError
    with pytest.raises(ValueError, match=message):
        load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), val_size=0))


def test_folder_reads_opaque_alpha_and_turns_images_as_their_exif_says(tmp_path):
    """An alpha channel that is all opaque is no transparency; a JPEG stored 6 wide and 4 high
    with EXIF orientation 6 (turn 90 degrees clockwise to show) is an image 4 wide and 6 high."""
    a = np.zeros((4, 6), np.uint8)
    a[:, :3] = 255  # stored: the left half white; shown turned clockwise, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    Image.fromarray(np.full((6, 4, 2), 255, np.uint8), "LA").save(tmp_path / "opaque.png")
    d = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), val_size=0))
    x = torch.cat([d.train, d.test])
    assert x.shape == (2, 1, 6, 4)
    turned = next(img[0] for img in x if img.min() < 0.5)
    assert (turned[:3] > 0.9).all() and (turned[3:] < 0.1).all()


# ---------------------------------------------------------------------------------------
# Digits, splits and binarization


def test_digits_sizes_and_split_determinism():
    from sklearn.datasets import load_digits

    d0 = load_dataset(DataConfig(seed=0))
    assert (len(d0.train), len(d0.val), len(d0.test)) == (1350, 150, 297)
    assert d0.train.shape[1:] == (1, 8, 8) and d0.train.min() == 0 and d0.train.max() == 1
    again, d1 = load_dataset(DataConfig(seed=0)), load_dataset(DataConfig(seed=1))
    assert torch.equal(again.val, d0.val) and torch.equal(again.train_labels, d0.train_labels)
    assert torch.equal(d1.test, d0.test) and not torch.equal(d1.val, d0.val)
    # the three sets partition the bundled images, each scaled by 1/16
    ref = load_digits().images
    got = torch.cat([d0.train, d0.val, d0.test])[:, 0].double() * 16
    assert sorted(map(bytes, got.round().to(torch.uint8).numpy())) == sorted(map(bytes, ref.astype(np.uint8)))
    tail = load_dataset(DataConfig(val_size=100, split="tail"))
    assert torch.equal(tail.val, torch.cat([tail.train, tail.val])[-100:])


def test_binarization_in_load_dataset():
    grey = load_dataset(DataConfig())
    static = load_dataset(DataConfig(binarize="static"))
    for a, b in zip(static[:3], grey[:3]):
        assert torch.equal(a, (b > 0.5).float())
    dyn, dyn2 = load_dataset(DataConfig(binarize="dynamic")), load_dataset(DataConfig(binarize="dynamic"))
    assert torch.equal(dyn.train, grey.train)  # training batches are drawn by the iterator
    assert set(dyn.val.unique().tolist()) == {0.0, 1.0} and torch.equal(dyn.test, dyn2.test)
    # documented: validation drawn with seed + 1, test with its own generator, seed + 3
    assert torch.equal(dyn.val, torch.bernoulli(grey.val, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(dyn.test, torch.bernoulli(grey.test, generator=torch.Generator().manual_seed(3)))


def test_dynamic_test_draw_does_not_depend_on_the_validation_split():
    runs = [load_dataset(DataConfig(binarize="dynamic", val_size=v, split=s)) for v, s in
            ((0, "random"), (100, "random"), (300, "tail"))]
    assert all(torch.equal(r.test, runs[0].test) for r in runs[1:])
    other_seed = load_dataset(DataConfig(binarize="dynamic", seed=1))
    assert not torch.equal(other_seed.test, runs[0].test)  # the data seed still picks the draw


def test_sprites_split_labels_and_the_documented_first_test_sprite():
    """docs/disentanglement.md: --sprites-count 20000 gives 15,300 training, 1,700 validation
    and 3,000 test images, labelled with their five factors; the first test sprite is 'an
    ellipse at the largest scale, turned 72 deg, centred at pixel (23, 25)'."""
    from vaekit.sprites import make_sprites, render_sprites

    d = load_dataset(DataConfig(dataset="sprites", sprites_count=20000))
    assert (len(d.train), len(d.val), len(d.test)) == (15300, 1700, 3000)
    labels = (d.train_labels, d.val_labels, d.test_labels)
    for x, y in zip((d.train, d.val, d.test), labels):
        assert y.dtype == torch.long and y.shape == (len(x), 5)
        rows = torch.tensor([0, 1, len(x) // 2, len(x) - 1])
        assert torch.equal(render_sprites(y[rows]), x[rows])
    # the three splits partition the 20,000 sprites drawn with seed 0
    strides = torch.tensor([6 * 40 * 32 * 32, 40 * 32 * 32, 32 * 32, 32, 1])
    assert torch.equal((torch.cat(labels) * strides).sum(1).sort().values,
                       (make_sprites(20000, seed=0)[1] * strides).sum(1).sort().values)
    # shape 1 of (square, ellipse, heart), scale 5 of linspace(0.5, 1, 6), 72 deg = 8 steps of
    # 360 / 40 deg, centre 16 + i pixels
    assert d.test_labels[0].tolist() == [1, 5, 72 // 9, 23 - 16, 25 - 16]


def test_binarize_helpers():
    x = torch.tensor([[0.0, 0.3, 0.5, 0.51, 1.0]])
    assert binarize_static(x).tolist() == [[0, 0, 0, 1, 1]]
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).expand(20000, 5).contiguous()
    b = binarize_dynamic(levels, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    se = (levels[0] * (1 - levels[0]) / 20000).sqrt()
    assert ((b.mean(0) - levels[0]).abs() <= 5 * se + 1e-12).all()  # exact at 0 and 1
    for bad in (torch.tensor([[1.5]]), torch.tensor([[-0.1]])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            binarize_static(bad)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            binarize_dynamic(bad)


@pytest.mark.parametrize("x, error, message", [
    (torch.tensor([[float("nan"), 0.5]]), ValueError, "1 NaN"),
    (torch.zeros(0, 3), ValueError, "empty"),
    (torch.zeros(3), ValueError, "shape"),
    (torch.zeros(2, 3, dtype=torch.long), TypeError, "dtype"),
    (np.zeros((2, 3)), TypeError, "Tensor"),
    (torch.tensor([[0.5, 1.0000001]]), ValueError, r"got values in \[0\.5, 1\.00000011920928\d*\]"),
])
def test_check_images(x, error, message):
    with pytest.raises(error, match=message):
        check_images(x, "images")
    assert check_images(torch.full((2, 3), -4.0), "images", support="real") is not None


def test_config_errors_name_their_section():
    """seed is a field of both DataConfig and TrainConfig: the message says which."""
    from vaekit.objectives import ObjectiveConfig

    with pytest.raises(ValueError, match=r"^DataConfig\.seed must be an int in \[0, 9223372036854775807\], got -1$"):
        DataConfig(seed=-1)
    with pytest.raises(ValueError, match=r"^DataConfig\.seed must be an int in \[0, 9223372036854775807\], "
                                         r"got 9223372036854775808$"):
        DataConfig(seed=2**63)
    with pytest.raises(TypeError, match=r"^DataConfig\.download must be a bool"):
        DataConfig(download="yes")
    with pytest.raises(ValueError, match=r"^ObjectiveConfig\.name must be one of"):
        ObjectiveConfig(name="vae")


def test_the_benchmarks_mnist_loader_falls_back_to_synthetic_data_only_for_its_default(tmp_path, monkeypatch):
    """benchmarks/pythae_compare.load_mnist (also amp_quality's): a mistyped --data must not
    give likelihoods of synthetic noise."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "pythae_compare", raising=False)
    import pythae_compare

    with pytest.raises(SystemExit, match=r"--data \S+typo\.npz: no such file"):
        pythae_compare.load_mnist(tmp_path / "typo.npz")
    monkeypatch.setattr(pythae_compare, "DEFAULT_DATA", tmp_path / "mnist.npz")  # the default, missing
    for path in ("synthetic", tmp_path / "mnist.npz"):
        x, xt, source = pythae_compare.load_mnist(path)
        assert x.shape == (60000, 784) and xt.shape == (10000, 784) and source.startswith("synthetic")


def test_load_dataset_checks_a_field_assigned_after_the_config_was_made():
    config = DataConfig()
    config.val_size = -5  # before: train and val swapped, 5 training images
    with pytest.raises(ValueError, match=r"DataConfig\.val_size must be >= 0, got -5"):
        load_dataset(config)


@pytest.mark.parametrize("threshold, error, pattern", [
    ("a", TypeError, r"threshold must be a number, got str"),
    (float("nan"), ValueError, r"threshold must be a finite number >= 0 and <= 1, got nan"),  # was all zeros
    (5.0, ValueError, r"threshold must be a finite number >= 0 and <= 1, got 5\.0"),
])
def test_binarize_static_names_a_threshold_outside_the_images_range(threshold, error, pattern):
    with pytest.raises(error, match=pattern):
        binarize_static(torch.rand(2, 3), threshold=threshold)


# -- the sprites (vaekit.sprites), against computations written out here ------------------


def _sprite_factors(rows):
    return torch.tensor(rows, dtype=torch.long)


def _inside_by_hand(shape, scale, angle, pos_x, pos_y):
    """The documented rasteriser in float64: pixel centre p = (j + 1/2, i + 1/2), centre
    c = 16 + (pos_x, pos_y), q = R(-theta) (p - c) / (10 s) with s = 0.5 + 0.1 scale and
    theta = 2 pi angle / 40; returns the shape's implicit function F(q) (inside: F <= 0)."""
    grid = torch.arange(64, dtype=torch.float64) + 0.5
    dx, dy = grid[None, :] - (16 + pos_x), grid[:, None] - (16 + pos_y)
    theta, s = 2 * math.pi * angle / 40, 10 * (0.5 + 0.1 * scale)
    qx = (math.cos(theta) * dx + math.sin(theta) * dy) / s
    qy = (-math.sin(theta) * dx + math.cos(theta) * dy) / s
    if shape == 0:  # the square, half-side 1
        return torch.maximum(qx.abs(), qy.abs()) - 1
    if shape == 1:  # the ellipse, semi-axes 1 and 1/2
        return qx**2 + 4 * qy**2 - 1
    u, v = 1.139 * qx, 0.118 - 1.139 * qy  # the heart (x^2 + y^2 - 1)^3 = x^2 y^3, tip down
    return (u**2 + v**2 - 1) ** 3 - u**2 * v**3


@pytest.mark.parametrize("shape", [0, 1, 2], ids=["square", "ellipse", "heart"])
def test_sprites_are_the_implicit_shapes_written_out_in_float64(shape):
    """Every pixel of each sprite is on exactly when its centre is inside the shape's
    implicit curve, computed here in float64 from the documented formulas (the heart's
    (x^2 + y^2 - 1)^3 = x^2 y^3); a pixel may differ only where the curve passes within
    float32's rounding of its centre."""
    from vaekit.sprites import render_sprites

    rows = [[shape, sc, a, px, py] for sc, a, px, py in
            [(5, 0, 16, 16), (0, 7, 3, 29), (3, 13, 31, 0), (5, 21, 10, 11), (2, 33, 24, 5)]]
    images = render_sprites(_sprite_factors(rows))[:, 0]
    for img, row in zip(images, rows):
        f = _inside_by_hand(*row)
        want = f <= 0
        differ = img.bool() != want
        assert want.sum() > 20
        assert (f[differ].abs() < 1e-4).all(), (row, f[differ])
        assert differ.sum() <= 2, row


def test_moving_pos_x_or_pos_y_moves_every_pixel_by_that_many_pixels():
    """pos_x = i puts the centre on column 16 + i: one step of pos_x moves the whole sprite
    one pixel right (pos_y: one down), nothing else changes; an unrotated square's centre of
    mass is then exactly (16 + pos_x, 16 + pos_y), for each of the 32 positions."""
    from vaekit.sprites import render_sprites

    for shape, scale, angle in [(2, 4, 7), (1, 5, 3), (0, 1, 11)]:
        row = _sprite_factors([[shape, scale, angle, i, 5] for i in range(32)])
        col = _sprite_factors([[shape, scale, angle, 5, i] for i in range(32)])
        by_x, by_y = render_sprites(row)[:, 0], render_sprites(col)[:, 0]
        for i in range(32):
            assert torch.equal(by_x[i], torch.roll(by_x[0], i, dims=1)), (shape, i)
            assert torch.equal(by_y[i], torch.roll(by_y[0], i, dims=0)), (shape, i)
    squares = render_sprites(_sprite_factors([[0, 5, 0, i, 31 - i] for i in range(32)]))[:, 0].double()
    grid = torch.arange(64, dtype=torch.float64) + 0.5
    mass = squares.sum((1, 2))
    assert (mass == 400).all()  # 20 x 20 pixels
    cx, cy = (squares.sum(1) * grid).sum(1) / mass, (squares.sum(2) * grid).sum(1) / mass
    assert torch.equal(cx, torch.arange(32, dtype=torch.float64) + 16)
    assert torch.equal(cy, 31 - torch.arange(32, dtype=torch.float64) + 16)


@pytest.mark.parametrize("batch_size", [100_000, 737_280, 1_000_000])
def test_iter_all_walks_every_factor_combination_once_with_the_last_partial_batch(batch_size, monkeypatch):
    """iter_all gives the 737,280 combinations of (3, 6, 40, 32, 32) once each, in
    lexicographic order (pos_y fastest: numpy's C-ordered indices), batch_size at a time and
    the rest in a last partial batch; each batch's images are the rendering of its factors.
    (The rendering is replaced by a cheap stand-in that records what it was asked for: all
    of them would take minutes.)"""
    import vaekit.sprites as sprites

    asked = []

    def render(factors, dtype, chunk=1024):
        asked.append(factors)
        return torch.zeros(len(factors), 1, 1, 1, dtype=dtype)

    monkeypatch.setattr(sprites, "_render_chunked", render)
    batches = list(sprites.iter_all(batch_size))
    total = 3 * 6 * 40 * 32 * 32
    sizes = [len(f) for _, f in batches]
    full, rest = divmod(total, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest else [])
    assert [len(im) for im, _ in batches] == sizes and all(im.dtype == torch.uint8 for im, _ in batches)
    assert len(asked) == len(batches) and all(a is f for a, (_, f) in zip(asked, batches))
    factors = torch.cat([f for _, f in batches])
    want = torch.from_numpy(np.indices((3, 6, 40, 32, 32)).reshape(5, -1).T.copy())
    assert factors.dtype == torch.long and torch.equal(factors, want)


def test_iter_all_renders_its_last_partial_batch(monkeypatch):
    """The last batch, short, is rendered like any other: with batches of 245,759 (three
    full ones, then 3 sprites) its images are render_sprites of its factors, the last three
    sprites (hearts at the largest scale and the last orientation, pos_y 29 to 31). The full
    batches get a blank stand-in: rendering them would take a minute."""
    import vaekit.sprites as sprites

    real, calls = sprites._render_chunked, []

    def render(factors, dtype, chunk=1024):
        calls.append(len(factors))
        return real(factors, dtype) if len(factors) < 10 else torch.zeros(len(factors), 1, 1, 1, dtype=dtype)

    monkeypatch.setattr(sprites, "_render_chunked", render)
    *_, (images, factors) = sprites.iter_all(245_759, dtype=torch.float32)
    assert calls == [245_759] * 3 + [3] and images.shape == (3, 1, 64, 64)
    assert torch.equal(factors, torch.tensor([[2, 5, 39, 31, 29], [2, 5, 39, 31, 30], [2, 5, 39, 31, 31]]))
    assert torch.equal(images, sprites.render_sprites(factors))
    assert (images.sum((1, 2, 3)) > 100).all()
