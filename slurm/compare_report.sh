#!/bin/bash
# The comparison's report table (fpo-ds compare-report): one process, seconds, no GPU.
#   sbatch slurm/compare_report.sh ROOT       (slurm/compare.sh submits it after every other job)
# Rerun it by hand whenever judge results arrive in ROOT/judge/: fpo-ds compare-report ROOT
#SBATCH --job-name=fpo-ds-report
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=0:30:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: sbatch slurm/compare_report.sh ROOT" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -m fpo_ds.cli compare-report "$1"
