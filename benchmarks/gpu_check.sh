#!/usr/bin/env bash
# The one prepared GPU run (device machine: H200, torch 2.11, triton 3.6, no internet).
# Runs the CUDA-only tests and the kernel benchmarks; every result lands in $OUT (or benchmarks/results).
#   bash benchmarks/gpu_check.sh            # ~5 minutes
# Nothing is installed: the package is used from the working tree (PYTHONPATH), the machine's python3
# already has torch, triton, pytest, hypothesis, transformers, safetensors, tokenizers, pyyaml, tqdm.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PY:-python3}"
status=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu-info.txt"
"$PY" -m mplug_fast info 2>&1 | tee -a "$OUT/gpu-info.txt"

echo "== CUDA tests (pytest -m gpu)"
timeout 240 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests --junitxml="$OUT/gpu-tests.xml" 2>&1 \
    | tee "$OUT/gpu-tests.log" || status=1

echo "== attention kernels (bf16, then fp16)"
timeout 180 "$PY" benchmarks/attention_kernels.py --device cuda --dtype bfloat16 \
    --out "$OUT/gpu-attention-bf16.json" 2>&1 | tee "$OUT/gpu-attention.log" || status=1
timeout 120 "$PY" benchmarks/attention_kernels.py --device cuda --dtype float16 \
    --out "$OUT/gpu-attention-fp16.json" 2>&1 | tee -a "$OUT/gpu-attention.log" || status=1
exit $status
