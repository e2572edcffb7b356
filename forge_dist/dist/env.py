"""Which launcher started this process, and its rank, world size and rendezvous address.

Launchers, in the order they are recognised (a torchrun inside a SLURM allocation sets RANK and
must win over SLURM_PROCID; mpirun inside an allocation likewise):

  torchrun            RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT,
                      TORCHELASTIC_RUN_ID
  deepspeed launcher  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, MASTER_ADDR/PORT
  other env://        RANK and WORLD_SIZE (and optionally LOCAL_RANK)
  mpirun (OpenMPI)    OMPI_COMM_WORLD_RANK/SIZE; in a real mpirun rank, mpi4py's view: rank and
                      size of COMM_WORLD, local rank and size from its shared-memory split
                      (MPI_COMM_TYPE_SHARED), and, unless MASTER_ADDR is given, rank 0's address
                      and a port it found free, broadcast to all (DeepSpeed's MPI discovery, but
                      never ``hostname -I``, which picks a random NIC): 127.0.0.1 when every rank
                      shares a node, else the IPv4 address of GLOO_SOCKET_IFNAME (or
                      NCCL_SOCKET_IFNAME) on rank 0, else its host name's address
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
        found = _mpirun_env(env, port, mpi_comm)
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


def _mpirun_env(env: Mapping[str, str], port: int, comm) -> LaunchEnv:
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local_rank, local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", rank), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
    addr = env.get("MASTER_ADDR")
    if comm is None and env is os.environ and ("PMIX_RANK" in env or "OMPI_MCA_orte_hnp_uri" in env):
        comm = _comm_world()  # a rank mpirun started (its runtime's variables are set), not a test's mapping
    if comm is not None and hasattr(comm, "Split_type"):  # mpi4py: MPI's own view of the ranks
        if comm.Get_size() != world:
            raise LaunchEnvError(f"OMPI_COMM_WORLD_SIZE={world} but MPI's COMM_WORLD has {comm.Get_size()} "
                                 f"ranks: mpi4py is built for another MPI than the mpirun that started this")
        rank, world, local_rank, local_world = mpi_ranks(comm)
    if addr is None:
        if comm is None:
            if local_world != world:
                raise LaunchEnvError(f"mpirun over several nodes ({local_world} of {world} ranks on this one) "
                                     f"needs mpi4py to find rank 0's address, or MASTER_ADDR exported "
                                     f"(mpirun -x MASTER_ADDR=<rank 0's host>)")
            addr = "127.0.0.1"
        else:
            addr, port = mpi_master(port if "MASTER_PORT" in env else None, comm, one_node=local_world == world,
                                    env=env)
            if env is os.environ:  # as DeepSpeed's discovery does: later look-ups agree without MPI
                os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    return LaunchEnv("mpirun", rank, world, local_rank, local_world, addr, port)


def _comm_world():
    try:
        from mpi4py import MPI  # imported only under mpirun: it initialises MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def mpi_ranks(comm):
    """(rank, world, local rank, local world) of this process: COMM_WORLD and its shared-memory
    split (the ranks on this node), as DeepSpeed's mpi_discovery computes them."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def interface_address(name: str) -> Optional[str]:
    """The IPv4 address of network interface ``name`` (Linux SIOCGIFADDR), None if it has none."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _socket_ifname(env: Mapping[str, str]) -> Optional[str]:
    """The first interface named by GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME ("eth0,eth1" -> eth0;
    exclusions like "^docker" name none)."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        names = [n for n in env.get(var, "").split(",") if n and not n.startswith(("^", "="))]
        if names:
            return names[0]
    return None


def master_address(env: Mapping[str, str], one_node: bool) -> str:
    """This host's address for the other ranks to reach: loopback when they are all on this node,
    else the socket interface's address, else the host name's (refused if that is loopback)."""
    if one_node:
        return "127.0.0.1"
    ifname = _socket_ifname(env)
    if ifname is not None:
        addr = interface_address(ifname)
        if addr is None:
            raise LaunchEnvError(f"GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME names {ifname!r}, which has no IPv4 "
                                 f"address on rank 0's host {socket.gethostname()}")
        return addr
    addr = socket.gethostbyname(socket.getfqdn())
    if addr.startswith("127."):
        raise LaunchEnvError(f"rank 0's host name {socket.getfqdn()!r} resolves to {addr}, which other nodes "
                             f"cannot reach: set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the "
                             f"interface the nodes share, or export MASTER_ADDR")
    return addr


def free_port(addr: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def mpi_master(port: Optional[int], comm=None, one_node: bool = False, env: Optional[Mapping[str, str]] = None):
    """(address, port) of rank 0, broadcast over MPI: rank 0 finds its address (master_address)
    and, when ``port`` is None, a free port on it."""
    if comm is None:
        from mpi4py import MPI  # imported only when discovery is needed: it initialises MPI

        comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:
        try:
            addr = master_address(os.environ if env is None else env, one_node)
            mine = (addr, port if port is not None else free_port(addr))
        except LaunchEnvError as e:
            mine = e  # every rank raises it, instead of waiting for rank 0 forever
    theirs = comm.bcast(mine, root=0)
    if isinstance(theirs, Exception):
        raise LaunchEnvError(str(theirs))
    return tuple(theirs)
