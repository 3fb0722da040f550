#!/usr/bin/env bash
# The GPU checks of the native path, as one script for a machine with CUDA (see the device tool):
# the CUDA tests, then the embedded pair's speed and torch.compile's on the GPU in bf16.
# Writes its logs under ${OUT:-/tmp/gpu_check}. PY: a python with torch (CUDA build) + outrider.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
$PY benchmarks/pair_speed.py --device cuda --dtype bfloat16 --ks 2,3,4,5 --repeats 2 2>&1 | tee "$OUT/pair_speed_cuda.txt"
$PY benchmarks/compile_speed.py --device cuda --dtype bfloat16 --iters 200 2>&1 | tee "$OUT/compile_speed_cuda.txt"
