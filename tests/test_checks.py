"""Tests for vaekit.checks: each check passes a good value and names the argument and the
value given when it rejects a bad one; the value-check switch; upcast and sum_event."""

import doctest
import math
import re

import numpy as np
import pytest
import torch

from vaekit import checks as c
from vaekit.likelihoods import discretized_logistic_nll


@pytest.fixture(autouse=True)
def _restore_validation():
    before = c.validate_args_enabled()
    yield
    c.set_validate_args(before)


def test_log_2pi_is_the_gaussian_constant():
    log_density_at_mean = torch.distributions.Normal(0.0, 1.0).log_prob(torch.tensor(0.0, dtype=torch.float64))
    assert c._LOG_2PI == pytest.approx(-2 * float(log_density_at_mean), rel=1e-15)


def test_check_tensor():
    c.check_tensor("x", torch.zeros(2, 3), min_dim=2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        c.check_tensor("x", [1.0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        c.check_tensor("x", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("x must have at least 1 dimension(s) [B, ...], got shape ()")):
        c.check_tensor("x", torch.tensor(1.0))


def test_check_same_shape():
    c.check_same_shape("x", torch.zeros(4, 10), "logits", torch.zeros(4, 10))
    with pytest.raises(ValueError, match=re.escape("x has shape (4, 10) but logits has shape (4, 11)")):
        c.check_same_shape("x", torch.zeros(4, 10), "logits", torch.zeros(4, 11))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite(bad):
    c.check_finite("mu", torch.tensor([0.0, -1e30, 1e30]))
    with pytest.raises(ValueError, match="mu must be finite, but it holds NaN or infinite values"):
        c.check_finite("mu", torch.tensor([0.0, bad]))


def test_check_unit_interval():
    c.check_unit_interval("x", torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=re.escape("x must lie in [0, 1], got values in [-0.5, 1]")):
        c.check_unit_interval("x", torch.tensor([-0.5, 1.0]))
    with pytest.raises(ValueError, match=re.escape("got values in [0, 1.25]")):
        c.check_unit_interval("x", torch.tensor([0.0, 1.25]))


def test_check_unit_interval_counts_nan_and_inf_instead_of_a_nan_range():
    # min and max of a tensor holding a NaN are NaN: "values in [nan, nan]" said nothing.
    with pytest.raises(ValueError, match=re.escape("x must lie in [0, 1], but it holds 2 NaN and 1 infinite "
                                                   "value(s) (of 4)")):
        c.check_unit_interval("x", torch.tensor([math.nan, 0.5, math.nan, math.inf]))


def test_check_number():
    assert c.check_number("tau", 3) == 3.0 and isinstance(c.check_number("tau", 3), float)
    assert c.check_number("tau", 0.0) == 0.0 and c.check_number("tau", 2.0, high=2.0) == 2.0
    with pytest.raises(TypeError, match="tau must be a number, got bool"):
        c.check_number("tau", True)
    with pytest.raises(TypeError, match="tau must be a number, got str"):
        c.check_number("tau", "1")
    for value, kw, bound in [(-1.0, {}, ">= 0"), (0.0, {"open_low": True}, "> 0"),
                             (math.nan, {}, ">= 0"), (math.inf, {}, ">= 0"), (3.0, {"high": 2.0}, ">= 0 and <= 2")]:
        with pytest.raises(ValueError, match=re.escape(f"tau must be a finite number {bound}, got {value}")):
            c.check_number("tau", value, **kw)
    for kw, bound in [({"low": -math.inf}, ""), ({"low": -math.inf, "high": 2.0}, " <= 2")]:  # no ">= -inf"
        with pytest.raises(ValueError, match=re.escape(f"tau must be a finite number{bound}, got nan") + "$"):
            c.check_number("tau", math.nan, **kw)


def test_check_int():
    assert c.check_int("n_bits", 8, low=1) == 8
    with pytest.raises(TypeError, match="n_bits must be an int, got float"):
        c.check_int("n_bits", 8.0)
    with pytest.raises(TypeError, match="n_bits must be an int, got bool"):
        c.check_int("n_bits", True)
    with pytest.raises(ValueError, match="n_bits must be an int >= 1, got 0"):
        c.check_int("n_bits", 0, low=1)


def test_check_choice():
    assert c.check_choice("split", "tail", ("random", "tail")) == "tail"
    with pytest.raises(ValueError, match=r"split must be one of random, tail, got 'head'"):
        c.check_choice("split", "head", ("random", "tail"))
    with pytest.raises(TypeError, match="split must be a str, one of .*, got int"):
        c.check_choice("split", 3, ("random", "tail"))


def test_check_beta():
    for ok in (0, 1.5, np.float32(4.0), np.int64(2)):
        value = c.check_beta(ok)
        assert type(value) is float and value == float(ok)
    t = torch.tensor(2.0, dtype=torch.float64)
    assert c.check_beta(t) is t  # a tensor stays one: a schedule updates it in place
    for shape in ((2,), (1,)):  # a [1] beta made a [1] loss beside 0-dim terms
        with pytest.raises(ValueError, match=re.escape(f"beta must be a scalar (a 0-dim tensor), got a tensor "
                                                       f"of shape {shape}")):
            c.check_beta(torch.ones(shape))
    with pytest.raises(TypeError, match="beta must be a number or a 0-dim floating-point tensor, got bool"):
        c.check_beta(False)
    with pytest.raises(TypeError, match="beta must be a number or a 0-dim floating-point tensor, got str"):
        c.check_beta("1")
    for dtype in (torch.bool, torch.int64):  # Python True is refused, so is torch.tensor(True)
        with pytest.raises(TypeError, match=f"beta must be a floating-point tensor, got dtype {dtype}"):
            c.check_beta(torch.tensor(1, dtype=dtype))
    for bad in (-1.0, math.nan, torch.tensor(-0.5)):
        with pytest.raises(ValueError, match=f"beta must be a finite number >= 0, got {float(bad)}"):
            c.check_beta(bad)


def test_the_switch_turns_value_checks_off_and_back_on():
    off_grid = torch.full((1, 3), 0.5001)  # a value check rejects it; the shape checks do not
    mean, log_scale = torch.full((1, 3), 0.5), torch.zeros(1, 3)
    with pytest.raises(TypeError, match="value must be a bool, got int"):
        c.set_validate_args(0)
    c.set_validate_args(False)
    assert not c.validate_args_enabled() and not c.validating(None) and c.validating(True)
    assert torch.isfinite(discretized_logistic_nll(mean, log_scale, off_grid)).all()
    with pytest.raises(ValueError, match="multiples"):  # validate_args=True overrides the default
        discretized_logistic_nll(mean, log_scale, off_grid, validate_args=True)
    with pytest.raises(ValueError, match="x has shape"):  # shape checks run whatever the switch
        discretized_logistic_nll(mean, log_scale, off_grid[:, :2])
    c.set_validate_args(True)
    assert c.validate_args_enabled() and c.validating(None) and not c.validating(False)
    with pytest.raises(ValueError, match="multiples"):
        discretized_logistic_nll(mean, log_scale, off_grid)
    assert torch.isfinite(discretized_logistic_nll(mean, log_scale, off_grid, validate_args=False)).all()


@pytest.mark.parametrize("dtypes, want", [
    ((torch.bfloat16,), torch.float32),
    ((torch.float16, torch.bfloat16), torch.float32),
    ((torch.bfloat16, torch.float32), torch.float32),
    ((torch.float32, torch.float32), torch.float32),
    ((torch.float64, torch.float32), torch.float64),  # not rounded to the lower precision
    ((torch.float32, torch.bfloat16, torch.float64), torch.float64),
])
def test_upcast_gives_one_common_dtype_at_least_float32(dtypes, want):
    ts = [torch.ones(2, dtype=d) for d in dtypes]
    out = c.upcast(*ts, 0.5)
    assert isinstance(out, tuple) and len(out) == len(ts) + 1
    assert [t.dtype for t in out[:-1]] == [want] * len(ts) and out[-1] == 0.5  # a number passes through
    assert all(o is t for o, t in zip(out, ts) if t.dtype == want)
    assert all(bool((o == 1).all()) for o in out[:-1])


@pytest.mark.parametrize("shape", [(3, 5), (3, 1, 4, 2), (1, 7, 2), (4,), (0, 5), (0, 1, 2, 2), (0,), (3, 0)])
def test_sum_event_against_float64(shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want = t.double().unsqueeze(-1).flatten(1).sum(1)  # a trailing 1 gives a 1-D t an event dim to sum
    got = c.sum_event(t)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_value_checks_restores_both_switches_even_when_the_block_raises():
    before = torch.distributions.Distribution._validate_args
    c.set_validate_args(True)
    with pytest.raises(RuntimeError, match="inside"):
        with c.value_checks(False, distributions=True):
            assert not c.validate_args_enabled() and torch.distributions.Distribution._validate_args is False
            raise RuntimeError("inside")
    assert c.validate_args_enabled() and torch.distributions.Distribution._validate_args == before


def test_docstring_examples_run():
    result = doctest.testmod(c, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0


def test_slow_bf16_note_follows_pytorchs_own_bf16_check(monkeypatch):
    """bfloat16 autocast on a CPU without the instructions oneDNN's bfloat16 products use
    (AVX2 only) ran the 784-400-20 model 17x slower than float32: that is said, and only there."""
    assert (c.slow_bf16_note("cpu", "x") is None) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setattr(c, "_cpu_bf16_fast", lambda: False)
    assert c.slow_bf16_note(torch.device("cpu"), "--precision bf16").startswith(
        "--precision bf16: this CPU has no bfloat16 instructions that PyTorch uses")
    assert c.slow_bf16_note("cuda", "--precision bf16") is None  # a GPU's bfloat16 is its own
    monkeypatch.setattr(c, "_cpu_bf16_fast", lambda: True)
    assert c.slow_bf16_note("cpu", "--precision bf16") is None


def test_every_module_exports_only_names_it_has():
    """Each vaekit module's ``__all__`` resolves (``from vaekit.x import *`` would fail on
    a stale name)."""
    import importlib
    import pkgutil

    import vaekit

    modules = [m.name for m in pkgutil.iter_modules(vaekit.__path__, "vaekit.") if m.name != "vaekit.__main__"]
    assert len(modules) > 20
    for name in ["vaekit", *modules]:
        module = importlib.import_module(name)
        missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names {missing}, which it does not have"


def test_the_packages_names_are_typed_as_they_are_loaded():
    """``vaekit.fit`` and ``from vaekit import VAE`` were Any to a type checker (the lazy
    ``__getattr__``): an ``if TYPE_CHECKING:`` block imports each name of ``__all__`` from
    the module ``_WHERE`` loads it from, while ``import vaekit`` still loads none of them."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import vaekit

    tree = ast.parse(Path(vaekit.__file__).read_text(encoding="utf-8"))
    blocks = [node for node in tree.body
              if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1
    imported = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            assert alias.asname is None and alias.name not in imported, alias.name
            imported[alias.name] = node.module
    assert imported == vaekit._WHERE
    assert set(imported) == set(vaekit.__all__) - {"__version__"}
    # at run time the names stay lazy
    code = "import sys, vaekit; assert 'torch' not in sys.modules; vaekit.VAELoss; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# The range of a data set in one pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 65, 1000])
def test_value_range_and_the_nonfinite_count_see_every_position(dtype, n):
    """min and max in one pass show a NaN or an infinity wherever it sits (the vectorised
    body or the tail of the loop); the count agrees with isfinite's, element by element."""
    base = (torch.arange(n, dtype=torch.float64) / n).to(dtype).reshape(n, 1)
    assert c._value_range(base) == (float(base.min()), float(base.max()))
    for pos in sorted({0, n // 2, n - 1}):
        for bad in (math.nan, math.inf, -math.inf):
            t = base.clone()
            t[pos] = bad
            lo, hi = c._value_range(t)
            assert not (math.isfinite(lo) and math.isfinite(hi)), (pos, bad)
            if bad == math.inf:
                assert hi == math.inf
            assert c._count_nonfinite(t) == int((~torch.isfinite(t)).sum()) == 1


def test_the_nonfinite_count_spans_its_blocks():
    t = torch.zeros(5_000_000, 1)  # two blocks of 2**22 rows
    for pos in (0, 2**22 - 1, 2**22, 5_000_000 - 1):
        t[pos] = math.nan
    t[7] = -math.inf
    assert c._count_nonfinite(t) == 5 and c._count_nonfinite(t.reshape(-1)) == 5


def test_check_images_reads_the_data_without_copies_of_it():
    """check_images finds the range in one pass: what it allocates, as the allocator
    records it, is a few scalars, not masks of the data's size (they took 2.3 times it);
    its messages are as before."""
    from test_latents import _peak_allocated
    from vaekit.data import check_images

    x = torch.rand(2000, 1, 28, 28)
    assert _peak_allocated(lambda: check_images(x, "x")) < 1024
    wide = x * 4 - 2
    assert _peak_allocated(lambda: check_images(wide, "x", support="real")) < 1024
    for bad, message in ((math.nan, r"x holds 2 NaN or infinite values out of 1568000$"),
                         (math.inf, r"x holds 2 NaN or infinite values out of 1568000$")):
        y = x.clone()
        y[3, 0, 5, 5] = y[1999, 0, 27, 27] = bad
        with pytest.raises(ValueError, match=message):
            check_images(y, "x", support="real")
    y = x.clone()
    y[5, 0, 0, 0], y[6, 0, 0, 1] = -0.25, 1.5
    with pytest.raises(ValueError, match=r"^x must lie in \[0, 1\], got values in \[-0\.25, 1\.5\]$"):
        check_images(y, "x")
    y[5, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"^x must lie in \[0, 1\], got values in \[0, 1\.5\]$"):
        check_images(y, "x")
    assert check_images(y, "x", support="real") is y


def test_holds_for_all_sees_every_row_of_every_block():
    """The test is made a block of rows at a time (4 rows of 2^20 values here, so three
    blocks for 10 rows): a single failing value in any row, the last block's short one
    included, makes it false; a tensor that passes everywhere is true, as the one-mask
    computation says."""
    from vaekit.checks import _holds_for_all

    t = torch.zeros(10, 1 << 20, dtype=torch.uint8)
    binary = lambda b: (b == 0) | (b == 1)  # noqa: E731
    assert _holds_for_all(t, binary) and bool(binary(t).all())
    for row in range(10):
        t[row, -1] = 2
        assert not _holds_for_all(t, binary), row
        t[row, -1] = 1
    assert _holds_for_all(t, binary)
    assert _holds_for_all(torch.tensor(1.0), binary) and not _holds_for_all(torch.tensor(3.0), binary)
    assert _holds_for_all(torch.zeros(0, 3), binary)
