#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200; Python + torch already there, nothing is
# installed, no network): the three benchmarks of issue #6's goals first (loss, epoch, IW;
# the loss and IW benchmarks check their results against a reference and print CHECK
# lines), then the GPU tests, the host's share, the compiled epoch and $RESCORE, each under
# a timeout, then a summary. Measured on an H100 (2026-11-27): loss 33 s, epoch 38 s, IW
# 24 s, tests 72 s, host 17 s, compiled epoch 30 s, $RESCORE 95 s: 5 min 20 s in all, the
# step profile (added after) not included. The timeouts add up to more than a device call
# should take: give DEADLINE (below), and what it cuts is the end of the list.
#
#   bash benchmarks/gpu.sh                      # timing only, on synthetic binary data
#   MNIST=shared/mnist.npz bash benchmarks/gpu.sh   # real MNIST copied into the repo
#
# $MNIST: path to an .npz with x_train, x_test (uint8, MNIST's shapes). Without it the
# epoch and IW benchmarks use random binary images of MNIST's shape (timing only: their
# NLLs mean nothing). With $OUT set, everything is also written to $OUT/gpu.log.
# $DEADLINE (seconds since the epoch, optional): no step runs past it (each step's
# timeout shrinks to what is left; a step with under 20 s left is skipped), so that the
# script can follow another in one device call of fixed length.
# $STEPS (optional): a comma list of the steps to run (tail_tests, tail_epoch, tail_fit, loss_bench,
# epoch_bench, iw_bench, step_profile, write_bench, tests, host_bench, epoch_compiled, precision_shift);
# default: all.
# $EPOCH_AMP: epoch_bench.py --amp for the epoch_bench step (none, bf16, both; default none).
set -u

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu.log"
fi
: >"$LOG" 2>/dev/null || LOG=/dev/null
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say() { echo "$@" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run with a timeout, log everything, remember the status.
STATUS=()
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ ",$STEPS," != *",$name,"* ]]; then
        return
    fi
    if [ -n "${DEADLINE:-}" ]; then
        local left=$((DEADLINE - $(date +%s)))
        if [ "$left" -lt 20 ]; then
            say ""
            say "=== $name: skipped, ${left}s left before DEADLINE"
            STATUS+=("$(printf '%-12s %-16s' "$name" "SKIPPED (time)")")
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    say ""
    say "=== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    # SIGINT first: pytest then prints its summary of what failed so far, a benchmark its
    # traceback (what a plain kill would lose); a hard kill 10 s later
    timeout -s INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | tee "$TMP/$name.out"
    local rc=${PIPESTATUS[0]}
    local how="ok"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$how" = "ok" ] && how="FAILED (exit $rc)"
    STATUS+=("$(printf '%-12s %-16s %4ss' "$name" "$how" $((SECONDS - t0)))")
}

say "=== machine"
nvidia-smi -L 2>&1 | tee -a "$LOG"
"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1 | tee -a "$LOG"

DATA=synthetic
if [ -n "${MNIST:-}" ] && [ -f "$MNIST" ]; then
    DATA=$MNIST
    say "data: $MNIST"
else
    say "data: \$MNIST not set or not a file: synthetic random binary images of MNIST's shape (timing only)"
fi

# The Triton Adam tail (vaekit.adam_tail, StaticStep(adam_kernel=True), built without a
# GPU in the eleventh session; its bfloat16 weight copies and the short batch's own graph
# in the twelfth, with the fused posterior sample; the fused linear layers, their weight
# gradients on a stream of their own and the loss's gradients from its forward pass in the
# thirteenth): their tests natively (the captured step against a hand-written one, a
# captured block of steps, the short batch, the kernels, the streams), then the epoch with
# them, uncompiled: (c+) TF32 and bf16 with the weight copies, (c++) with the fused linear
# layers too in fp32, TF32 and bf16, beside the default static step (c) and the classic
# recipe in the same run. The compiled rows and fit come later (tail_fit).
step tail_tests 150 "$PY" -m pytest tests/test_adam_tail.py tests/test_io.py tests/test_fast.py::test_a_short_batch_takes_a_static_step_of_its_own tests/test_fast.py::test_static_step_matches_a_hand_written_step tests/test_kernels.py -k "not hopper" -q -o addopts="" -p no:cacheprovider -rfE
step tail_epoch 150 "$PY" benchmarks/epoch_bench.py --device cuda --epochs 3 --amp none --skip eager,static-unfused,static-block,pythae,floor,compiled,compiled-block,static-tail,compiled-tail,compiled-tail-tf32,compiled-tail-bf16,fit,fit-compile,fit-block,fit-compile-block,fit-tf32,fit-tail,fit-tail-bf16 --data "$DATA"
step loss_bench 120 "$PY" benchmarks/loss_bench.py --device cuda --sweep
step epoch_bench 120 "$PY" benchmarks/epoch_bench.py --device cuda --epochs 3 --amp "${EPOCH_AMP:-none}" --skip compiled,compiled-block,fit-compile,fit-compile-block,static-tail,static-tail-tf32,static-tail-bf16,compiled-tail,compiled-tail-tf32,compiled-tail-bf16,fit-tail,fit-tail-bf16,static-linear,static-linear-tf32,static-linear-bf16 --data "$DATA"
# The per-example loop and pythae run on the first 300 images (their time is also per
# image); the plain chunked baseline on all of them, like vaekit.
step iw_bench 90 "$PY" benchmarks/iw_bench.py --device cuda --k 5000 --n 10000 --n-baseline 300 --reduced tf32,bf16 --data "$DATA"
# Where one training step's GPU time goes: its kernels, their time, the graph's overhead.
step step_profile 150 "$PY" benchmarks/step_profile.py --device cuda
# The same tail compiled, and fit with it (TF32; bf16 with the weight copies), apart: their
# compilations take tens of seconds each, and epoch_bench prints nothing before every row
# has warmed up, so the uncompiled rows above come first, in a run of their own.
step tail_fit 200 "$PY" benchmarks/epoch_bench.py --device cuda --epochs 3 --amp none --skip classic,eager,static,static-unfused,static-block,pythae,floor,compiled,compiled-block,static-tail,static-tail-tf32,static-tail-bf16,compiled-tail,static-linear,static-linear-tf32,static-linear-bf16,fit,fit-compile,fit-block,fit-compile-block,fit-tf32 --data "$DATA"
# What fit's files cost an epoch: written in the loop, or by a thread of their own.
step write_bench 60 "$PY" benchmarks/write_bench.py --device cuda --epochs 3 --repeats 1 --data "$DATA"
# The GPU tests before the slower extras: the Triton kernels in-process, the captured,
# compiled and block steps for both optimisers, fit in blocks and resumed, data left on the
# host. The CPU compile tests (the CPU's fast path, run by CI) are left out: minutes here.
if [ -n "${STEPS:-}" ] && [[ ",$STEPS," != *",tests,"* ]]; then
    :
