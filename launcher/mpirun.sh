#!/usr/bin/env bash
# forge-train under OpenMPI: NP ranks (default 2), on HOSTS ("node1:8,node2:8") or HOSTFILE if set.
# Nothing needs exporting: every rank takes its rank from MPI, its local rank from MPI's
# shared-memory split, and rank 0's address and a free port by broadcast (mpi4py). Multi-node:
# set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface the nodes share; it is
# forwarded, as are MASTER_ADDR/MASTER_PORT when set (they then win over discovery).
set -euo pipefail
args=(-np "${NP:-2}" -x PATH)
for var in PYTHONPATH OMP_NUM_THREADS MASTER_ADDR MASTER_PORT GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  [ -n "${!var:-}" ] && args+=(-x "$var")
done
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${HOSTS:-}" ] && args+=(-H "$HOSTS")
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
[ "${NP:-2}" -gt "$(nproc)" ] && [ -z "${HOSTFILE:-}${HOSTS:-}" ] && args+=(--oversubscribe)
exec mpirun "${args[@]}" python -m forge_dist.train "$@"
