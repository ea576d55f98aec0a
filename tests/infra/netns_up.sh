#!/bin/bash
# Two test "hosts" on one machine: network namespaces fpo-node1/fpo-node2 joined by one veth
# pair on a private test subnet (10.77.0.0/24) that routes nowhere else; pdsh for DeepSpeed's
# multi-node launcher (tests/infra/fake_ssh stands in for ssh). Idempotent. Root only.
# Namespaces it adds are recorded for tests/infra/down.sh (see record.sh); existing ones are reused.
set -euo pipefail
. "$(dirname "$0")/record.sh"
if ! command -v pdsh >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pdsh >/dev/null
fi
for i in 1 2; do
  if [ ! -e "/run/netns/fpo-node$i" ]; then
    ip netns add "fpo-node$i"
    record netns "fpo-node$i"
  fi
  ip -n "fpo-node$i" link set lo up
done
if ! ip -n fpo-node1 link show eth0 >/dev/null 2>&1; then
  ip link add fpo-veth1 netns fpo-node1 type veth peer name fpo-veth2 netns fpo-node2
  ip -n fpo-node1 link set fpo-veth1 name eth0
  ip -n fpo-node2 link set fpo-veth2 name eth0
  ip -n fpo-node1 addr add 10.77.0.1/24 dev eth0
  ip -n fpo-node2 addr add 10.77.0.2/24 dev eth0
  ip -n fpo-node1 link set eth0 up
  ip -n fpo-node2 link set eth0 up
fi
ip -n fpo-node1 -4 addr show eth0 | grep -q 10.77.0.1
echo "fpo-node1 10.77.0.1 <-> fpo-node2 10.77.0.2"