elif "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
    step tests 200 "$PY" -m pytest tests/test_kernels.py tests/test_adam_tail.py tests/test_losses.py tests/test_fast.py tests/test_batching.py tests/test_pixelcnn.py -q -o addopts="" -p no:cacheprovider -rfE --durations=10 -k "not compiled_fit_equals_eager_fit and not cpu-compiled"
else
    say "tests: skipped (pytest or hypothesis missing on this machine)"
    STATUS+=("tests        SKIPPED")
fi

# The host's time per step outside the captured graph (the 60 ms epoch leaves 128 us a step),
# with a checkpoint of the 784-400-20 model's size at each epoch's end (timed apart).
step host_bench 60 "$PY" benchmarks/host_bench.py --device cuda --hidden 800,400
# fast='compile' on CUDA: the compiled step, captured (row g), 32 a graph (g''), and fit
# with each, beside the uncompiled captured step (row c) in the same run; each compile
# takes tens of seconds (the later ones hit inductor's cache).
step epoch_compiled 200 "$PY" benchmarks/epoch_bench.py --device cuda --epochs 3 --amp none \
    --skip classic,eager,static-unfused,static-block,pythae,floor,fit,fit-block,static-tail,static-tail-tf32,static-tail-bf16,compiled-tail,compiled-tail-tf32,compiled-tail-bf16,fit-tail,fit-tail-bf16,static-linear,static-linear-tf32,static-linear-bf16 --data "$DATA"
# $RESCORE (a run directory inside the repo): how far TF32 and bf16 move its k = 5000 NLL
# on the first 1,000 test images (benchmarks/prepare_gpu.sh trains one: .gpudata/rescore).
if [ -n "${RESCORE:-}" ]; then
    # a run records its data folder as an absolute path of the machine it trained on: the
    # folder of $MNIST instead (the file must be named mnist.npz there, as the run expects)
    WHERE=()
    [ "$DATA" != synthetic ] && WHERE=(--data-dir "$(dirname "$DATA")")
    step precision_shift 150 "$PY" benchmarks/precision_shift.py "$RESCORE" --k 5000 --limit 1000 ${WHERE[@]+"${WHERE[@]}"}
fi
say ""
say "=== summary"
for line in "${STATUS[@]}"; do say "$line"; done
say ""
say "targets: loss fwd+bwd B=4096 D=12288 d=128 <= 0.25 ms (H200), >= 60% copy BW, >= 4x classic;"
say "         epoch at batch 128 <= 60 ms; k=5000 IW on 10,000 images <= 1 s (H200, 784-512-512-50)"
{
    grep -h -E "passed|failed|error" "$TMP/tail_tests.out" 2>/dev/null | tail -n 1 | sed 's/^/tail tests: /'
    grep -h -E "passed|failed|error" "$TMP/tests.out" 2>/dev/null | tail -n 1
    grep -h "^CHECK" "$TMP/loss_bench.out" "$TMP/iw_bench.out" 2>/dev/null
    grep -h -E "^device|^copy bandwidth" "$TMP/loss_bench.out" 2>/dev/null
    sed -n '/^recipe/,/^$/p' "$TMP/loss_bench.out" 2>/dev/null
    grep -h "^SUMMARY loss_bench" "$TMP/loss_bench.out" 2>/dev/null | sed 's/^SUMMARY //'
    grep -h -E "^SUMMARY|^agreement|^matrix products|^PRECISION" "$TMP/tail_epoch.out" "$TMP/tail_fit.out" "$TMP/epoch_bench.out" "$TMP/host_bench.out" "$TMP/iw_bench.out" \
        "$TMP/step_profile.out" "$TMP/write_bench.out" "$TMP/epoch_compiled.out" "$TMP/precision_shift.out" 2>/dev/null | sed 's/^SUMMARY //'
} | tee -a "$LOG"
