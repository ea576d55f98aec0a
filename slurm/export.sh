#!/bin/bash
# Export a run's latest complete checkpoint to a Hugging Face model directory (one process, no GPU needed;
# host memory for the fp32 weights: ~4 bytes per parameter, twice while the state dict is loaded):
#   sbatch slurm/export.sh RUN_DIR OUT_DIR [DTYPE]      (DTYPE: auto, float32, bfloat16, float16)
# Also run directly by slurm/generate.sh --from. A complete OUT_DIR is kept, so a rerun skips the export.
#SBATCH --job-name=fpo-ds-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=2:00:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: sbatch slurm/export.sh RUN_DIR OUT_DIR [DTYPE]" >&2; exit 2; }
run=$1 out=$2 dtype=${3:-auto}
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -f "$out/config.json" ]; then
  echo "export: $out already holds a model; kept"
  exit 0
fi
# checkpoints/latest names the newest complete checkpoint (written after every rank's files).
tag=$(cat "$run/checkpoints/latest")
"$PYTHON" -m fpo_ds.cli export "$run/checkpoints/$tag" "$out" --dtype "$dtype"
