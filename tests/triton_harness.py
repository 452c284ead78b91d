"""Where the tests of the Triton kernels run (shared by test_kernels.py and test_adam_tail.py).

A test marked with :func:`interpreted` runs wherever the real kernels can run:

* on a machine with CUDA, in the test process, on the GPU (every tensor such a test makes
  is created there: :func:`triton_path_device` runs it under ``torch.device("cuda")``);
* elsewhere under Triton's interpreter on CPU tensors. The interpreter has to be switched
  on (TRITON_INTERPRET=1) before the kernels are decorated, i.e. before vaekit.kernels is
  first imported. Inside a pytest run some other module may already have imported it, and
  setting the variable there would leak into every later test module; so these tests run
  in a fresh subprocess that re-runs their file with the variable set
  (:func:`run_file_interpreted`), and are skipped in the parent process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaekit import kernels

CHILD = os.environ.get("VAEKIT_TRITON_CHILD") == "1"
# The real kernels on a GPU, in this process (the interpreter's child never uses the GPU).
NATIVE = not CHILD and kernels.triton is not None and torch.cuda.is_available()


def interpreted(test):
    """A Triton-path test: natively on CUDA, else only in the interpreter's child process."""
    skip = pytest.mark.skipif(
        not (CHILD or NATIVE), reason="Triton path: run by the TRITON_INTERPRET=1 subprocess of its file"
    )
    return skip(pytest.mark.triton_path(test))


@pytest.fixture(autouse=True)
def triton_path_device(request):
    """Natively, a Triton-path test makes its tensors on the GPU (import this fixture into
    the test module)."""
    if NATIVE and request.node.get_closest_marker("triton_path"):
        with torch.device("cuda"):
            yield
    else:
        yield


def run_file_interpreted(test_file: str) -> None:
    """Run the tests of ``test_file`` in a TRITON_INTERPRET=1 subprocess; assert they pass."""
    if kernels.triton is None:
        pytest.skip("triton is not installed: the Triton path is not tested (the eager fallback is)")
    clash = interpreter_clash()
    if clash:
        pytest.skip(clash)
    env = dict(os.environ, TRITON_INTERPRET="1", VAEKIT_TRITON_CHILD="1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider",
         str(Path(test_file).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " failed" not in proc.stdout, report


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_clash() -> str:
    """Why Triton's interpreter cannot run here ("" when it can). Triton before 3.8 (3.6
    checked, the GPU machines' version) turns a one-element NumPy array into an int for a
    loop bound read from a kernel argument, which NumPy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); 3.6 with NumPy 2.3 and 3.8 with 2.4 run.
    Only the interpreter is affected: compiled kernels never see NumPy."""
    import numpy

    if _release(kernels.triton.__version__) < (3, 8) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {kernels.triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__}; "
                f"install triton>=3.8 or numpy<2.4 to test the Triton path on a CPU")
    return ""


def compile_for_hopper(fn, signature: dict, constexprs: dict, asm: str = "cubin"):
    """Compile the Triton kernel ``fn`` ahead of time for sm_90 (H100, H200) with the ptxas
    that Triton ships, on any machine; returns the cubin, or the ``asm`` named ("ptx": the
    text, where the width of each load can be read) (skips where ptxas is missing).
    ``signature``: argument name -> Triton type ("*fp32", "i32", "fp32", ...) for the
    arguments that are not in ``constexprs``. Catches what the interpreter lets through
    (types, pointer casts) without a GPU."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    assert sorted(signature) == sorted(fn.arg_names), (fn.arg_names, list(signature))
    signature = {name: signature[name] for name in fn.arg_names}
    try:
        compiled = triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except (FileNotFoundError, RuntimeError) as e:
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas here: {e}")
        raise
    return compiled.asm.get(asm)
