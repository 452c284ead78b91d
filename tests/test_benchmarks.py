"""Smoke tests of the benchmark scripts (benchmarks/*.py) and of the GPU call (gpu.sh).

A GPU machine is lent to the project rarely and for minutes; a script that has rotted (an
import, an argument, an API of vaekit that changed) would lose that time. So each script
runs here once, in a process of its own, on the CPU, at the smallest sizes its flags allow,
and must exit 0 and print what it promises (its SUMMARY or CHECK lines, its table) and no
row that FAILED (epoch_bench and step_profile report a failed row and go on). MNIST is a
small random stand-in of MNIST's shapes written here; pythae is not installed, so the
scripts that race it must say that they skipped it. gpu.sh's calls are checked against
the scripts' own arguments (a renamed flag would otherwise show only on the GPU).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
# CPU only (the CUDA paths are what gpu.sh runs); no Triton interpreter unless a script asks
DROP = ("TRITON_INTERPRET", "VAEKIT_TRITON_CHILD", "VAEKIT_DEBUG")
ENV = {**{k: v for k, v in os.environ.items() if k not in DROP}, "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
       "PYTHONUNBUFFERED": "1"}
PYTHAE_SKIPPED = r"pythae: skipped: pythae is not importable here"


def run(*args, timeout=180) -> str:
    """``python *args`` from the repository's root; its output, after checking it exited 0."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{args[0]} exited {p.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A folder holding mnist.npz: MNIST's keys, dtypes and image shape, random binary
    images, few rows (the 10,000 validation images amp_quality's preset splits off, 300 to
    train on; 1,000 test images, write_bench's validation set)."""
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    images = lambda n: (rng.random((n, 28, 28)) < 0.13).astype(np.uint8) * 255  # noqa: E731
    np.savez(folder / "mnist.npz", x_train=images(10300), y_train=np.zeros(10300, np.uint8),
             x_test=images(1000), y_test=np.zeros(1000, np.uint8))
    return folder


def epoch_rows(*labels) -> list[str]:
    """epoch_bench's SUMMARY line of each row (on the CPU, one thread)."""
    return [re.escape(f"SUMMARY epoch_bench cpu threads=1 {label}: ") + r"[0-9.]+ m?s/epoch" for label in labels]


# "script[ what]", its arguments ({data}: the stand-in's path), what its output must contain (regexes)
CASES = {
    "loss_bench": (["--device", "cpu", "--batch", "8", "--dim", "784", "--latent", "4", "--no-compile",
                    "--warmup", "1", "--repeats", "2"],
                   [r"CHECK loss_bench plan rows: ok", r"\nrecipe +ms", r"\n\(d\) fused +[0-9.]+ "]),
    "epoch_bench": (["--device", "cpu", "--threads", "1", "--epochs", "1", "--warmup", "1", "--n-train", "300",
                     "--amp", "both", "--skip", "compiled,fit-compile", "--data", "{data}"],
                    [r"\(d\) " + PYTHAE_SKIPPED, r"timed epoch 1, threads=1: ",
                     *epoch_rows("(a) classic", "(b) vaekit eager step", "(b) vaekit eager step, bf16 autocast",
                                 "(c) vaekit static step", "(e) matmul floor", "(e) matmul floor, bf16 autocast",
                                 "(f) vaekit fit, epoch incl. val+ckpt",
                                 "(f) vaekit fit, epoch incl. val+ckpt, bf16 autocast")]),
    # --dynamic: every contender binarizes each batch afresh (pythae left out)
    "epoch_bench --dynamic": (["--device", "cpu", "--threads", "1", "--epochs", "1", "--warmup", "1",
                               "--n-train", "300", "--amp", "none", "--skip", "compiled,fit-compile,floor",
                               "--dynamic", "--data", "{data}"],
                              [r"binarized afresh in each batch",
                               *epoch_rows("(a) classic", "(b) vaekit eager step", "(c) vaekit static step",
                                           "(f) vaekit fit, epoch incl. val+ckpt")]),
    "iw_bench": (["--device", "cpu", "--k", "4", "--n", "16", "--n-baseline", "4", "--train-steps", "2",
                  "--reduced", "tf32,bf16", "--tuned", "8,2", "--data", "{data}"],
                 [r"PRECISION bf16 vs fp32", r"CHECK iw_bench \(a'\) vs \(b\): ok",
                  r"CHECK iw_bench \(a\) vs \(b\): ok", r"\(c\) " + PYTHAE_SKIPPED,
                  r"SUMMARY iw_bench cpu k=4 \(b\) vaekit iw_nll: ",
                  r"SUMMARY iw_bench cpu k=4 \(b'\) iw_nll batch 8 chunk 2"]),
    "step_profile": (["--device", "cpu", "--variants", "static,static-sample", "--steps", "1", "--timed", "2"],
                     [r"SUMMARY step_profile static: \d+ top-level aten ops/step",
                      r"SUMMARY step_profile static-sample: \d+ top-level aten ops/step"]),
    "host_bench": (["--epochs", "1", "--binarize", "dynamic", "--graph-steps", "32", "--hidden", "8,4"],
                   [r"SUMMARY host_bench cpu binarize=dynamic graph_steps=32 hidden=8,4: [0-9.]+ us/step"]),
    "write_bench": (["--device", "cpu", "--threads", "1", "--epochs", "1", "--repeats", "1", "--n-train", "300",
                     "--data", "{data}"],
                    [r"\| fit, files written in the background \|", r"SUMMARY write_bench CPU: end of epoch"]),
    "amp_quality": (["--epochs", "1", "--iw-samples", "2", "--threads", "1", "--data", "{data}"],
                    [r"bf16 - fp32 IW NLL k=2: ", r"SUMMARY amp_quality fp32: val ELBO",
                     r"SUMMARY amp_quality bf16 autocast: val ELBO"]),
    "pythae_compare": (["--device", "cpu", "--threads", "1", "--small", "--epochs", "1", "--k", "2", "--n-test", "10",
                        "--data", "{data}"],
                       [PYTHAE_SKIPPED,
                        r"SUMMARY pythae_compare vaekit \(train.fit\): test NLL [0-9.]+ \(k=2, 10 images"]),
    "ar_eval_cost": (["--threads", "1", "--batch-size", "4"],
                     [r"\nplain decoder +[0-9.]+ +1\.0 ", r"\nPixelCNN head, early fusion +[0-9.]+ "]),
    # the Triton variants take 25 s each under the interpreter: the plain step only
    "kernel_count": (["--variants", "static"], [r"SUMMARY kernel_count static: \d+ kernels a captured step"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_runs(case, mnist_dir):
    (script, *_), (args, expected) = case.split(), CASES[case]
    out = run(BENCH / f"{script}.py", *(a.format(data=mnist_dir / "mnist.npz") for a in args))
    for pattern in expected:
        assert re.search(pattern, out), f"{script}: no {pattern!r} in its output:\n{out[-4000:]}"
    assert "FAILED" not in out, f"{script}: a row failed:\n{out[-4000:]}"


def test_precision_shift_runs(mnist_dir, tmp_path):
    """On a run that `vaekit train` wrote (as prepare_gpu.sh makes one), with its data
    named again by --data-dir, as gpu.sh does."""
    run("-m", "vaekit", "train", "--dataset", "mnist", "--data-dir", mnist_dir, "--hidden", "16", "--latent-dim", "2",
        "--epochs", "1", "--max-steps", "2", "--val-size", "100", "--no-progress", "--num-threads", "1",
        "--run-dir", tmp_path / "run")
    out = run(BENCH / "precision_shift.py", tmp_path / "run", "--k", "2", "--limit", "8", "--data-dir", mnist_dir)
    assert re.search(r"fp32: mean NLL [0-9.]+ nats", out), out
    assert re.search(r"SUMMARY precision_shift bf16: same noise, 8 images: the mean NLL moves by", out), out


def test_every_benchmark_has_a_smoke_test():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts == {case.split()[0] for case in CASES} | {"precision_shift"}


def test_shell_scripts_parse():
    for name in ("gpu.sh", "prepare_gpu.sh", "gpu_quality.sh", "sprites_study.sh"):
        p = subprocess.run(["bash", "-n", str(BENCH / name)], capture_output=True, text=True)
        assert p.returncode == 0, f"{name}: {p.stderr}"


def gpu_calls() -> list[tuple[str, list[str], str]]:
    """(script, flags, the line) for each benchmarks/<script>.py that gpu.sh runs; the flags
    of a bash array expanded on the line (``${WHERE[@]...}``) count as the line's."""
    text = (BENCH / "gpu.sh").read_text().replace("\\\n", " ")
    arrays = {name: body for name, body in re.findall(r"\b(\w+)=\(([^)]*)\)", text)}
    calls = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)  # comments
        for script, rest in re.findall(r"benchmarks/(\w+)\.py\b(.*)", line):
            rest += " ".join(body for name, body in arrays.items() if "${" + name + "[@]" in rest)
            calls.append((script, re.findall(r"(?<![\w-])--[a-z][\w-]*", rest), line.strip()))
    return calls


HELP = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv, out = [path, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_path(path, run_name="__main__")
    print("=== " + path + "\\n" + out.getvalue())
"""


def test_gpu_sh_calls_what_the_scripts_take():
    """Every script that gpu.sh runs exists and takes each flag it is given (its --help,
    all in one process), and each item of an epoch_bench --skip list names a contender (an
    unknown one is ignored, and the row it meant to leave out would run on the GPU's
    time); every test file and test that gpu.sh names exists."""
    calls = gpu_calls()
    scripts = sorted({script for script, _, _ in calls})
    assert {"loss_bench", "epoch_bench", "iw_bench", "host_bench"} <= set(scripts), f"gpu.sh: parsed {calls}"
    for script in scripts:
        assert (BENCH / f"{script}.py").is_file(), f"gpu.sh runs benchmarks/{script}.py, which does not exist"
    out = run("-c", HELP, *(f"benchmarks/{s}.py" for s in scripts), timeout=120)
    helps = {part.split(".py", 1)[0]: part for part in out.split("=== benchmarks/")[1:]}
    for script, flags, line in calls:
        taken = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", helps[script]))
        assert taken, f"{script} --help printed no flags:\n{helps[script]}"
        for flag in flags:
            assert flag in taken, f"gpu.sh passes {flag} to {script}.py, which does not take it: {line}"
        if script == "epoch_bench":
            source = (BENCH / "epoch_bench.py").read_text()
            for skip in re.findall(r"--skip ([\w,-]+)", line):
                for key in skip.split(","):
                    assert f'"{key}"' in source, f"gpu.sh: epoch_bench.py has no contender {key!r} to skip: {line}"
    text = (BENCH / "gpu.sh").read_text()
    for path, test in re.findall(r"\b(tests/test_\w+\.py)(?:::(\w+))?", text):
        assert (REPO / path).is_file(), f"gpu.sh runs {path}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", (REPO / path).read_text(), re.M), f"gpu.sh runs {path}::{test}: none"


NO_CUDA = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv, err, code = [path, "--device", "cuda"], io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code
    print("=== " + path + f" exit {code}\\n" + err.getvalue())
"""


def test_a_script_given_a_device_this_machine_lacks_says_so_in_one_line():
    """``--device cuda`` without CUDA (CUDA_VISIBLE_DEVICES is empty here): argparse's
    usage and one line naming the flag, exit 2; it was a traceback from deep in the run."""
    import torch

    scripts = sorted(p.stem for p in BENCH.glob("*.py") if '"--device"' in p.read_text())
    assert len(scripts) >= 8, scripts
    out = run("-c", NO_CUDA, *(f"benchmarks/{s}.py" for s in scripts), timeout=120)
    for part in out.split("=== benchmarks/")[1:]:
        head, _, err = part.partition("\n")
        assert head.endswith(".py exit 2"), part
        assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(
            f"error: argument --device: this machine has no CUDA device (torch {torch.__version__}); "
            f"use --device cpu, got 'cuda'"), part
