#!/bin/bash
# Run a command "on" test host N: its network namespace, its own hostname (nodeN) and an
# /etc/hosts that resolves both test hosts to their namespace addresses (not to loopback).
#   on_host.sh N CMD [ARGS ...]
set -euo pipefail
n=$1; shift
hosts=$(mktemp)
net=${FPO_TEST_SUBNET:-10.77.0}  # as tests/infra/netns_up.sh
printf '127.0.0.1 localhost\n%s.1 node1\n%s.2 node2\n' "$net" "$net" > "$hosts"
exec nsenter --net=/run/netns/"${FPO_TEST_NETNS:-fpo-node}$n" -- unshare --uts --mount --propagation private \
  bash -c 'hostname "node$0"; mount --bind "$1" /etc/hosts; mount -t tmpfs tmpfs /dev/shm; shift; exec "$@"' \
  "$n" "$hosts" "$@"
