#!/usr/bin/env bash
# OpenMPI's remote-shell agent for the network-namespace "nodes" of forge_dist.testing.cluster:
# `mpirun --mca plm_rsh_agent <this> -H <addr of node 0>:2,<addr of node 1>:2 ...` starts its daemon
# on a remote host as `<agent> <host> <command>`, as it would with ssh; this runs the command inside
# the namespace that FORGE_NETNS_HOSTS ("addr=namespace,addr=namespace") maps the host to.
set -euo pipefail
host="$1"; shift
for pair in ${FORGE_NETNS_HOSTS//,/ }; do
  if [ "${pair%%=*}" = "$host" ]; then
    # its own UTS namespace and host name too: OpenMPI tells nodes apart by host name
    exec ip netns exec "${pair#*=}" unshare --uts /bin/sh -c "hostname ${pair#*=} && $*"
  fi
done
echo "netns_rsh.sh: host $host is not one of FORGE_NETNS_HOSTS=${FORGE_NETNS_HOSTS:-}" >&2
exit 255
