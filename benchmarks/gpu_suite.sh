#!/usr/bin/env bash
# Every GPU check of the project in one call of under 8 minutes, for a session lent a GPU machine
# (its image has python3 with CUDA torch, Triton, transformers and numba; see
# /work/.library/device/). Run from the repository root there, e.g. through the device tool:
#
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
#
# with .whl/ holding the wheels the image lacks (zstandard for python 3.12: see the device README).
# It runs, each under its own time limit so one slow part cannot starve the rest:
#   1. pytest -m gpu: the Triton kernels (paged decode, host<->device row copies) against their
#      torch references;
#   2. bench_kernels.py: paged decode attention and gathers at 32K..1M tokens, Llama-3-8B layer;
#   3. bench_decode.py: decode on a random Llama-3-8B-shape model at 32K, 128K, 512K and 1M
#      tokens against DynamicCache and its offloading mode, the device holding 25% of the KV.
# Results land in $OUT (or benchmarks/results), named for the device; paste the tables into
# benchmarks/RESULTS.md with the device named.
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
cd benchmarks
step bench_kernels 90 $PY bench_kernels.py --repeats 10
step bench_decode 240 $PY bench_decode.py --shape llama3-8b --contexts 32768,131072,524288,1048576 --steps 4 \
  --kinds dynamic,offloaded,tiercache-5%,tiercache-10%
cd ..
cp benchmarks/results/bench_kernels.json benchmarks/results/bench_decode.json "$OUT"/ 2>/dev/null
exit $status
