#!/bin/bash
# Shared body of the sbatch scripts: environment defaults, one srun step, requeue on exit 75.
#   run_step.sh MODULE RECIPE [key=value ...]
set -uo pipefail
module=$1; shift
[ $# -ge 1 ] || { echo "usage: sbatch slurm/train.sh RECIPE [key=value ...]" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# NCCL: fail a collective with an error instead of hanging when a peer dies (torch >= 2.2 name;
# the older one is kept for older torch), and show why a communicator failed.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One CPU thread pool per task, sized to the task's CPUs (not the whole node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# JIT-built DeepSpeed ops (CPU Adam for offload configs; the CPU comm op on CPU-only nodes) are
# built once per installation, in <repo>/.torch_extensions (fpo_ds/dist.py), not once per job. They
# are compiled with -march=native: on nodes of different CPU types, export TORCH_EXTENSIONS_DIR to
# a node-local directory before sbatch.
export PYTHONUNBUFFERED=1

echo "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on $(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | tr '\n' ' ')"
# --kill-on-bad-exit: one rank that dies (exit != 0, or killed) ends every task of the step at
# once, so the job fails within seconds rather than waiting for a collective timeout.
srun --kill-on-bad-exit=1 "$PYTHON" -m "$module" "$@"
rc=$?
if [ "$rc" -eq 75 ]; then
  echo "checkpointed after a stop signal: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$rc"
