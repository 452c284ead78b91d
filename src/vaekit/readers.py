"""File readers and the MNIST download: IDX (raw or gzip), ``.npy`` / ``.npz`` arrays,
folders of images, scikit-learn's digits. Each returns float32 images scaled to [0, 1]
(see :mod:`vaekit.data`, which picks the reader for a ``DataConfig``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Optional
from urllib.request import urlopen

import numpy as np
import torch
from torch import Tensor

from .checks import _count_nonfinite, _value_range, check_choice
from .io import check_file, file_problem

__all__ = ["read_idx", "download_mnist", "MNIST_FILES"]

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Mirrors in the order tried, and the published SHA-256 sums of the gzipped files (the
# MNIST files' decompressed contents were checked against a copy of MNIST: docs/benchmarks.md).
_MNIST_SOURCES = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"}),
    "fashion-mnist": (
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        {"train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
         "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
         "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
         "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"}),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------
# Readers


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzip, told apart by the gzip magic bytes, not the name).

    Layout: two zero bytes, a dtype code, the number of dims ``k``, ``k`` big-endian
    uint32 sizes, then the big-endian payload of exactly ``prod(sizes)`` items. A gzip
    file is read through, not decompressed whole: its header is checked first, then at
    most the payload it announces (and one byte more) is decompressed.
    """
    check_file(path, str(path), "an IDX file")  # before opening: a named pipe would block forever
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:  # no permission
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gz:
            return _read_idx_stream(f.read, path, os.fstat(f.fileno()).st_size)
        try:
            with gzip.GzipFile(fileobj=f) as z:
                return _read_idx_stream(z.read, path, None)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None


