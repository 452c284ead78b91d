"""Saving and loading, safely.

* Model weights: ``model.safetensors`` beside ``config.json`` (class name, vaekit version,
  format version, model config). Loading never unpickles anything.
* Training checkpoints: one file written atomically (temporary file, flush, fsync,
  rename, fsync of the directory), read back with ``torch.load(weights_only=True)``,
  which refuses pickled objects other than tensors and plain containers.
* :class:`BackgroundWriter`: the training loop's files, copied into host memory
  (:func:`host_copy`) and serialised in the loop, written and synced to disk on a thread
  of their own while training goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors.torch import load as _safetensors_load, save as _safetensors_bytes

from . import __version__

if TYPE_CHECKING:
    from .models import VAE

__all__ = [
    "atomic_write",
    "file_problem",
    "check_file",
    "BackgroundWriter",
    "host_copy",
    "write_json",
    "read_json",
    "save_model",
    "load_model",
    "save_checkpoint",
    "checkpoint_bytes",
    "load_checkpoint",
    "CheckpointError",
    "MODEL_FORMAT",
    "CHECKPOINT_FORMAT",
]

MODEL_FORMAT = 1
CHECKPOINT_FORMAT = 1
CHECKPOINT_MAGIC = "vaekit-checkpoint"


_UMASK = os.umask(0o022)
os.umask(_UMASK)

_T = TypeVar("_T")


class CheckpointError(ValueError):
    """A checkpoint or saved model that cannot be used (missing, truncated, unsafe, newer)."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _as_path(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__}")
    return Path(value)


def _device(name: str, value):
    """``value`` as a device (a str or torch.device), refused where it names no device or
    a CUDA device where there is none: said before anything is read, not blamed on the file."""
    if isinstance(value, str):
        try:
            dev = torch.device(value)
        except RuntimeError:
            raise ValueError(f"{name} must name a device (cpu, cuda, cuda:N, ...), got {value!r}") from None
    elif isinstance(value, torch.device):
        dev = value
    else:
        raise TypeError(f"{name} must be a str or torch.device, got {type(value).__name__}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} is {str(value)!r} but no CUDA device is available")
    return dev


def file_problem(path) -> str | None:
    """Why ``path`` cannot be read as a file, in a few words, or None when it is a regular
    file (or a link to one). Asked before opening: a named pipe would block the reader
    forever, and a loop of links is otherwise reported as a missing file."""
    path = _as_path("path", path)
    try:
        if path.is_file():
            return None
        if path.is_dir():
            return "a folder, not a file"
        if path.exists():
            return "not a regular file (a pipe, socket or device)"
        if path.is_symlink():
            return "a link that leads nowhere (or a loop of links)"
    except OSError as e:  # a name too long, no permission on a parent
        return f"cannot be read ({e.strerror or e})"
    return "no such file"


def check_file(path, label: str, expected: str = "") -> None:
    """Raise unless ``path`` is a file to read: ``FileNotFoundError`` when nothing is there,
    else ``ValueError`` saying what is (:func:`file_problem`); ``label`` names it.
    ``expected``: what the file should be, in a few words (``"an IDX file"``), added to the
    ``ValueError``'s message (``"...; expected an IDX file"``) where given."""
    problem = file_problem(path)
    if problem == "no such file":
        raise FileNotFoundError(f"{label}: no such file")
    if problem is not None:
        raise ValueError(f"{label}: {problem}{f'; expected {expected}' if expected else ''}")


def atomic_write(path, write) -> Path:
    """Write ``path`` through ``write(file_object)`` so that readers see the old or the
    new content, never a partial one: temporary file in the same directory, flush,
    fsync, ``os.replace``, fsync of the directory. A link is written through: its target
    gets the new content and the link stays. A file replaced keeps its permission bits;
    a new one gets the umask's."""
    given = path = _as_path("path", path)
    if not callable(write):
        raise TypeError(f"write must be a callable that writes into a binary file, got {type(write).__name__}")
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise ValueError(f"path {str(given)!r} is a folder; expected a file to write")
    _make_dir("path", path.parent, given)
    try:  # a file replaced keeps its mode (a chmod 600 on it stays)
        mode = os.stat(path).st_mode & 0o7777
    except OSError:  # none there yet (or none to ask): a new file's
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a failed write or fsync names no file: this one
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)
    return given


