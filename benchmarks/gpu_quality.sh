#!/usr/bin/env bash
# Issue #4 on a lent GPU: train a preset on MNIST, then estimate the test NLL once with
# k = 5000 over all 10,000 test images. Installs nothing. Tune epochs on the validation
# split first (metrics.csv); evaluate the test set once per reported model.
#
#   MNIST_DIR=shared EPOCHS=300 PRESET=mnist-burda bash benchmarks/gpu_quality.sh
#
# MNIST_DIR: a folder inside the repo holding mnist.npz (copy it there before the call:
# the device machine sees only the repo). Output: the training log, the evaluation
# table and the wall times; with $OUT set, the run's metrics and pictures are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PRESET=${PRESET:-mnist-burda}
EPOCHS=${EPOCHS:-200}
FAST=${FAST:-auto}   # "off" falls back to the eager step if the captured one misbehaves
RUN=$(mktemp -d)/run
: "${MNIST_DIR:?set MNIST_DIR to a folder in the repo holding mnist.npz}"

nvidia-smi -L || true
t0=$SECONDS
"$PY" -m vaekit train --preset "$PRESET" --data-dir "$MNIST_DIR" --epochs "$EPOCHS" --fast "$FAST" --run-dir "$RUN" --no-progress
t1=$SECONDS
"$PY" -m vaekit evaluate "$RUN" --iw-samples 5000 --batch-size 1000
t2=$SECONDS
tail -n 2 "$RUN/metrics.csv"
echo "preset $PRESET, $EPOCHS epochs: training $((t1 - t0)) s (process start and data loading included), evaluation $((t2 - t1)) s"
if [ -n "${OUT:-}" ]; then
    cp "$RUN/metrics.csv" "$RUN/metrics-test.json" "$RUN/samples.png" "$RUN/curves.png" "$OUT/" || true
fi