def _read_at_most(read, n: int) -> bytes:
    """Up to ``n`` bytes from ``read``, in chunks: an absurd ``n`` allocates nothing ahead."""
    parts = []
    while n > 0:
        part = read(min(n, 1 << 24))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_idx_stream(read, path: Path, size: int | None) -> np.ndarray:
    """The IDX array that ``read`` gives; ``size``: the file's bytes where known (a raw
    file), else the payload is read up to one byte past what the header announces."""
    head = _read_at_most(read, 4)
    if len(head) < 4 or head[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (magic bytes {head.hex() or 'missing'}, "
                         "expected 0000 then a dtype code and a dim count)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}, expected one of "
                         f"{[hex(c) for c in _IDX_DTYPES]}")
    sizes = _read_at_most(read, 4 * ndim)
    if ndim == 0 or len(sizes) < 4 * ndim:
        raise ValueError(f"{path}: header truncated or has {ndim} dims")
    dims = tuple(int(d) for d in np.frombuffer(sizes, ">u4", ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow for absurd headers
    got = None if size is None else size - 4 - 4 * ndim
    if got is None or got == expected:
        payload = _read_at_most(read, expected + 1)
        got = len(payload)
    if got > expected and size is None:  # (a gzip stream: read no further)
        raise ValueError(f"{path}: payload has more than the {expected} bytes that dims {dims} of {dtype} need "
                         f"(trailing data, or corrupt)")
    if got != expected:
        raise ValueError(f"{path}: payload has {got} bytes but dims {dims} of {dtype} need "
                         f"{expected} (truncated or corrupt)")
    return np.frombuffer(payload, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _as_images(a, source: str, *, stacked_hwc: bool = False) -> Tensor:
    """numpy array -> float32 ``[N, C, H, W]`` (``[N, D]`` kept flat); uint8 / 255.

    A 4-D shape that fits both layouts (1 or 3 in both places) is read channels last,
    with a warning, unless ``stacked_hwc`` says the array is known to be ``[N, H, W, C]``.
    """
    a = np.asarray(a)
    if a.size == 0:
        raise ValueError(f"{source}: the image array is empty, shape {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32)
        f /= 255.0  # in place: the same float32 quotients as f / 255.0, without a second copy
        t = torch.from_numpy(f)
    elif a.dtype == np.bool_ or np.issubdtype(a.dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32: refused just below
            t = torch.from_numpy(a.astype(np.float32))
        if not all(math.isfinite(v) for v in _value_range(t)):  # one pass; masks only for the count
            raise ValueError(f"{source}: {_count_nonfinite(t)} of {t.numel()} values are NaN or infinite "
                             f"(in float32)")
    else:
        raise TypeError(f"{source}: images must be uint8 (0..255) or floating point, got dtype {a.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4 and t.shape[-1] in (1, 3):
        if t.shape[1] in (1, 3) and not stacked_hwc:
            warnings.warn(f"{source}: shape {tuple(a.shape)} reads as [N, H, W, C] and as [N, C, H, W]; "
                          f"taken as [N, H, W, C] (channels last): an array that is channels first must be "
                          f"transposed to [N, H, W, C] first")
        t = t.permute(0, 3, 1, 2)
    elif not (t.dim() == 2 or (t.dim() == 4 and t.shape[1] in (1, 3))):
        raise ValueError(f"{source}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W] "
                         f"with C in (1, 3), or vectors [N, D]; got shape {tuple(a.shape)}")
    return t.contiguous()


def _as_labels(y, n: int, source: str) -> Optional[Tensor]:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be {n} integers [N], got {y.dtype} of shape {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: 1,797 images 8x8, grey levels 0..16
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    return next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)


def _load_mnist(root: Path, kind: str, download: bool):
    if root.exists() and not root.is_dir():  # the .npz itself, a natural reading of "IDX files or .npz"
        parent = f"; give its folder, {str(root.parent)!r}" if root.suffix.lower() == ".npz" else ""
        renamed = f", with the file named {kind}.npz" if parent and root.name != f"{kind}.npz" else ""
        raise ValueError(f"data_dir {str(root)!r} is a file; expected the folder that holds the four {kind} IDX "
                         f"files or {kind}.npz{parent}{renamed}")
    npz = root / f"{kind}.npz"
    paths = [_find_idx(root, s) for s in MNIST_FILES]
    if None in paths and not npz.is_file():
        if not download:
            missing = [s for s, p in zip(MNIST_FILES, paths) if p is None]
            # a name that is there but is no file (a folder, a pipe) would otherwise read as missing
            odd = [f"; {p.name}: {problem}" for p in (*(root / f"{s}{gz}" for s in missing for gz in ("", ".gz")), npz)
                   if os.path.lexists(p) and (problem := file_problem(p)) is not None]
            try:  # an .npz of another name (data.npz) is not read: say the name it must have
                others = sorted(p.name for p in root.glob("*.npz") if p.name != npz.name)
            except OSError:
                others = []
            if others:
                odd.append(f"; {str(root)!r} holds {', '.join(others)}, but the .npz read must be named {kind}.npz")
            raise FileNotFoundError(
                f"{kind} not found in data_dir {str(root)!r}: missing {missing}{''.join(odd)}. Put the four files "
                f"{', '.join(MNIST_FILES)} (raw or .gz) in {str(root)!r}, or {kind}.npz with "
                "x_train, y_train, x_test, y_test, or set download=True to fetch them.")
        download_mnist(root, kind)
        paths = [_find_idx(root, s) for s in MNIST_FILES]
    if None not in paths:
        arrays, sources = [read_idx(p) for p in paths], [str(p) for p in paths]
    else:
        keys = ("x_train", "y_train", "x_test", "y_test")
        try:
            loaded = _np_load(npz)
            if isinstance(loaded, np.ndarray):
                raise ValueError(f"{npz} holds an .npy array despite its name; expected an .npz archive with keys "
                                 f"{keys}")
            with loaded as f:
                found = list(f.files)
                arrays = list(_npz_arrays(f, npz, keys).values()) if set(keys) <= set(found) else None
        except _NP_READ_ERRORS as e:
            if str(npz) in str(e):
                raise
            raise ValueError(f"{npz}: not a readable .npz file ({e})") from None
        if arrays is None:
            raise ValueError(f"{npz}: expected keys {keys}, found {found}")
        sources = [f"{npz}[{k}]" for k in keys]
    x, y, xt, yt = arrays
    for a, src, nd in zip(arrays, sources, (3, 1, 3, 1)):
        # images 8-bit, as MNIST's own files; labels any integers (as the array reader takes)
        if a.ndim != nd or not (a.dtype == np.uint8 if nd == 3 else a.dtype.kind in "iu"):
            what = "uint8" if nd == 3 else "integers"
            raise ValueError(f"{src}: expected {what} with {nd} dims, got {a.dtype} of shape {a.shape}")
    return (_as_images(x, sources[0]), _as_labels(y, len(x), sources[1]),
            _as_images(xt, sources[2]), _as_labels(yt, len(xt), sources[3]))


# What np.load raises for a damaged file; zipfile's RuntimeError is an encrypted entry (and its
# NotImplementedError, a RuntimeError, a compression method it lacks).
_NP_READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error)


def _check_npy_claim(f, size: int, source: str, what: str = "the file") -> None:
    """Refuse an .npy stream ``f`` (at its start, ``size`` bytes long) whose header claims
    more data than it holds: np.load would first allocate what it claims (a terabyte,
    for a corrupt header). Anything that is not an .npy header is left to np.load."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except (ValueError, SyntaxError, EOFError):
        return
    if dtype.hasobject:  # pickled: refused by np.load (allow_pickle=False)
        return
    claimed, held = math.prod(shape) * dtype.itemsize, size - f.tell()
    if claimed > held:
        raise ValueError(f"{source}: its header claims an array of shape {shape} and dtype {dtype} ({claimed} "
                         f"bytes), but {what} holds {held} bytes of data (truncated or corrupt)")


def _np_load(path: Path):
    """``np.load(path)`` without pickles: an array (an .npy file, whatever its name) or an
    NpzFile (an .npz archive), its header checked first (:func:`_check_npy_claim`)."""
    with open(path, "rb") as f:
        _check_npy_claim(f, os.fstat(f.fileno()).st_size, str(path))
    return np.load(path, allow_pickle=False)


def _npz_arrays(f, path: Path, keys) -> dict:
    """The arrays ``keys`` of the NpzFile ``f``, each entry's header checked against its
    size first."""
    names = f.zip.namelist()
    out = {}
    for k in keys:
        name = k if k in names else f"{k}.npy"  # as NpzFile looks an entry up
        info = f.zip.getinfo(name)
        with f.zip.open(name) as entry:
            _check_npy_claim(entry, info.file_size, f"{path}[{k}]", "the entry")
        out[k] = f[k]
    return out


def _load_array(path: Path):
    """An .npy or .npz file, told apart by its content (np.load's test), not its name."""
    if file_problem(path) == "a folder, not a file":
        raise ValueError(f"data_dir {str(path)!r} is a folder; expected an .npy or .npz file")
    check_file(path, f"data_dir {str(path)!r}", "an .npy or .npz file")
    try:
        loaded = _np_load(path)
        if isinstance(loaded, np.ndarray):
            d = None
        else:
            with loaded as f:
                d = _npz_arrays(f, path, f.files)
    except FileNotFoundError:
        raise FileNotFoundError(f"data_dir {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"data_dir {str(path)!r} is a folder; expected an .npy or .npz file") from None
    except OSError as e:  # a loop of links, no permission
        raise ValueError(f"data_dir {str(path)!r}: cannot be read ({e.strerror or e})") from None
    except _NP_READ_ERRORS as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a readable .npy or .npz array file ({e})") from None
    if d is None:
        return _as_images(loaded, str(path)), None, None, None
    key = "x_train" if "x_train" in d else "x" if "x" in d else None
    if key is None:
        raise ValueError(f"{path}: expected keys x_train[, y_train, x_test, y_test] or x[, y], found {list(d)}")
    x = _as_images(d[key], f"{path}[{key}]")
    ykey = "y_train" if key == "x_train" else "y"
    y = _as_labels(d.get(ykey), len(x), f"{path}[{ykey}]")
    if "x_test" not in d:
        return x, y, None, None
    xt = _as_images(d["x_test"], f"{path}[x_test]")
    return x, y, xt, _as_labels(d.get("y_test"), len(xt), f"{path}[y_test]")


def _load_folder(root: Path):
    """PNG and JPEG images, 8 bits a channel and opaque, turned as their EXIF orientation says."""
    from PIL import Image, ImageOps

    if not root.exists():
        raise FileNotFoundError(f"data_dir {str(root)!r}: no such folder")
    if not root.is_dir():
        raise ValueError(f"data_dir {str(root)!r} is not a folder")

    def images_in(d: Path) -> list:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)

    top = images_in(root)
    classes = [d for d in sorted(root.iterdir()) if d.is_dir() and images_in(d)]
    if top and classes:
        raise ValueError(f"data_dir {str(root)!r} holds images both at the top ({top[0].name}) and "
                         f"in class sub-folders ({classes[0].name}); use one layout")
    files = top or [p for d in classes for p in images_in(d)]
    labels = [i for i, d in enumerate(classes) for _ in images_in(d)] if classes else None
    if not files:
        raise ValueError(f"data_dir {str(root)!r} holds no PNG or JPEG images (at the top or in "
                         "one sub-folder per class)")
    arrays, size = [], None
    for p in files:
        try:
            with Image.open(p) as opened:
                # Pillow opens a 16-bit RGB(A) PNG as 8-bit RGB(A), cut to the high bytes: its raw
                # mode, there only before the pixels are read, tells
                raw = next((t[3] for t in opened.tile if isinstance(t[3], str)), "")
                im = ImageOps.exif_transpose(opened) if opened.getexif().get(0x0112, 1) != 1 else opened
                size = size or im.size
                if im.size != size:
                    raise ValueError(f"{p} is {im.size[0]}x{im.size[1]} but {files[0]} is "
                                     f"{size[0]}x{size[1]}; all images must have the same size")
                if im.mode.startswith(("I", "F")) or ";16" in raw:  # converting would clip 16-bit levels to 255
                    mode = repr(im.mode) if im.mode.startswith(("I", "F")) else f"{im.mode!r} stored as {raw!r}"
                    raise ValueError(f"{p} has mode {mode} (more than 8 bits a channel); the folder "
                                     "reader takes 8-bit images (convert them, or load an array)")
                if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                    alpha = np.asarray(im.convert("RGBA"))[..., 3]
                    if (alpha < 255).any():  # dropped by the conversion below: what it drew would vanish
                        raise ValueError(f"{p} has transparency ({int((alpha < 255).sum())} of {alpha.size} pixels "
                                         f"not opaque, mode {im.mode!r}); the folder reader expects opaque images "
                                         "(flatten them onto a background first)")
                a = np.asarray(im.convert("L" if im.mode in ("1", "L", "LA") else "RGB"))
                if im.mode in ("P", "PA") and a.ndim == 3 and (a == a[..., :1]).all():  # a grey palette
                    a = a[..., 0]
                arrays.append(a)
        except Image.DecompressionBombError as e:  # not an OSError
            raise ValueError(f"{p} is too large to read: {str(e).rstrip('.')}") from None
        except (OSError, SyntaxError) as e:  # PIL's errors for damaged files (truncated, unknown)
            raise ValueError(f"{p} is not a readable image: {e}") from None
    if any(a.ndim == 3 for a in arrays):  # one image with colour makes the whole set RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrays]
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    return _as_images(np.stack(arrays), str(root), stacked_hwc=True), _as_labels(y, len(files), str(root)), None, None


# ---------------------------------------------------------------------------------------
# Download


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, sha256: str) -> None:
    """Stream ``url`` into a temporary file beside ``target``; rename it only if its SHA-256
    matches, so an interrupted, corrupt or altered download never looks like a finished one."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 {digest.hexdigest()} does not match the published {sha256}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def download_mnist(root, kind: str = "mnist") -> list:
    """Download the four gzipped IDX files of ``kind`` ("mnist" | "fashion-mnist") into
    ``root``, trying the mirrors in order and checking each file's published SHA-256.
    Files already present with the right sum are kept; one with another sum is replaced by
    the download (kept if no mirror delivers). Returns their paths. (``DataConfig(download
    =True)`` calls this only when the data are missing: files already there, raw or
    gzipped, are read without a check.)"""
    check_choice("kind", kind, tuple(_MNIST_SOURCES))
    mirrors, sums = _MNIST_SOURCES[kind]
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"data_dir {str(root)!r} is a file; expected a folder to download {kind} into")
    made = [d for d in (root, *root.parents) if not d.exists()]  # removed again if nothing lands
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"data_dir {str(root)!r}: cannot be created to download {kind} into "
                         f"({e.strerror or e})") from None
    if not os.access(root, os.W_OK | os.X_OK):  # else each mirror's failure would read as the network's
        raise ValueError(f"data_dir {str(root)!r} is not writable; cannot download {kind} into it")
    paths = []
    for name, sha256 in sums.items():
        target = root / name
        if target.is_dir():  # before the mirrors: renaming the download onto it would fail at each
            raise ValueError(f"{target} is a folder; expected the downloaded file {name} there (or nothing)")
        if not (target.is_file() and _sha256(target) == sha256):
            errors = []
            for mirror in mirrors:
                try:
                    _fetch(mirror + name, target, sha256)
                    break
                except (OSError, ValueError, http.client.HTTPException) as e:  # a cut-off or non-HTTP reply too
                    errors.append(f"{mirror}{name}: {str(e) or type(e).__name__}")
            else:
                for d in made:  # innermost first; a folder that holds anything stays
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise OSError(f"could not download {name} into {root}: " + "; ".join(errors))
        paths.append(target)
    return paths
