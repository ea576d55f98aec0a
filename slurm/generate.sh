#!/bin/bash
# Answer benchmark questions with a model on Slurm: one srun task per GPU, data-parallel HF generate
# (`fpo-ds generate`; rank 0 writes each benchmark's answer file):
#   sbatch slurm/generate.sh [--from RUN_DIR [--export-dtype DTYPE]] MODEL_DIR --model-id ID --out DIR \
#       --format alpaca_eval --questions alpaca_eval.json [--format ... --questions ...] [generate flags]
# --from first exports RUN_DIR's latest checkpoint to MODEL_DIR (slurm/export.sh), once, in this batch
# shell. Without GPUs: sbatch --gpus-per-node=0 --ntasks-per-node=1 ... (see train.sh).
#SBATCH --job-name=fpo-ds-generate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=8:00:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
repo=${FPO_DS_ROOT:-${SLURM_SUBMIT_DIR:-.}}
from="" dtype=auto
while [ $# -gt 0 ]; do
  case $1 in
    --from) from=$2; shift 2 ;;
    --export-dtype) dtype=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: sbatch slurm/generate.sh [--from RUN_DIR] MODEL_DIR [fpo-ds generate flags]" >&2; exit 2; }
[ -z "$from" ] || bash "$repo/slurm/export.sh" "$from" "$1" "$dtype"
exec "$repo/slurm/run_step.sh" fpo_ds.generate "$@"
