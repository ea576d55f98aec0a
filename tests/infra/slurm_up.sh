#!/bin/bash
# Bring up a real single-node Slurm (slurmctld + slurmd + munge) for the test suite. Root only,
# no systemd: daemons are started directly. Idempotent: exits early if a node is already idle.
#   tests/infra/slurm_up.sh [STATE_DIR]     (default /tmp/fpo-ds-slurm)
# Changes to the machine: apt-installs slurm-wlm and munge if missing, writes /etc/munge/munge.key
# if missing and /etc/slurm/slurm.conf (first line: the marker below). A slurm.conf without that
# marker belongs to someone else: the script refuses to touch it (exit 3). The daemons and files
# it starts or creates are recorded for tests/infra/down.sh (see record.sh).
set -euo pipefail
. "$(dirname "$0")/record.sh"
dir=${1:-/tmp/fpo-ds-slurm}
conf=${SLURM_CONF:-/etc/slurm/slurm.conf}  # where the Slurm commands and daemons read it
marker="# Written by fpo-ds tests/infra/slurm_up.sh: a test cluster (tests/infra/down.sh stops it)."
# Earlier versions wrote no marker; their cluster name identifies them.
if [ -e "$conf" ] && ! head -n 1 "$conf" | grep -qxF "$marker" && ! grep -qx "ClusterName=fpods" "$conf"; then
  echo "refusing to touch $conf: tests/infra/slurm_up.sh did not write it (its first line is not" \
    "'$marker'). The Slurm tests run only on the test cluster this script sets up: move that file" \
    "away (and stop its daemons) to let the script write its own, or run the tests on another machine." >&2
  exit 3
fi
if sinfo -h -o %T 2>/dev/null | grep -qx idle && timeout 60 srun --ntasks=2 --cpus-per-task=1 true; then
  echo "slurm already up"; exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
mkdir -p "$dir"/{state,spool,log,run} "$(dirname "$conf")"
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  record file /etc/munge/munge.key
fi
chown -R munge:munge /etc/munge; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge /run/munge /var/lib/munge /var/log/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
  record pid munged "$(pgrep -nx munged)"
fi
host=$(hostname -s)
# The node line comes from slurmd's own hardware probe (not `nproc`, which obeys OMP_NUM_THREADS
# and would declare a 1-CPU node under the test environment); memory is capped at 80%.
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
node=$(slurmd -C | head -n 1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host/; s/RealMemory=[0-9]+/RealMemory=$mem/")
[ -e "$conf" ] || record file "$conf"
cat > "$conf" <<CONF
$marker
ClusterName=fpods
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
KillWait=10
MinJobAge=600
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
# Both daemonize and write their pid files; down.sh reads them (slurmctld also ends its slurmscriptd).
if ! pgrep -x slurmctld >/dev/null; then slurmctld -i; record pidfile slurmctld "$dir/run/slurmctld.pid"; fi
if ! pgrep -x slurmd >/dev/null; then slurmd; record pidfile slurmd "$dir/run/slurmd.pid"; fi
for _ in $(seq 60); do
  if sinfo -h -o %T | grep -qx idle; then
    # Prove it schedules a 2-task job before handing it to the tests.
    if timeout 60 srun --ntasks=2 --cpus-per-task=1 true; then sinfo; exit 0; fi
    break
  fi
  sleep 1
done
echo "slurm did not come up; logs in $dir/log" >&2
scontrol show node >&2 || true
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
