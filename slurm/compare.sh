#!/bin/bash
# The paper's comparison as one Slurm job graph (submit from any directory; jobs run from the repository):
#   slurm/compare.sh SIZE [--root DIR] [--sft [--sft-data SRC] | --sft-model DIR] [--methods dpo,tdpo1,tdpo2,simpo,fpo]
#       [--alpaca-eval FILE] [--arena-hard FILE] [--mt-bench FILE] [--world DIR] [key=value ...]
# SIZE: 2b, 9b (recipes/gemma-2-*.yaml) or tiny (the embedded world, CPU). Settings per size and method:
# slurm/compare.yaml. ROOT (default runs/compare-SIZE) gets the runs, the cache, the exported models,
# the answer files, Slurm logs (ROOT/logs), the job list (ROOT/jobs.tsv) and the table (ROOT/report.md).
#
#   [SFT train -> SFT export]                                    (--sft; else --sft-model or the recipe's model)
#        |-> cache build ------> FPO train -> export + generate -+
#        |-> DPO / TDPO-1 / TDPO-2 / SimPO train (live reference or none, in parallel)
#        |                             -> export + generate ----+
#        |-> SFT generate ----------------------------------------+-> report (after all, whatever their outcome)
#
# Every arrow is an afterok dependency, so independent jobs run side by side; a failed job cancels what
# waits on it (--kill-on-invalid-dep), and the report then shows "–" where that job's numbers would be.
# Resources: each job keeps its script's #SBATCH lines (8 GPUs per node for training and generation).
# SBATCH_EXTRA is added to every sbatch, SBATCH_GENERATE to the generate jobs after it, e.g. on a
# Slurm without GPUs:
#   SBATCH_EXTRA="--gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1" slurm/compare.sh tiny
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3 )}
export PYTHON  # the jobs' scripts run the same interpreter
[ $# -ge 1 ] || { sed -n '2,4p' "$0" >&2; exit 2; }
for arg in "$@"; do  # the usage here: the planner's help text must never reach the eval below
  case $arg in -h | --help) sed -n '2,20p' "$0"; exit 0 ;; esac
done
size=$1
shift
# Resolve every stage's recipe (and fail on a mistake) before anything is queued: the planner writes
# ROOT/compare.json and prints bash assignments (ROOT, METHODS, ARGS_<stage>, RUN_<stage>, CACHE_<stage>,
# HAS_SFT, HAS_CACHE, SFT_MODEL, EXPORT_DTYPE, GEN_<row>).
# Only the plan reaches stdout (the planner sends every log line, DeepSpeed's included, to stderr).
plan=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m fpo_ds.tools.comparison.jobs "$size" "$@")
eval "$plan"
cd "$repo"  # the jobs' working directory (SLURM_SUBMIT_DIR): recipes and scripts resolve from here
: > "$ROOT/jobs.tsv"

# submit NAME SCRIPT [sbatch flags --] ARGS...: sbatch with the common flags; records and returns the job id.
submit() {
  local name=$1 script=$2 flags=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do flags+=("$1"); shift; done
  shift
  local id rc=0
  # shellcheck disable=SC2086  # SBATCH_EXTRA / SBATCH_GENERATE are flag lists, split on purpose
  id=$(sbatch --parsable --kill-on-invalid-dep=yes --job-name="cmp-$name" --output="$ROOT/logs/%x-%j.out" \
    ${SBATCH_EXTRA:-} "${flags[@]}" "$script" "$@") || rc=$?
  id=${id%%;*}  # --parsable prints "id" or "id;cluster"
  if [ "$rc" -ne 0 ] || ! [[ $id =~ ^[0-9]+$ ]]; then  # stop at the first failure: no job waits on an empty id
    local queued
    queued=$(cut -f2 "$ROOT/jobs.tsv" | paste -sd' ')
    echo "slurm/compare.sh: sbatch of job '$name' failed (exit $rc${id:+, answered '$id'}); nothing more is" \
      "submitted. sbatch says why above; check that Slurm is reachable from here (\`sinfo\`) and SBATCH_EXTRA." \
      "${queued:+Already queued: $queued (\`scancel $queued\` to drop them).}" >&2
    exit 1
  fi
  printf '%s\t%s\t%s\n' "$name" "$id" "${flags[*]}" >> "$ROOT/jobs.tsv"
  echo "$id"
}
after() { [ -z "$1" ] || echo "--dependency=afterok:$1"; }  # a dependency flag, or nothing

# 1. Optional SFT, exported: it is the reference (and starting policy) of every method.
sft_ready=""
if [ "$HAS_SFT" = 1 ]; then
  sft_train=$(submit sft slurm/train.sh -- "${ARGS_sft[@]}")
  sft_ready=$(submit sft-export slurm/export.sh --dependency="afterok:$sft_train" -- \
    "$RUN_sft" "$SFT_MODEL" "$EXPORT_DTYPE")
else
  echo "SFT model (reference of every method): $SFT_MODEL" >&2
fi
# 2. The offline reference cache, for the methods that read it (FPO).
cache=""
if [ "$HAS_CACHE" = 1 ]; then
  cache=$(submit cache slurm/build_cache.sh $(after "$sft_ready") -- "${ARGS_cache[@]}")
fi
# 3. The methods, in parallel; each waits only for what it reads. 4. Each one's export + answers.
gen() {  # gen ROW AFTER: the row's generate job, when question files were given
  local -n g="GEN_$1"
  [ ${#g[@]} -gt 0 ] || return 0
  # shellcheck disable=SC2086,SC2046
  submit "$1-generate" slurm/generate.sh $(after "$2") ${SBATCH_GENERATE:-} -- "${g[@]}" > /dev/null
}
for m in "${METHODS[@]}"; do
  declare -n args="ARGS_$m" reads_cache="CACHE_$m"
  dep=$sft_ready
  [ "$reads_cache" = 1 ] && dep=$cache
  # shellcheck disable=SC2046
  job=$(submit "$m" slurm/train.sh $(after "$dep") -- "${args[@]}")
  gen "$m" "$job"
  unset -n args reads_cache
done
gen sft "$sft_ready"
# 5. The report, after every other job whatever its outcome (afterany): "–" marks what did not finish.
all=$(cut -f2 "$ROOT/jobs.tsv" | paste -sd:)
report=$(submit report slurm/compare_report.sh --dependency="afterany:$all" -- "$ROOT")
column -t -s $'\t' "$ROOT/jobs.tsv" >&2 || cat "$ROOT/jobs.tsv" >&2
echo "report job $report: $ROOT/report.md (rerun \`fpo-ds compare-report $ROOT\` when judge results arrive)" >&2
