#!/usr/bin/env bash
# Run HERE, on the project machine (package index reachable), before a GPU device call:
# it fills the two git-ignored folders that the call carries, because nothing can be
# fetched on the GPU machine and a fresh checkout has neither.
#
#   .gpudata/mnist.npz     MNIST for the epoch and likelihood benchmarks (from $MNIST_SRC)
#   .gpudata/rescore       a trained run for precision_shift.py ($RESCORE in gpu.sh):
#                          the mnist-pixelcnn-late preset (its PixelCNN head has the
#                          convolutions that TF32 would round), trained here for
#                          $RESCORE_EPOCHS epochs (default 3; 0: no run); about 9
#                          minutes in all on the project's 2 cores
#   .whl/                  pythae 0.1.2 and what it needs that the device image lacks,
#                          as CPython 3.12 manylinux wheels (pydantic with its matched
#                          pydantic_core, and their small dependencies)
#
#   bash benchmarks/prepare_gpu.sh                  # then the call in benchmarks/README.md
#   RESCORE_EPOCHS=0 bash benchmarks/prepare_gpu.sh # data and wheels only
#
# Both folders are added to .git/info/exclude; what is already there is kept (delete a
# folder to rebuild it). Everything must stay under the device call's 64 MiB carry limit:
# the script prints the folders' sizes last.
set -euo pipefail

cd "$(dirname "$0")/.."
MNIST_SRC=${MNIST_SRC:-../shared/data/mnist.npz}
RESCORE_EPOCHS=${RESCORE_EPOCHS:-3}
VAEKIT=${VAEKIT:-.venv/bin/vaekit}

for d in .whl .gpudata; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >>.git/info/exclude
done
mkdir -p .gpudata .whl

if [ ! -f .gpudata/mnist.npz ]; then
    [ -f "$MNIST_SRC" ] || { echo "prepare_gpu: MNIST_SRC=$MNIST_SRC is not a file" >&2; exit 2; }
    cp "$MNIST_SRC" .gpudata/mnist.npz
    chmod u+w .gpudata/mnist.npz
fi

# The device image's Python is CPython 3.12 on x86-64 Linux; pip picks the wheels for it.
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
if ! ls .whl/pythae-*.whl >/dev/null 2>&1; then
    # pydantic with its dependencies resolved (pydantic pins pydantic_core exactly) ...
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl pydantic
    # ... and pythae alone: its other requirements (torch, numpy, scipy, scikit-learn, tqdm,
    # imageio, cloudpickle) are in the image, and the `dataclasses` backport it names would
    # shadow the standard library.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl pythae==0.1.2
fi

# trained into a side folder, moved into place only when whole: a stopped or failed
# training leaves no half run for the next call (nor a later rerun) to take
if [ "$RESCORE_EPOCHS" -gt 0 ] && [ ! -d .gpudata/rescore ]; then
    [ -x "$VAEKIT" ] || { echo "prepare_gpu: $VAEKIT not found (run make test first, or set VAEKIT)" >&2; exit 2; }
    rm -rf .gpudata/rescore.partial
    "$VAEKIT" train --preset mnist-pixelcnn-late --data-dir .gpudata --epochs "$RESCORE_EPOCHS" \
        --no-progress --run-dir .gpudata/rescore.partial
    # precision_shift.py reads the model and config only: the optimiser's state stays here.
    rm -f .gpudata/rescore.partial/checkpoint.pt
    mv .gpudata/rescore.partial .gpudata/rescore
fi

ls -l .whl
du -sh .whl .gpudata
