#!/bin/bash
# The benchmark on one GPU: a small real-architecture (Llama) model built from a config, no
# downloads; every method side by side, ratios to SimPO, MFU from the model's FLOPs.
#   bash bench/gpu.sh [OUT_DIR] [extra fpo-ds bench flags]
# PEAK_TFLOPS: the GPU's dense bf16 peak (989 for H100/H200 SXM).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-gpu}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m fpo_ds.tools.bench --out "$out" --nproc 1 --hidden 1024 --layers 16 --d-sae 16384 --micro 128 \
  --steps 15 --warmup 5 --repeats 1 --peak-tflops "${PEAK_TFLOPS:-989}" "$@"
