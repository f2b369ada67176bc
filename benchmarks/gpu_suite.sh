#!/usr/bin/env bash
# Every GPU check of the project in one call of under 8 minutes, for a session lent a GPU machine
# (its image has python3 with CUDA torch, Triton, transformers and numba; see
# /work/.library/device/). Run from the repository root there, e.g. through the device tool:
#
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
#
# with .whl/ holding the wheels the image lacks (zstandard for python 3.12: see the device README).
# It runs, each under its own time limit so one slow part cannot starve the rest:
#   1. pytest -m gpu: the Triton kernels (paged decode, host<->device row copies) and the codecs'
#      GPU paths against their torch references;
#   2. the GPU-only benchmarks of the suites, through the runner (`python -m benchmarks gpu`, the
#      arguments are in benchmarks/suites.py): bench_kernels (paged decode attention and gathers at
#      32K..1M tokens, Llama-3-8B layer) and bench_decode (decode on a random Llama-3-8B-shape
#      model at 32K..1M tokens against DynamicCache and its offloading mode).
# Their JSON (the device named in each) lands in benchmarks/results and is copied to $OUT with
# the logs. Back on the development machine, put the JSON files in benchmarks/results/ and run
# `python -m benchmarks report`: RESULTS.md's GPU sections and plots render from them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
step gpu_tests 120 $PY -m pytest -q -m gpu -o addopts="" -p no:cacheprovider tests/test_kernels_attention.py tests/test_codecs.py
step bench_kernels 90 $PY -m benchmarks gpu --only bench_kernels
step bench_decode 240 $PY -m benchmarks gpu --only bench_decode
cp benchmarks/results/bench_kernels.json benchmarks/results/bench_decode.json "$OUT"/ 2>/dev/null
exit $status
