#!/usr/bin/env bash
# The GPU record in one call: the benchmark, where the step time goes, the default job.
#
#   OUT=/tmp/gpu_out bash experiments/bench/gpu.sh [PEAK_FP32_TFLOPS]
#
# Run from the repository root on a machine with jax[cuda], a CUDA torch and smallfx's
# other dependencies (`pip install -e .`). Without network access, put wheels of what the
# machine lacks in .whl/ (git-ignored), e.g. `pip download --no-deps -d .whl ml-collections
# tensorboardX filelock`: they are installed into /tmp/site first.
# Writes gpu.json (tools/bench.py --json), bench.log, dispatch.log, main.log and the
# job's results.json to $OUT.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
PEAK=${1:-67}  # H100/H200 SXM: 67 TFLOP/s plain float32 (datasheet); TF32 tensor: 495
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv | tee "$OUT/bench.log"
python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)' \
  2>&1 | tee -a "$OUT/bench.log"

# GPU steps are milliseconds: 50 steps per round keeps each round well above timer noise.
timeout 270 python3 tools/bench.py --platform gpu --peak-tflops "$PEAK" \
  --cases resnet20,resnet56,cnn,seeds,augment --steps 50 --repeats 7 \
  --json "$OUT/gpu.json" 2>&1 | grep -v '^W[0-9]\{4\} ' | tee -a "$OUT/bench.log"

# Where the step's time goes (host dispatch or device work; batch 4x-16x larger).
timeout 150 python3 tools/bench_dispatch.py --models resnet20:128,resnet20:1024,cnn:32,cnn:512 \
  --scan 1,20 --steps 40 --rounds 5 2>&1 | grep -v '^W[0-9]\{4\} ' | tee "$OUT/dispatch.log"

rm -rf /tmp/gpu_run  # a fresh run, not a report of an earlier one
timeout 100 python3 -m smallfx.main --config=configs/cosine.py --workdir=/tmp/gpu_run \
  --config.progress=False 2>&1 | tail -n 25 | tee "$OUT/main.log"
cp /tmp/gpu_run/results.json "$OUT/results.json" 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/main.log"
