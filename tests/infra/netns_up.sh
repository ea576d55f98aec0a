#!/bin/bash
# Two test "hosts" on one machine: network namespaces fpo-node1/fpo-node2 joined by one veth
# pair on a private test subnet (10.77.0.0/24) that routes nowhere else; pdsh for DeepSpeed's
# multi-node launcher (tests/infra/fake_ssh stands in for ssh). Idempotent. Root only.
# Namespaces it adds are recorded for tests/infra/down.sh (see record.sh); existing ones are reused.
# FPO_TEST_NETNS / FPO_TEST_SUBNET pick other names / another /24 (default fpo-node / 10.77.0), so that
# a second pair of hosts can run beside the first (tests/infra/on_host.sh reads the same variables).
set -euo pipefail
ns=${FPO_TEST_NETNS:-fpo-node}
net=${FPO_TEST_SUBNET:-10.77.0}
. "$(dirname "$0")/record.sh"
if ! command -v pdsh >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pdsh >/dev/null
fi
for i in 1 2; do
  if [ ! -e "/run/netns/$ns$i" ]; then
    ip netns add "$ns$i"
    record netns "$ns$i"
  fi
  ip -n "$ns$i" link set lo up
done
if ! ip -n "${ns}1" link show eth0 >/dev/null 2>&1; then
  ip link add "${ns}v1" netns "${ns}1" type veth peer name "${ns}v2" netns "${ns}2"
  for i in 1 2; do
    ip -n "$ns$i" link set "${ns}v$i" name eth0
    ip -n "$ns$i" addr add "$net.$i/24" dev eth0
    ip -n "$ns$i" link set eth0 up
  done
fi
ip -n "${ns}1" -4 addr show eth0 | grep -q "$net.1"
echo "${ns}1 $net.1 <-> ${ns}2 $net.2"
