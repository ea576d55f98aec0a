#!/bin/bash
# Train a recipe on Slurm: one srun task per GPU, each task runs `python -m fpo_ds.train`.
#   sbatch slurm/train.sh RECIPE [key=value ...]
#   sbatch --nodes 4 slurm/train.sh recipes/llama-3.1-8b.yaml model.name_or_path=/ckpt/sft cache.dir=/shared/cache
# Submit from the repository root (or set FPO_DS_ROOT). Ranks are discovered per task from
# SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS inside Python (fpo_ds/dist.py); nothing rank-specific
# is expanded in this batch shell.
# Before the time limit (or on preemption) every rank gets SIGUSR1/SIGTERM, finishes its step,
# checkpoints and exits 75; this script then requeues the job, which resumes (output.resume=auto).
# Log: runs/slurm/<job name>-<job id>.out (the directory is part of the repository: Slurm does not
# create it). On a Slurm without GPUs (e.g. the tests' one), override the request:
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/train.sh recipes/tiny.yaml ...
#SBATCH --job-name=fpo-ds-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -uo pipefail
exec "${FPO_DS_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/run_step.sh" fpo_ds.train "$@"
