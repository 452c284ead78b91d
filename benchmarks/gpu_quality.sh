#!/usr/bin/env bash
# Issue #4 on a lent GPU: train a preset on MNIST, then estimate the test NLL once with
# k = 5000 over all 10,000 test images. Installs nothing. Tune epochs on the validation
# split first (metrics.csv); evaluate the test set once per reported model.
#
#   MNIST_DIR=shared EPOCHS=300 PRESET=mnist-burda bash benchmarks/gpu_quality.sh
#   MNIST_DIR=shared BUDGET_S=170 PRESET=mnist-pixelcnn bash benchmarks/gpu_quality.sh
#
# MNIST_DIR: a folder inside the repo holding mnist.npz (copy it there before the call:
# the device machine sees only the repo). EPOCHS: epochs to train. BUDGET_S instead: a
# training-time budget in seconds: a 3-epoch calibration run times an epoch (the later
# epochs: the first one captures the CUDA graph), and EPOCHS becomes the budget divided
# by that, so the cosine schedule ends when the budget does. Output: the training log,
# the evaluation table and the wall times; with $OUT set, the run's metrics and pictures
# are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PRESET=${PRESET:-mnist-burda}
FAST=${FAST:-auto}   # "off" falls back to the eager step if the captured one misbehaves
WORK=$(mktemp -d)
RUN=$WORK/run
: "${MNIST_DIR:?set MNIST_DIR to a folder in the repo holding mnist.npz}"

nvidia-smi -L || true
if [ -n "${BUDGET_S:-}" ]; then
    "$PY" -m vaekit train --preset "$PRESET" --data-dir "$MNIST_DIR" --epochs 3 --fast "$FAST" \
        --run-dir "$WORK/calibrate" --no-progress >/dev/null
    # metrics.csv: the seconds column is cumulative; epochs 2-3 give the steady epoch time.
    EPOCHS=$("$PY" - "$WORK/calibrate/metrics.csv" "$BUDGET_S" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["split"] == "train"]
per_epoch = (float(rows[-1]["seconds"]) - float(rows[0]["seconds"])) / (len(rows) - 1)
print(max(1, int(float(sys.argv[2]) / per_epoch)))
EOF
)
    echo "calibration: epochs 2-3 took $(tail -n 1 "$WORK/calibrate/metrics.csv" | cut -d, -f11) s cumulative; $BUDGET_S s -> $EPOCHS epochs"
fi
EPOCHS=${EPOCHS:-200}
t0=$SECONDS
"$PY" -m vaekit train --preset "$PRESET" --data-dir "$MNIST_DIR" --epochs "$EPOCHS" --fast "$FAST" --run-dir "$RUN" --no-progress
t1=$SECONDS
"$PY" -m vaekit evaluate "$RUN" --iw-samples 5000 --batch-size 1000
t2=$SECONDS
tail -n 2 "$RUN/metrics.csv"
echo "preset $PRESET, $EPOCHS epochs: training $((t1 - t0)) s (process start, data loading and the end-of-run pictures included; metrics.csv's seconds column is the training loop alone), evaluation $((t2 - t1)) s"
if [ -n "${OUT:-}" ]; then
    cp "$RUN/metrics.csv" "$RUN/metrics-test.json" "$RUN/samples.png" "$RUN/curves.png" "$OUT/" || true
fi
