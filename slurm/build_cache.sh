#!/bin/bash
# Build the offline reference cache with the same layout and launcher as training:
#   sbatch slurm/build_cache.sh RECIPE [key=value ...]   (same --nodes as the training job)
# Log: runs/slurm/<job name>-<job id>.out. Without GPUs: sbatch --gpus-per-node=0 (see train.sh).
#SBATCH --job-name=fpo-ds-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -uo pipefail
exec "${FPO_DS_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/run_step.sh" fpo_ds.cache_build "$@"
