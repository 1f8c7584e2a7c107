#!/usr/bin/env bash
# The GPU checks and figures of BENCHMARKS.md in one run, under 8 minutes on one recent GPU:
#   1. the `gpu` tests (tests/test_gpu.py);
#   2. kl-f8 at 256 px, bf16, GAN on: our step's img/s against the reference loop, achieved TFLOP/s and MFU;
#   3. the largest batch our step fits at 256 and at 512 px;
#   4. the fp16 path (fp16 autocast with the loss scaler) against bf16;
#   5. tiled decoding at 1024 and 2048 px: time, peak memory and PSNR of each GroupNorm mode;
#   then a Markdown summary (also in OUT/summary.md). Every step has its own time limit; one that fails or runs
#   out of time is reported and the others still run.
#
# Usage, from the repository root, with torch (CUDA), diffusers, accelerate and lpips importable:
#   benchmarks/gpu.sh [OUT]                          # OUT defaults to bench-gpu
# The same steps at toy sizes on a CPU (what tests/test_bench.py runs to check the script):
#   DEVICE=cpu PRESET=tiny RES=32 BIG=64 BATCH=2 MAX_BATCH=4 TILED_SIZES=64 TILE=32 OVERLAP=8 STEPS=1 REPEATS=1 \
#     TIME_SCALE=20 benchmarks/gpu.sh OUT
set -uo pipefail

OUT=${1:-bench-gpu}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-kl-f8}
RES=${RES:-256}
BIG=${BIG:-512}
BATCH=${BATCH:-8}
MAX_BATCH=${MAX_BATCH:-1024}
TILED_SIZES=${TILED_SIZES:-1024,2048}
TILE=${TILE:-512}
OVERLAP=${OVERLAP:-64}
STEPS=${STEPS:-5}
REPEATS=${REPEATS:-3}
PYTHON=${PYTHON:-python}
TIME_SCALE=${TIME_SCALE:-1}  # multiplies every step's time limit (a slow machine, the CPU check)

cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
: > "$OUT/status.txt"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, diffusers, accelerate, lpips, torchvision" 2> "$OUT/imports.log"; then
    echo "error: $PYTHON cannot import the project's dependencies (see $OUT/imports.log): pip install -e '.[test]'"
    exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: torch sees no CUDA device (DEVICE=cpu runs the same steps on the CPU)"
    exit 2
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the exit status
    local name=$1 limit=$(($2 * TIME_SCALE)) start=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "$name: exit $code, $((SECONDS - start)) s" | tee -a "$OUT/status.txt"
}
bench() {  # bench NAME SECONDS ARGS...: kl-ae bench on DEVICE, its JSON in OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PYTHON" -m kl_ae.commands.cli bench --device "$DEVICE" --preset "$PRESET" \
        --steps "$STEPS" --repeats "$REPEATS" --json "$OUT/$name.json" "$@"
}

step tests 170 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py
bench train 80 --resolution "$RES" --batch-size "$BATCH" --precision bf16 --what train,peak
bench "maxbatch_$RES" 50 --resolution "$RES" --batch-size "$BATCH" --max-batch "$MAX_BATCH" --repeats 2 \
    --what maxbatch
bench "maxbatch_$BIG" 50 --resolution "$BIG" --batch-size 2 --max-batch "$MAX_BATCH" --repeats 2 --what maxbatch
bench fp16 40 --resolution "$RES" --batch-size "$BATCH" --what fp16
bench tiled 90 --what tiled --tiled-sizes "$TILED_SIZES" --tile "$TILE" --overlap "$OVERLAP"

echo "== summary"
"$PYTHON" -m kl_ae.bench.gpu "$OUT" | tee "$OUT/summary.md"
cat "$OUT/status.txt"
! grep -v "exit 0," "$OUT/status.txt" > /dev/null
