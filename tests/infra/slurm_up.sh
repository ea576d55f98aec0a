#!/bin/bash
# Bring up a real single-node Slurm (slurmctld + slurmd + munge) for the test suite. Root only,
# no systemd: daemons are started directly. Idempotent: exits early if a node is already idle.
#   tests/infra/slurm_up.sh [STATE_DIR]     (default /tmp/fpo-ds-slurm)
set -euo pipefail
dir=${1:-/tmp/fpo-ds-slurm}
if sinfo -h -o %T 2>/dev/null | grep -qx idle && timeout 60 srun --ntasks=2 --cpus-per-task=1 true; then
  echo "slurm already up"; exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
mkdir -p "$dir"/{state,spool,log,run} /etc/slurm
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge /run/munge /var/lib/munge /var/log/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
host=$(hostname -s)
# The node line comes from slurmd's own hardware probe (not `nproc`, which obeys OMP_NUM_THREADS
# and would declare a 1-CPU node under the test environment); memory is capped at 80%.
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
node=$(slurmd -C | head -n 1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host/; s/RealMemory=[0-9]+/RealMemory=$mem/")
cat > /etc/slurm/slurm.conf <<CONF
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
pgrep -x slurmctld >/dev/null || slurmctld -i
pgrep -x slurmd >/dev/null || slurmd
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