def _make_dir(name: str, directory: Path, given: Path) -> None:
    """``directory`` made, with its parents; one that cannot be (a file in the way) named."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        where = "" if given == directory else f": its folder {str(directory)!r}"
        raise ValueError(f"{name} {str(given)!r}{where} cannot be made, a file is in the way") from None


def _finite_or_null(obj):
    """``obj`` with each NaN or infinite float as ``None``: JSON (RFC 8259) has no such
    numbers, and Python's ``NaN`` / ``Infinity`` are refused by strict readers (browsers,
    jq, most languages' parsers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def _json_bytes(obj) -> bytes:
    return (json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json(path, obj) -> Path:
    """``obj`` as standard JSON, written atomically; a NaN or infinite float (the metrics
    of a model that diverged) is written as ``null``."""
    data = _json_bytes(obj)
    return atomic_write(path, lambda f: f.write(data))


def read_json(path) -> dict:
    path = _as_path("path", path)
    check_file(path, str(path))
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def host_copy(obj: _T, into: object = None) -> _T:
    """``obj`` (tensors in dicts, lists and tuples, and plain values) with every tensor
    copied into host memory: a snapshot that later in-place updates of the originals (the
    optimiser's) do not reach. Plain values are shared, not copied.

    ``into``: an earlier snapshot of the same structure that nothing reads any more; its
    tensors of the same shape and dtype are written over instead of new ones made (each
    checkpoint then copies into memory already faulted in; the training loop keeps its
    last snapshot for the run, pinned where the state is on a GPU).
    A tensor on a GPU is copied into pinned memory, all of them without waiting, then the
    copying streams are waited for once (not once a tensor)."""
    streams: dict = {}
    out = _host_copy(obj, into, streams)
    for stream in streams.values():
        stream.synchronize()
    return out


def _host_copy(obj, into, streams: dict):
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        dst = into
        if not (isinstance(dst, torch.Tensor) and dst.device.type == "cpu" and dst.shape == src.shape
                and dst.dtype == src.dtype and (not src.is_cuda or dst.is_pinned())  # no CUDA call for a CPU run
                and dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()):
            dst = torch.empty_like(src, device="cpu", pin_memory=src.is_cuda)
        if src.is_cuda:
            dst.copy_(src, non_blocking=True)
            streams.setdefault(src.device, torch.cuda.current_stream(src.device))
        else:
            dst.copy_(src)
        return dst
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        out = type(obj)((k, _host_copy(v, old.get(k), streams)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        items = (_host_copy(v, o, streams) for v, o in zip(obj, old))
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
            return type(obj)(*items)
        return type(obj)(items)
    return obj


class BackgroundWriter:
    """Runs writing jobs on one thread of their own, in the order they are given, while
    the caller goes on. At most one job is outstanding: :meth:`submit` first waits for the
    one before, so the copies a job holds never pile up behind a slow disk. A job's error
    is raised in the caller's thread by the next :meth:`submit`, :meth:`wait` or
    :meth:`check` (the same exception object). A job must only read what nobody changes
    after it was submitted (:func:`host_copy` the rest).

    ``enabled=False``: each job runs at once in the caller's thread (what the training loop
    did before, and what ``vaekit.train.BACKGROUND_WRITES = False`` restores).
    """

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, job) -> None:
        """Run ``job()`` after the jobs before it (in the background when enabled)."""
        if not callable(job):
            raise TypeError(f"job must be a callable taking no arguments, got {type(job).__name__}")
        self.wait()
        if not self.enabled:
            job()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaekit-writer")
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        """Until every job given so far has finished; raises the error of one that failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def idle(self) -> bool:
        """Whether every job given so far has finished (well or not); never waits."""
        return self._pending is None or self._pending.done()

    def check(self) -> None:
        """Raise the error of a job that has failed already; never waits."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self, *, raise_error: bool = True) -> None:
        """Wait for the jobs and end the thread. ``raise_error=False`` (on the way out of
        another error): a failed job's error is dropped rather than raised over it."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001  (whatever the job raised)
            if raise_error:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


# ---------------------------------------------------------------------------------------
# Models


def save_model(model, directory, *, state: dict | None = None) -> Path:
    """``directory/model.safetensors`` + ``directory/config.json``. ``state``: the weights
    to write instead of the model's own now (a :func:`host_copy` of its state dict taken
    earlier; its config and class are the model's).

    Everything is checked and serialised before the first file is written: a model that
    cannot be saved leaves the files already there as they were. The config, written
    last, records the weights' SHA-256: a save interrupted between the two files leaves
    a pair that :func:`load_model` refuses, not one it loads as a model neither save made."""
    from .models import VAE

    if not isinstance(model, VAE):
        raise TypeError(f"model must be a vaekit.models.VAE, got {type(model).__name__}")
    directory = _as_path("directory", directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} is a file; expected a folder")
    if state is None:
        state = model.state_dict()
    else:  # keep_vars: the tensors themselves, no new ones (this may run on a writing thread)
        _check_model_state(state, model.state_dict(keep_vars=True))
    weights = _safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()})
    try:
        meta = _json_bytes({
            "class": type(model).__name__,
            "vaekit_version": __version__,
            "format_version": MODEL_FORMAT,
            "model": model.config.to_dict(),
            # the pair's seal: the config is written last, so weights from an interrupted
            # save next to the config of an earlier one are told apart (load_model)
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        })
    except (TypeError, ValueError) as e:
        raise TypeError(f"model.config cannot be saved as JSON: {e}") from None
    for name in ("model.safetensors", "config.json"):
        if (directory / name).is_dir():
            raise ValueError(f"directory {str(directory)!r} holds a folder {name}; expected a file there")
    _make_dir("directory", directory, directory)
    atomic_write(directory / "model.safetensors", lambda f: f.write(weights))
    atomic_write(directory / "config.json", lambda f: f.write(meta))
    return directory


def _check_model_state(state, own: dict) -> None:
    """Refuse a ``state`` for :func:`save_model` that would not load back into the model."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state dict (a mapping of names to tensors), got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state[{k!r}] must be a tensor, got {type(v).__name__}")
    why = _state_dict_mismatch(own, state)
    if why:
        raise ValueError(f"state must be the model's own state dict (its keys and shapes), but it has {why}")


def load_model(directory: str | os.PathLike[str], *, device: str | torch.device | None = None) -> VAE:
    """Rebuild a :class:`vaekit.models.VAE` from ``save_model``'s files, with the weights
    exactly as saved (their dtype included), in evaluation mode (``.train()`` to train it
    on): in training mode a model with the optimal decoder variance scores each batch
    under its own variance and updates the saved one."""
    from .config import section_from_dict
    from .model_config import model_without_inert
    from .models import VAE, ModelConfig

    directory = _as_path("directory", directory)
    if device is not None:
        _device("device", device)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} holds no saved model: no such directory")
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    for p in (cfg_path, weights):
        problem = file_problem(p)
        if problem == "no such file":
            raise CheckpointError(f"{directory} holds no saved model: {p.name} is missing")
        if problem is not None:
            raise CheckpointError(f"{directory} holds no saved model: {p.name} is {problem}")
    meta = read_json(cfg_path)
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > MODEL_FORMAT or version < 1:
        raise CheckpointError(
            f"{cfg_path} has format_version {version!r}; this vaekit ({__version__}) reads 1..{MODEL_FORMAT}"
        )
    if meta.get("class") != "VAE":
        raise CheckpointError(f"{cfg_path} describes class {meta.get('class')!r}, expected 'VAE'")
    try:
        section = meta.get("model", {})
        model = VAE(section_from_dict(ModelConfig, model_without_inert(section) if isinstance(section, dict) else section,
                                      "model"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} holds an invalid model config: {e}") from None
    except (RuntimeError, MemoryError) as e:  # sizes that pass the config's checks but no memory holds
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{cfg_path} describes a model too large to build ({why})") from None
    data = weights.read_bytes()
    try:
        state = _safetensors_load(data)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    _check_saved_dtypes(state, model.state_dict(), weights)
    try:
        # assign: the saved tensors themselves, in their dtype (a float64 or bfloat16 model
        # comes back as it was saved, not cast into a float32 one)
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        why = _state_dict_mismatch(model.state_dict(), state) or str(e).strip().splitlines()[0]
        raise CheckpointError(f"{weights} does not match {cfg_path}: {why}") from None
    seal = meta.get("weights_sha256")  # absent from models saved before vaekit recorded it
    if seal is not None and seal != hashlib.sha256(data).hexdigest():
        raise CheckpointError(
            f"{weights} does not match {cfg_path}: its SHA-256 is not the one the config records (the two files "
            f"come from different saves, or the weights changed since; for weights edited on purpose, delete "
            f"weights_sha256 from {cfg_path.name})")
    _buffers_like_weights(model)
    if device is not None:
        model.to(device)
    return model.eval()


def _check_saved_dtypes(state: dict, own: dict, weights: Path) -> None:
    """Refuse saved tensors that ``load_model`` would load into a model it cannot run:
    one that is not floating-point where the model's is, or floating-point tensors of
    more than one dtype (``save_model`` writes a model in one dtype, its persistent
    buffers cast with it; loaded as saved, a float64 weight among float32 ones fails in
    the first product)."""
    floats = {}
    for k, v in state.items():
        if k in own and own[k].is_floating_point():
            if not v.is_floating_point():
                raise CheckpointError(f"{weights}: tensor {k} must be floating-point, as the model's is, "
                                      f"got {v.dtype}")
            floats[k] = v.dtype
    if len(set(floats.values())) > 1:
        counts = Counter(floats.values())
        common = max(counts, key=counts.get)  # the dtype of most tensors; the odd ones named
        odd = next(k for k, d in floats.items() if d != common)
        one = next(k for k, d in floats.items() if d == common)
        raise CheckpointError(f"{weights} mixes floating-point dtypes: tensor {odd} is {floats[odd]}, where {one} "
                              f"is {common}; a saved model has one dtype throughout")


def _buffers_like_weights(model) -> None:
    """The buffers a model does not save (a PixelCNN's masks) were made in float32 by its
    constructor: into the dtype of the weights loaded, as ``model.to(dtype)`` casts them
    (a bfloat16 PixelCNN's masked convolutions failed on float32 masks)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = getattr(module, name, None)
            if isinstance(buffer, torch.Tensor) and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))


def _state_dict_mismatch(expected: dict, given: dict) -> str:
    """Why state dict ``given`` does not load into a module whose state dict is
    ``expected``, in one line (PyTorch's message spreads the keys over many lines): the
    keys missing, the keys unexpected and the shapes that differ, the first few of each."""
    def few(names: list) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} where the model has {tuple(expected[k].shape)}" for k in expected
              if k in given and getattr(given[k], "shape", None) is not None and given[k].shape != expected[k].shape]
    parts = [f"{what} {few(names)}" for what, names in (("missing", missing), ("unexpected", unexpected),
                                                        ("shapes:", shapes)) if names]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# Training checkpoints


# What torch.load(weights_only=True) reads back: exact types, since a subclass (a named
# tuple, a str enum, a numpy scalar) is pickled by its class, which the safe loader refuses.
_LEAVES = frozenset({torch.Tensor, torch.nn.Parameter, str, int, float, bool, type(None), complex, bytes,
                     bytearray, torch.Size, torch.dtype, torch.device, torch.layout})
_KEYS = frozenset({str, int, float, bool, type(None)})


class _NotPlain(Exception):
    """The first value a checkpoint cannot hold, and its place (filled in on the way out)."""

    def __init__(self, value, is_key: bool = False) -> None:
        self.value, self.is_key, self.where = value, is_key, []


def _check_plain(value) -> None:
    """Raise :class:`_NotPlain` unless ``value`` holds only what a checkpoint is read back
    with: a walk over the containers (tens of microseconds for a training state), reading
    no tensor; the place of a bad value is put together only when there is one."""
    t = type(value)
    if t is dict or t is OrderedDict:
        for k in value:
            if type(k) not in _KEYS:
                raise _NotPlain(k, is_key=True)
        items = value.items()
    elif t is list or t is tuple or t is set:
        items = enumerate(value)
    elif t in _LEAVES:
        return
    else:
        raise _NotPlain(value)
    for k, v in items:
        if type(v) not in _LEAVES:
            try:
                _check_plain(v)
            except _NotPlain as e:
                e.where.append(f"[{k!r}]")
                raise


def _type_name(value) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def checkpoint_bytes(state: dict) -> bytes:
    """``state`` serialised as :func:`save_checkpoint` writes it. Refuses a state that
    :func:`load_checkpoint` would not read back (a numpy array, a path, a function)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    for k in state:
        if type(k) is not str:
            raise TypeError(f"state's keys must be strings, got {k!r} ({_type_name(k)})")
    try:
        _check_plain(dict(state))
    except _NotPlain as e:
        where = "state" + "".join(reversed(e.where))
        if e.is_key:
            raise TypeError(f"{where} has a key {e.value!r} of type {_type_name(e.value)}; a checkpoint's keys "
                            "are strings or numbers") from None
        raise TypeError(f"{where} is a {_type_name(e.value)}; a checkpoint holds tensors, numbers, strings "
                        "and containers of them") from None
    for k, v in (("format", CHECKPOINT_MAGIC), ("format_version", CHECKPOINT_FORMAT)):
        if k in state and not (type(state[k]) is type(v) and state[k] == v):  # it would replace the file's own
            raise ValueError(f"state[{k!r}] is {state[k]!r}; leave it out (the file's own is {v!r})")
    buffer = BytesIO()
    torch.save({"format": CHECKPOINT_MAGIC, "format_version": CHECKPOINT_FORMAT, **state}, buffer)
    return buffer.getvalue()


def save_checkpoint(path, state: dict, *, data: bytes | None = None) -> Path:
    """Atomically write a training checkpoint (a dict of tensors, numbers, strings,
    lists and dicts: everything ``torch.load(weights_only=True)`` accepts). ``data``:
    ``checkpoint_bytes(state)``, made earlier. Serialising holds Python's lock (the GIL)
    for milliseconds; writing and syncing do not: a :class:`BackgroundWriter` job is
    given the bytes, so that it never holds up the training steps."""
    if data is None:
        data = checkpoint_bytes(state)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes (checkpoint_bytes(state)), got {type(data).__name__}")
    return atomic_write(path, lambda f: f.write(data))


def _load_failure(error: Exception, path: Path) -> str:
    """The gist of ``torch.load``'s error, one sentence: its ``weights_only`` refusals
    bury the reason ("Unsupported global: ...", "Unsupported operand 103") under
    paragraphs of advice."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((t.strip() for t in text.splitlines() if t.strip()), "")
    if not line:
        return "an empty file" if path.stat().st_size == 0 else type(error).__name__
    return line.split(". ", 1)[0].rstrip(".")


def _entry_off_its_crc(path: Path) -> str | None:
    """The first entry of the zip file that ``torch.save`` writes whose bytes do not match
    the CRC-32 stored with them (a flipped bit on a disk reads back as other numbers), or
    None. A file that is no zip, or one cut short, is ``torch.load``'s to describe."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles code.

    Raises :class:`CheckpointError` for a missing, truncated, foreign, unsafe or newer file.
    """
    path = _as_path("path", path)
    if map_location is not None and not isinstance(map_location, dict) and not callable(map_location):
        _device("map_location", map_location)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    damaged = _entry_off_its_crc(path)
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: the bytes of its entry {damaged} do not match their CRC-32 "
                              f"(torch.load does not check them); refusing it")
    try:
        with warnings.catch_warnings():  # a pickle of another protocol: refused below in one line, not warned of
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = _load_failure(e, path)
        if reason.startswith("Unsupported global"):  # weights_only refused a pickled object
            raise CheckpointError(f"{path} holds objects that could run code when loaded; refusing it ({reason})") from None
        if reason.startswith("Unsupported operand"):
            # A byte the safe unpickler does not take: a damaged file (text reads as opcodes)
            # or an old-protocol pickle, which may hold code: it cannot tell which.
            raise CheckpointError(f"{path} is not a readable vaekit checkpoint: damaged, or a pickle written by "
                                  f"other code that could run code when loaded; refusing it ({reason})") from None
        raise CheckpointError(f"{path} is not a readable vaekit checkpoint (truncated or damaged? {reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_MAGIC:
        raise CheckpointError(f"{path} is not a vaekit checkpoint")
    version = state.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this vaekit ({__version__}) reads 1..{CHECKPOINT_FORMAT}"
        )
    return state
