"""Argument checks shared by the likelihoods, the objectives and the fused kernels.

Two kinds of check, as in ``torch.distributions``:

* **shape, dtype and type checks** always run: they read only metadata, never the values;
* **value checks** (finiteness, support) need a device synchronisation, so they follow a
  switch: :func:`set_validate_args` for the whole process, or ``validate_args=`` for one
  call. A compiled or graph-captured step turns them off.

Every error names the argument, what was expected and what was given.

Also here, because every likelihood applies them: :func:`upcast` (the inputs in one dtype,
half precision computed in float32) and :func:`sum_event` (per-example values are sums over
the event dims).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "set_validate_args",
    "validate_args_enabled",
    "validating",
    "value_checks",
    "check_tensor",
    "check_same_shape",
    "check_finite",
    "read_value",
    "check_unit_interval",
    "check_number",
    "check_int",
    "check_choice",
    "check_generator",
    "in_section",
    "check_beta",
    "refuse_inert",
    "reset_inert",
    "upcast",
    "sum_event",
    "slow_bf16_note",
    "MAX_SEED",
    "MAX_GENERATOR_SEED",
    "MAX_EVAL_SEED",
    "MAX_IW_SAMPLES",
]

# log(2 pi), the constant of every Gaussian log-density; one definition for every module.
_LOG_2PI = math.log(2.0 * math.pi)

_validate_default = True


# ---------------------------------------------------------------------------------------
# The value-check switch


def set_validate_args(value: bool) -> None:
    """Switch the value checks (support, finiteness) on or off for the whole process.

    Shape and dtype checks always run. The value checks need a device synchronisation,
    so a compiled or graph-captured training step turns them off, as
    ``torch.distributions.Distribution.set_default_validate_args`` does.
    """
    global _validate_default
    if not isinstance(value, bool):
        raise TypeError(f"value must be a bool, got {type(value).__name__}")
    _validate_default = value


def validate_args_enabled() -> bool:
    """Whether the value checks run by default."""
    return _validate_default


@contextlib.contextmanager
def value_checks(enabled: bool, *, distributions: bool = False):
    """Within the block, the value checks are ``enabled`` (and, with ``distributions``,
    ``torch.distributions``' default ``validate_args`` too); the previous settings come
    back on the way out, also when the block raises."""
    before = _validate_default, torch.distributions.Distribution._validate_args
    set_validate_args(enabled)
    if distributions:
        torch.distributions.Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        set_validate_args(before[0])
        if distributions:
            torch.distributions.Distribution.set_default_validate_args(before[1])


def validating(validate_args: bool | None) -> bool:
    """Whether one call runs its value checks: ``validate_args``, or the process default
    (:func:`set_validate_args`) when it is ``None``."""
    return _validate_default if validate_args is None else validate_args


# ---------------------------------------------------------------------------------------
# Tensors: type, dtype and shape (always), values (when validating)


def check_tensor(name: str, t, min_dim: int = 1) -> None:
    """Raise unless ``t`` is a floating-point ``torch.Tensor`` with at least ``min_dim`` dims."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s) [B, ...], got shape {tuple(t.shape)}"
        )


def check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    """Raise unless ``a`` and ``b`` have the same shape (no broadcasting)."""
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}"
        )


def read_value(t: Tensor, name: str, as_type=bool):
    """``as_type(t)`` (``bool`` or ``float``) for a value check of the argument ``name``.
    ``torch.func.vmap`` cannot read values: there the check says how to turn the checks
    off, where PyTorch's own error spoke of data-dependent control flow."""
    try:
        return as_type(t)
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        raise RuntimeError(f"the value check of {name} cannot run under torch.func.vmap (it reads the values); "
                           f"pass validate_args=False or call vaekit.set_validate_args(False)") from None


def check_finite(name: str, t: Tensor) -> None:
    """Raise if ``t`` holds a NaN or an infinity. A value check: it synchronises."""
    if not read_value(torch.isfinite(t).all(), name):
        raise ValueError(f"{name} must be finite, but it holds NaN or infinite values")


