"""Which launcher started this process, and its rank, world size and rendezvous address.

Launchers, in the order they are recognised (a torchrun inside a SLURM allocation sets RANK and
must win over SLURM_PROCID; mpirun inside an allocation likewise):

  torchrun            RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT,
                      TORCHELASTIC_RUN_ID
  deepspeed launcher  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, MASTER_ADDR/PORT
  other env://        RANK and WORLD_SIZE (and optionally LOCAL_RANK)
  mpirun (OpenMPI)    OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE; no master address: when
                      every rank is on one node it is 127.0.0.1, otherwise rank 0's host is
                      broadcast with mpi4py (never ``hostname -I``, which picks a random NIC)
  SLURM (srun)        SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master = first host of
                      SLURM_JOB_NODELIST (node[01-04,07] -> node01)
  none                a single process

Pure functions of an environment mapping, so every launcher is testable by setting variables.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # torchrun | deepspeed | env | mpirun | slurm | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def exports(self) -> dict:
        """The five variables torch's env:// rendezvous and DeepSpeed read (DeepSpeed falls back to
        MPI discovery, and its ``hostname -I`` address, when any is missing)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


class LaunchEnvError(ValueError):
    """The launcher's variables are inconsistent; the message names them."""


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchEnvError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM hostlist expression -> host names: "a,b[1-3,7],c[01-02]-ib" ->
    [a, b1, b2, b3, b7, c01-ib, c02-ib]. Zero padding is kept; several bracket groups multiply."""
    hosts: List[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    return hosts


def _split_top_level(s: str) -> List[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"unbalanced ']' in SLURM_JOB_NODELIST={s!r}")
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    if depth:
        raise LaunchEnvError(f"unbalanced '[' in SLURM_JOB_NODELIST={s!r}")
    items.append(s[start:])
    return [item for item in items if item]


def _expand_item(item: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchEnvError(f"cannot parse range {part!r} in SLURM node list item {item!r}")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_item(f"{prefix}{n:0{width}d}{suffix}"))
    return out


def first_slurm_host(nodelist: str) -> str:
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def _slurm_tasks_on_first_node(env: Mapping[str, str], default: int) -> int:
    """SLURM_TASKS_PER_NODE like "4(x2),3" -> 4 (tasks on the node of local ranks)."""
    spec = env.get("SLURM_TASKS_PER_NODE", "")
    m = re.match(r"(\d+)", spec)
    return int(m.group(1)) if m else default


def detect_launch_env(env: Optional[Mapping[str, str]] = None, mpi_comm=None) -> LaunchEnv:
    """The launch environment of this process (``env`` defaults to os.environ). ``mpi_comm``: an
    mpi4py communicator for master discovery under mpirun (default: COMM_WORLD when needed)."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", DEFAULT_PORT)
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
        found = LaunchEnv(launcher, _int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0), local_world,
                          env.get("MASTER_ADDR", "127.0.0.1"), port)
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
        addr = env.get("MASTER_ADDR")
        if addr is None:
            addr, port = ("127.0.0.1", port) if local_world == world else mpi_master(port, mpi_comm)
        found = LaunchEnv("mpirun", rank, world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", rank), local_world, addr, port)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "")
                                                          or env.get("SLURM_NODELIST", "127.0.0.1"))
        found = LaunchEnv("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0),
                          _slurm_tasks_on_first_node(env, world), addr, port)
    else:
        found = LaunchEnv("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port)
    _check(found)
    return found


def _check(e: LaunchEnv) -> None:
    if e.world_size < 1:
        raise LaunchEnvError(f"{e.launcher}: world size {e.world_size} must be at least 1")
    if not 0 <= e.rank < e.world_size:
        raise LaunchEnvError(f"{e.launcher}: rank {e.rank} outside world of {e.world_size}")
    if not 0 <= e.local_rank < max(e.local_world_size, 1):
        raise LaunchEnvError(f"{e.launcher}: local rank {e.local_rank} outside {e.local_world_size} local processes")


def mpi_master(port: int, comm=None):
    """(address, port) of rank 0, broadcast over MPI: rank 0 resolves its own host name."""
    if comm is None:
        from mpi4py import MPI  # imported only when discovery is needed: it initialises MPI

        comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:
        mine = (socket.gethostbyname(socket.getfqdn()), port)
    return tuple(comm.bcast(mine, root=0))
