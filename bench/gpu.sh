#!/bin/bash
# The benchmark on one GPU, models built from a config (random weights, no downloads); every method
# side by side, ratios to SimPO, MFU from the model's FLOPs.
#   bash bench/gpu.sh [OUT_DIR] [extra fpo-ds bench flags]             small Llama (h1024 x 16), 64 tokens
#   MODE=gemma-2-2b bash bench/gpu.sh [OUT_DIR] [extra flags]          Gemma-2-2B's architecture (2.6B params,
#       vocabulary 256k), 1024 tokens (prompt 512), a 16k-feature SAE on block 25 (d_in 2304), ZeRO-3 bf16
#       with activation checkpointing; SFT, SimPO, DPO (live reference) and FPO
# PEAK_TFLOPS: the GPU's dense bf16 peak (989 for H100/H200 SXM).
# A CPU dry run of the Gemma mode (shrunken, same code path):
#   MODE=gemma-2-2b DRY_RUN=1 bash bench/gpu.sh runs/bench-gemma-dry
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-gpu}; shift || true
if [ -z "${DRY_RUN:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
if [ "${MODE:-small}" = gemma-2-2b ]; then
  shrink=()
  if [ -n "${DRY_RUN:-}" ]; then  # CPU: 2 blocks of width 64, 2 ranks, fp32; same bench, same model family
    shrink=(--shrink-hidden 64 --shrink-layers 2 --nproc 2 --steps 3 --warmup 1 --micro 1 --d-sae 256 --pairs 64)
  else
    shrink=(--nproc 1 --steps 12 --warmup 4 --micro 2 --d-sae 16384 --pairs 512)
  fi
  python3 -m fpo_ds.tools.benchmarks.bench --out "$out" --shape google/gemma-2-2b --seq 1024 --checkpointing \
    --methods sft,simpo,dpo_live,fpo --repeats 1 --peak-tflops "${PEAK_TFLOPS:-989}" "${shrink[@]}" "$@"
else
  python3 -m fpo_ds.tools.benchmarks.bench --out "$out" --nproc 1 --hidden 1024 --layers 16 --d-sae 16384 --micro 128 \
    --steps 15 --warmup 5 --repeats 1 --peak-tflops "${PEAK_TFLOPS:-989}" "$@"
fi