def check_unit_interval(name: str, t: Tensor) -> None:
    """Raise unless every value of ``t`` lies in [0, 1]. A value check: it synchronises."""
    if not read_value(((t >= 0) & (t <= 1)).all(), name):
        # A NaN fails the range test too, but its min and max are NaN: count them instead.
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:
            raise ValueError(f"{name} must lie in [0, 1], but it holds {n_nan} NaN and {n_inf} infinite "
                             f"value(s) (of {t.numel()})")
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(f"{name} must lie in [0, 1], got values in [{_shown(lo, lo < 0)}, {_shown(hi, hi > 1)}]")


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed (host or accelerator memory), which a
    setting too large for the machine causes: NumPy's and Python's MemoryError, PyTorch's
    OutOfMemoryError and its CPU allocator's RuntimeError."""
    if isinstance(e, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    text = str(e)
    return isinstance(e, oom) or "DefaultCPUAllocator" in text or "can't allocate memory" in text


def _value_range(t: Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``t``'s values as floats, from one pass (``torch.aminmax``) that
    makes no temporary of ``t``'s size, where ``isfinite`` and comparisons would make
    several. Both are NaN when ``t`` holds a NaN; an infinity shows as itself. ``t`` must
    be a non-empty floating-point tensor."""
    lo, hi = torch.aminmax(t.detach())
    return tuple(torch.stack((lo, hi)).tolist())  # one device synchronisation, not two


def _holds_for_all(t: Tensor, test) -> bool:
    """Whether ``test(block)``, a boolean tensor, is true everywhere for every block of
    ``t``'s rows: the masks ``test`` makes stay a few MB, whatever the data set."""
    if t.dim() == 0 or t.numel() == 0:
        return bool(test(t).all())
    rows = max(1, (1 << 22) // max(1, t[0].numel()))
    return all(bool(test(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))


def _count_nonfinite(t: Tensor) -> int:
    """How many of ``t``'s values are NaN or infinite, counted a block of rows at a time
    so that the masks stay small (a data set of any size costs a few MB here)."""
    if t.dim() == 0 or t.numel() == 0:
        return int((~torch.isfinite(t)).sum())
    rows = max(1, (1 << 22) // max(1, t[0].numel()))
    return sum(int((~torch.isfinite(t[i : i + rows])).sum()) for i in range(0, t.shape[0], rows))


def _shown(v: float, outside: bool) -> str:
    """``v`` as :g writes it, or in full where that would put a value outside [0, 1] inside
    it (1.0000001 is "1" to :g)."""
    s = f"{v:g}"
    return repr(v) if outside and 0 <= float(s) <= 1 else s


# ---------------------------------------------------------------------------------------
# Python numbers (settings, not data: checked whatever the switch says)


def check_number(name: str, value, *, low: float = 0.0, open_low: bool = False,
                 high: float = math.inf) -> float:
    """``value`` as a float, if it is a finite real number ``>= low`` (``> low`` when
    ``open_low``) and ``<= high``; a bool is not a number. Otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and (v > low if open_low else v >= low) and v <= high):
        bounds = ([f"{'>' if open_low else '>='} {low:g}"] if low > -math.inf else []) + (
            [f"<= {high:g}"] if high < math.inf else [])  # (no ">= -inf": any finite number)
        bound = f" {' and '.join(bounds)}" if bounds else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return v


# The most importance samples per example any estimate or objective takes (the published
# estimates take 5,000): beyond it a call would run for days, where it should be refused.
MAX_IW_SAMPLES = 1_000_000

# The largest seed a config takes: PyTorch's generators take 64-bit seeds, and vaekit
# seeds some streams with small offsets from it.
MAX_SEED = 2**63 - 1
# The largest seed a torch.Generator takes; evaluate and sample, which also draw with
# seed + 1 and seed + 2, take seeds up to MAX_GENERATOR_SEED - 2.
MAX_GENERATOR_SEED = 2**64 - 1
MAX_EVAL_SEED = MAX_GENERATOR_SEED - 2  # evaluate and sample also draw with seed + 1 and seed + 2


def check_int(name: str, value, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int, if it is an integer ``>= low`` (and ``<= high`` when given); a
    bool is not one. Otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def check_generator(generator) -> None:
    """Raise unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_choice(name: str, value, choices: tuple) -> str:
    """``value``, if it is one of the strings ``choices``. Otherwise raise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@contextlib.contextmanager
def in_section(section: str):
    """Prefix the errors of a config dataclass's checks with its name, so that a field
    that two sections share (``seed``) is named unambiguously: ``DataConfig.seed ...``."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{section}.{e}") from None


def refuse_inert(config, table: dict) -> None:
    """Refuse a field of ``config`` set away from its "off" value where it cannot act.

    ``table`` maps a field to ``(off, gates, acts, need)``: the fields it depends on, whether
    their values (in that order) let it act, and what it needs, in words. A
    ``pixelcnn_width`` with no PixelCNN head would change nothing: the user meant
    something else, so the config says so rather than train what was not asked for."""
    for field, (off, gates, acts, need) in table.items():
        value = getattr(config, field)
        if value != off and not acts(*(getattr(config, g) for g in gates)):
            now = ", ".join(f"{g}={getattr(config, g)!r}" for g in gates)
            raise ValueError(f"{field}={value!r} has no effect with {now}; use {need}")


def reset_inert(section: dict, defaults: dict, table: dict, keep=()) -> dict:
    """A saved config ``section`` (a mapping) with each field of ``table`` (as
    :func:`refuse_inert` takes it) that could not act there set to its "off" value: earlier
    versions accepted such fields, and the runs they saved trained exactly as the section
    then says. ``defaults`` gives the gates the section leaves out; a gate of the wrong
    type is left for the config's own check to name. Fields in ``keep`` (the user's own
    settings, which are refused instead) stay as they are."""
    out = dict(section)
    for field, (off, gates, acts, _) in table.items():
        if field in out and field not in keep:
            try:
                inert = not acts(*(out.get(g, defaults[g]) for g in gates))
            except TypeError:
                continue
            if inert:
                out[field] = off
    return out


def _cpu_bf16_fast() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the check: nothing to say
        return True


def slow_bf16_note(device, setting: str) -> str | None:
    """A line saying that ``setting`` (bfloat16 autocast) will run slower than float32 on
    ``device``, or None. On a CPU without the instructions PyTorch's oneDNN builds its
    bfloat16 matrix products on (AVX-512, or Arm's BF16), they fall back to a slow path:
    the 784-400-20 model's products ran 17x slower than float32 on an AVX2-only EPYC, its
    training epoch 8x (docs/benchmarks.md, sixteenth session)."""
    if torch.device(device).type != "cpu" or _cpu_bf16_fast():
        return None
    return (f"{setting}: this CPU has no bfloat16 instructions that PyTorch uses (AVX-512 or Arm BF16), so "
            f"bfloat16 runs many times slower than float32 here (8 to 17 times for an MLP on an AVX2 EPYC); "
            f"float32 is faster")


def check_beta(beta):
    """``beta``, if it is a KL weight: a real number >= 0 (a Python or numpy scalar, not a bool;
    returned as a float) or a 0-dim floating-point tensor (returned as is, and read, so it
    synchronises). Otherwise raise, naming it."""
    if isinstance(beta, Tensor):
        if beta.dim() != 0:
            raise ValueError(f"beta must be a scalar (a 0-dim tensor), got a tensor of shape {tuple(beta.shape)}")
        if not beta.is_floating_point():
            raise TypeError(f"beta must be a floating-point tensor, got dtype {beta.dtype}")
        value = read_value(beta.detach(), "beta", float)  # (a Parameter: read, not differentiated)
    elif isinstance(beta, numbers.Real) and not isinstance(beta, bool):
        value = float(beta)
    else:
        raise TypeError(f"beta must be a number or a 0-dim floating-point tensor, got {type(beta).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {value}")
    return beta if isinstance(beta, Tensor) else value


# ---------------------------------------------------------------------------------------
# The two conventions every likelihood applies


def upcast(*ts):
    """The tensors among ``ts`` in one common dtype: ``torch.promote_types`` over them, at
    least float32 (half precision is computed in float32; float32 with float64 gives
    float64). Python numbers pass through unchanged (torch keeps them weak). Returns a
    tuple, one per input; a tensor already in the common dtype is returned as is."""
    dtype = torch.float32
    for t in ts:
        if isinstance(t, Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) if isinstance(t, Tensor) else t for t in ts)


def sum_event(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``[B, *event] -> [B]`` (an empty batch too).

    Example:
        >>> sum_event(torch.ones(2, 3, 4)), sum_event(torch.ones(0, 3, 4)).shape
        (tensor([12., 12.]), torch.Size([0]))
    """
    # No -1 in the reshape: with B = 0 it would be ambiguous, and torch refuses it.
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(1)
