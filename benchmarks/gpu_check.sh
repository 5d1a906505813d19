#!/usr/bin/env bash
# The one prepared GPU run (device machine: H200, torch 2.11, triton 3.6, no internet).
# Runs the CUDA-only tests and the kernel benchmarks; every result lands in $OUT (or benchmarks/results).
#   bash benchmarks/gpu_check.sh            # ~10 minutes at most (timeouts sum to 590 s)
# Nothing is installed: the package is used from the working tree (PYTHONPATH), the machine's python3
# already has torch, triton, pytest, hypothesis, transformers, safetensors, tokenizers, pyyaml, tqdm.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# tests/conftest.py does setdefault("TRITON_INTERPRET", "1"): an explicit 0 keeps the kernels compiled here.
export TRITON_INTERPRET=0
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PY:-python3}"
status=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu-info.txt"
"$PY" -m mplug_fast info 2>&1 | tee -a "$OUT/gpu-info.txt"

echo "== CUDA tests (pytest -m gpu): Triton main + split-K kernels (fp32/fp16/bf16), flash_attn, xformers, ..."
timeout 240 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests --junitxml="$OUT/gpu-tests.xml" 2>&1 \
    | tee "$OUT/gpu-tests.log" || status=1

echo "== attention kernels (bf16, then fp16)"
# every available backend, plus the triton-main / triton-splitk variants on the short-query cases
timeout 120 "$PY" benchmarks/attention_kernels.py --device cuda --dtype bfloat16 \
    --out "$OUT/gpu-attention-bf16.json" 2>&1 | tee "$OUT/gpu-attention.log" || status=1
timeout 60 "$PY" benchmarks/attention_kernels.py --device cuda --dtype float16 \
    --out "$OUT/gpu-attention-fp16.json" 2>&1 | tee -a "$OUT/gpu-attention.log" || status=1
echo "== batch 1 (decoding one image with 5 beams, co-attention of one pair): where split-K should pay"
timeout 50 "$PY" benchmarks/attention_kernels.py --device cuda --dtype bfloat16 --batch 1 \
    --out "$OUT/gpu-attention-bf16-batch1.json" 2>&1 | tee -a "$OUT/gpu-attention.log" || status=1
echo "== fusion speed: skip-connected vs all-connected vs co-attention (bf16, batch 32)"
timeout 120 "$PY" benchmarks/fusion_speed.py --device cuda --dtype bfloat16 \
    --out "$OUT/gpu-fusion.json" 2>&1 | tee "$OUT/gpu-fusion.log" || status=1
exit $status
