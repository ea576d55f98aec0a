#!/bin/bash
# The GPU check: what no CPU test reaches, on one GPU, in under 9 minutes, into one results directory.
#   bash bench/gpu_check.sh [OUT]             on a GPU node (default OUT: runs/gpu-check)
#   bash bench/gpu_check.sh --dry-run [OUT]   every stage at toy size on the CPU (default OUT: runs/gpu-check-dry)
# Stages, each under its own time limit (a hang costs that stage, not the run):
#   unit       pytest -m gpu tests/test_gpu.py: sharded encoder == sae-lens encode on CUDA for every
#              architecture (TopK with decoder-norm rescaling too); chunked response log-probs == the
#              full-logits path at vocabulary 256000 in fp32, bf16 and bf16 autocast; HF generate on
#              CUDA == CPU greedy text; a 1-GPU NCCL group runs the encoder's collectives
#   world      Gemma-2-2B's shape with random weights (bf16), 1024-token pairs, a 16k SAE on block 25,
#              FPO's offline cache
#   profile    FPO vs SimPO at that shape (ZeRO-3 bf16, checkpointing, micro 2: the committed H200
#              run's setting): 3 timed steps, then 3 under torch.profiler each
#   sweep      MFU at the 2B shape: micro 1/2/4/8, auto (stage 0 on one GPU) vs ZeRO-3,
#              checkpointing on/off (bench/gpu_steps.py POINTS; out-of-memory points are recorded)
#   calibrate  the planner's step time and memory against every measured point, and
#              `fpo-ds plan recipes/gemma-2-2b.yaml --calibrate` with the measured FPO MFU
# Then summary.md and results.json. Nothing saves a checkpoint; the 2.6B model (5 GB, bf16) is
# written under OUT/world and deleted at the end (KEEP_WORLD=1 keeps it).
# Env: PYTHON (default python3), PEAK_TFLOPS (989: H100/H200 SXM dense bf16), stage limits
# UNIT_S WORLD_S PROFILE_S SWEEP_S CALIBRATE_S (seconds). Exit status 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=""
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out=${out:-runs/gpu-check${dry:+-dry}}
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "gpu_check: $out is not empty; pass another results directory or remove it" >&2
  exit 2
fi
mkdir -p "$out/status" "$out/logs" "$out/unit"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
if [ -n "$dry" ]; then
  export DS_ACCELERATOR=cpu FPO_DS_GPU_TESTS_ON=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  limits=(${UNIT_S:-300} ${WORLD_S:-300} ${PROFILE_S:-300} ${SWEEP_S:-300} ${CALIBRATE_S:-300})  # catch hangs only
  dry_flag=(--dry-run)
else
  if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $py sees no CUDA device (torch.cuda.is_available() is False); on a CPU machine use --dry-run" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export DS_ACCELERATOR=cuda
  # 75 + 100 + 150 + 140 + 40 s = 505 s of limits, plus env and summary: under 9 minutes in the worst case.
  limits=(${UNIT_S:-75} ${WORLD_S:-100} ${PROFILE_S:-150} ${SWEEP_S:-140} ${CALIBRATE_S:-40})
  dry_flag=()
fi
world="$out/world"
t_start=$(date +%s)

stage() {  # stage NAME LIMIT_S CMD...: run under a time limit, log to logs/NAME.log, record status/NAME.json
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s%N)
  echo "[gpu_check] $name (limit ${limit} s)..."
  timeout --kill-after=15 "$limit" "$@" >"$out/logs/$name.log" 2>&1
  rc=$?
  local ms secs timed_out=false
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then timed_out=true; fi
  printf '{"stage": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "timed_out": %s}\n' \
    "$name" "$rc" "$secs" "$limit" "$timed_out" >"$out/status/$name.json"
  echo "[gpu_check] $name: exit $rc in ${secs%.*} s$([ $timed_out = true ] && echo ' (TIMED OUT)')"
  [ $rc -eq 0 ] || tail -n 15 "$out/logs/$name.log"
}

"$py" bench/gpu_report.py env "$out" >/dev/null
stage unit "${limits[0]}" "$py" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rfEs \
  --junitxml "$out/unit/junit.xml"
stage world "${limits[1]}" "$py" bench/gpu_steps.py world --world "$world" --out "$out" "${dry_flag[@]}"
stage profile "${limits[2]}" "$py" bench/gpu_steps.py profile --world "$world" --out "$out/profile" "${dry_flag[@]}"
stage sweep "${limits[3]}" "$py" bench/gpu_steps.py sweep --world "$world" --out "$out/sweep" \
  --budget-s $(( ${limits[3]} - 35 )) "${dry_flag[@]}"
stage calibrate "${limits[4]}" "$py" bench/gpu_report.py calibrate "$out" --world "$world"
check=()
[ -n "$dry" ] && check=(--check-layout)
"$py" bench/gpu_report.py summary "$out" "${check[@]}"
rc=$?
[ -n "${KEEP_WORLD:-}" ] || rm -rf "$world"
echo "[gpu_check] done in $(( $(date +%s) - t_start )) s: $out/summary.md, $out/results.json"
failed=$(grep -L '"rc": 0,' "$out"/status/*.json | wc -l)
[ "$failed" -eq 0 ] || rc=1
exit $rc
