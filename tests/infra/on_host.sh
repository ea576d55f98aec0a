#!/bin/bash
# Run a command "on" test host N: its network namespace, its own hostname (nodeN) and an
# /etc/hosts that resolves both test hosts to their namespace addresses (not to loopback).
#   on_host.sh N CMD [ARGS ...]
set -euo pipefail
n=$1; shift
hosts=$(mktemp)
printf '127.0.0.1 localhost\n10.77.0.1 node1\n10.77.0.2 node2\n' > "$hosts"
exec nsenter --net=/run/netns/fpo-node"$n" -- unshare --uts --mount --propagation private \
  bash -c 'hostname "node$0"; mount --bind "$1" /etc/hosts; mount -t tmpfs tmpfs /dev/shm; shift; exec "$@"' \
  "$n" "$hosts" "$@"
