#!/usr/bin/env bash
# The one prepared GPU run (device machine: H100/H200, torch, triton 3.6, no internet). Under 8 minutes:
# the step timeouts sum to 465 s. Every result lands in $OUT (default .benchmarks/gpu, untracked).
#   bash benchmarks/gpu_check.sh
# Nothing is installed: the package is used from the working tree (PYTHONPATH), the machine's python3
# already has torch, triton, pytest, hypothesis, transformers, safetensors, tokenizers, pyyaml, tqdm.
# Steps:
#   1. CUDA tests (pytest -m gpu): Triton main + split-K kernels in fp32 (TF32) / fp16 / bf16, fp32 IEEE
#      refused, fused LayerNorm / activation, external backends        -> gpu-tests.xml, gpu-tests.log
#   2. benchmarks/triton_gpu_check.py: every kernel vs its reference in fp16/bf16/fp32 (with dropout, mask,
#      causal, kv_index, split-K), fwd and fwd+bwd TFLOP/s vs SDPA flash / efficient at mPLUG's shapes,
#      table tiles vs triton.autotune, real registers/spills/shared memory  -> gpu-triton.json
#   3. benchmarks/attention_kernels.py: every dispatcher backend at the model's cases -> gpu-attention-*.json
#   4. benchmarks/fusion_speed.py: skip-connected vs all-connected vs co-attention -> gpu-fusion.json
#   5. the native ops (kernels/): built here with the machine's CMake, ninja and nvcc for its own GPU
#      (setup.py build_ext --inplace; nothing built elsewhere is carried), their CUDA tests against the
#      Python twins and beam search under CUDA graphs against eager, then caption / VQA generation
#      (base preset, fp32, batch 1 and 8): Python step vs native step vs native step under CUDA graphs
#      (`beam_search(cuda_graph=True)`) -> gpu-native-build.log, gpu-native-tests.log, gpu-generation.json.
# Steps 1-4 take up to 465 s and step 5 up to 360 s: run steps 1-4 or step 5 alone with STEPS="1 2 3 4" or STEPS=5.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# tests/conftest.py does setdefault("TRITON_INTERPRET", "1") only without CUDA; an explicit 0 keeps the
# kernels compiled here whatever happens.
export TRITON_INTERPRET=0
OUT="${OUT:-.benchmarks/gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
status=0
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu-info.txt"
"$PY" -m mplug_fast info 2>&1 | tee -a "$OUT/gpu-info.txt"

STEPS="${STEPS:-1 2 3 4 5}"
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step 1; then
echo "== 1. CUDA tests (pytest -m gpu)"
timeout 150 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests --ignore=tests/native --junitxml="$OUT/gpu-tests.xml" 2>&1 \
    | tee "$OUT/gpu-tests.log" || status=1

fi

if step 2; then
echo "== 2. Triton kernels: correctness (fp16/bf16/fp32), TFLOP/s vs SDPA flash/efficient, autotune, resources"
timeout 200 "$PY" benchmarks/triton_gpu_check.py --out "$OUT/gpu-triton.json" 2>&1 \
    | tee "$OUT/gpu-triton.log" || status=1

fi

if step 3; then
echo "== 3. attention backends (bf16; batch 1 for the split-K regime)"
timeout 50 "$PY" benchmarks/attention_kernels.py --device cuda --dtype bfloat16 \
    --out "$OUT/gpu-attention-bf16.json" 2>&1 | tee "$OUT/gpu-attention.log" || status=1
timeout 25 "$PY" benchmarks/attention_kernels.py --device cuda --dtype bfloat16 --batch 1 \
    --out "$OUT/gpu-attention-bf16-batch1.json" 2>&1 | tee -a "$OUT/gpu-attention.log" || status=1

fi

if step 4; then
echo "== 4. fusion speed: skip-connected vs all-connected vs co-attention (bf16, batch 32)"
timeout 40 "$PY" benchmarks/fusion_speed.py --device cuda --dtype bfloat16 \
    --out "$OUT/gpu-fusion.json" 2>&1 | tee "$OUT/gpu-fusion.log" || status=1
fi

if step 5; then
echo "== 5. native ops: build for this GPU, CUDA op tests, generation Python step vs native step vs CUDA graphs"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
( time MPLUG_FAST_CUDA_ARCHS="$arch" MPLUG_FAST_NVCC_FLAGS="-Xptxas=-v" timeout 180 "$PY" setup.py build_ext --inplace ) \
    > "$OUT/gpu-native-build.log" 2>&1 || status=1
tail -3 "$OUT/gpu-native-build.log"
grep -E "ptxas info|bytes stack frame" "$OUT/gpu-native-build.log" > "$OUT/gpu-native-ptxas.txt"
"$PY" -m mplug_fast info 2>&1 | tail -3
timeout 60 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests/native 2>&1 | tee "$OUT/gpu-native-tests.log" \
    || status=1
timeout 120 "$PY" benchmarks/generation_speed.py --device cuda --native-only --repeats 5 \
    --out "$OUT/gpu-generation.json" 2>&1 | tee "$OUT/gpu-generation.log" || status=1
fi
echo "== done in $(( $(date +%s) - start )) s, status $status"
exit $status
