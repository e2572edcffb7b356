#!/usr/bin/env bash
# forge-train under OpenMPI: NP ranks (default 2), on the hosts of HOSTFILE if set.
# forge_dist maps OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK to its ranks; MASTER_ADDR defaults to this
# host (set it to the first host of a multi-host run).
set -euo pipefail
args=(-np "${NP:-2}" -x MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" -x MASTER_PORT="${MASTER_PORT:-29500}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
[ "${NP:-2}" -gt "$(nproc)" ] && [ -z "${HOSTFILE:-}" ] && args+=(--oversubscribe)
exec mpirun "${args[@]}" python -m forge_dist.train "$@"
