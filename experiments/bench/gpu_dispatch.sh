#!/usr/bin/env bash
# Steps per dispatch on a GPU, whole runs: 1 step per call against the default (25).
#
#   OUT=/tmp/gpu_out bash experiments/bench/gpu_dispatch.sh
#
# Same machine setup as gpu.sh (wheels of missing packages in .whl/). For ResNet-20 and
# SmallCNN on the embedded digits (938 steps each), runs with --config.steps_per_dispatch=1
# and with the default, alternating, twice each, without the compilation cache (each run
# compiles its own programs). CACHE=1: with smallfx's compilation cache, each
# configuration run once first to fill it, then timed once (a study's later runs).
# Writes dispatch_runs.log (CACHE=1: dispatch_runs_cached.log) to $OUT.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=
LOG="$OUT/dispatch_runs.log"
ROUNDS="1 2"
if [ "${CACHE:-0}" = 1 ]; then
  export JAX_COMPILATION_CACHE_DIR=/tmp/gpu_dispatch_cache
  LOG="$OUT/dispatch_runs_cached.log"
  ROUNDS="fill timed"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$LOG"
for round in $ROUNDS; do
  for model in resnet20 cnn; do
    for n in 1 0; do
      rm -rf /tmp/gpu_dispatch_run
      start=$(date +%s.%N)
      line=$(timeout 100 python3 -m smallfx.main --config=configs/cosine.py \
        --workdir=/tmp/gpu_dispatch_run --config.model=$model --config.steps_per_dispatch=$n \
        --config.progress=False --config.baseline=none 2>&1 | tail -n 1)
      echo "round $round $model steps_per_dispatch=$n: $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s process | $line" \
        | tee -a "$LOG"
    done
  done
done
