#!/bin/bash
# Undo what the tests/infra/*_up.sh scripts recorded in STATE_FILE (see record.sh), newest first:
# stop the daemons they started (after cancelling the jobs of a controller they started), delete
# the network namespaces they added (unless a process still runs in one) and the files they wrote.
# Nothing else is touched: daemons, namespaces and files that were already there stay.
#   tests/infra/down.sh STATE_FILE
set -uo pipefail
state=${1:?usage: tests/infra/down.sh STATE_FILE}
[ -s "$state" ] || exit 0

running() {  # PID exists and is not a zombie waiting for its parent
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${state:0:1}" != Z ]
}

stop_pid() {  # NAME PID: end PID if it is still that daemon (a pid can be reused)
  local name=$1 pid=$2
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
  if [ "$name" = slurmctld ]; then  # its jobs first, or their steps outlive the cluster
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null
    for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
  fi
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do running "$pid" || break; sleep 0.2; done
  running "$pid" && kill -9 "$pid" 2>/dev/null
  echo "stopped $name ($pid)"
}

tac "$state" | while read -r kind name arg; do
  case $kind in
    pid) stop_pid "$name" "$arg" ;;
    pidfile) stop_pid "$name" "$(cat "$arg" 2>/dev/null)" ;;
    netns)
      if [ -n "$(ip netns pids "$name" 2>/dev/null)" ]; then
        echo "kept network namespace $name: processes still run in it" >&2
      elif ip netns delete "$name" 2>/dev/null; then
        echo "deleted network namespace $name"
      fi ;;
    file) [ -e "$name" ] && rm -f "$name" && echo "removed $name" ;;
  esac
done
rm -f "$state"
