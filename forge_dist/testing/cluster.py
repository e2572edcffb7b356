"""Real launchers on one machine, for tests: a local SLURM cluster, two network namespaces acting
as two nodes, and subprocess runs that can never hang or leave processes behind.

    with LocalSlurm(tmp_dir) as slurm:           # tools/local_slurm.sh start ... stop, always
        run(["sbatch", "--wait", ...], env=slurm.env(launch_env()), timeout=120)
        slurm.job_state(job_id)                   # "COMPLETED", "FAILED", ... (scontrol, no slurmdbd)

    with NetnsPair() as nodes:                   # two namespaces joined by a veth pair, deleted after
        nodes.prefix(1) + ["torchrun", ...]      # runs in node 1, reachable at nodes.addr(1)

Every process a test starts here gets its own session, and a timeout kills the whole session (the
launcher and every rank it started) before the test fails with the output so far.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SLURM = ROOT / "tools" / "local_slurm.sh"
NETNS_RSH = Path(__file__).with_name("netns_rsh.sh")
# Variables of an outer launcher (a test run inside a SLURM job, under torchrun, ...) that must not
# leak into the launch a test makes.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")
LAUNCH_PREFIXES = ("OMPI_COMM_WORLD_", "PMIX_", "SLURM_", "PMI_")


class LaunchFailed(AssertionError):
    """A launched command exited differently than expected or ran past its timeout."""


def venv_bin(name: str) -> Optional[str]:
    """The script ``name`` of this interpreter's environment (torchrun, deepspeed, forge-train)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name)


def launch_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """os.environ without any outer launcher's variables, with this interpreter's bin first on
    PATH, loopback networking for gloo and OpenMPI, one thread, and the reference numerics."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES) or k == "SLURM_CONF"}
    env.update(PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
               FORGE_OPS="reference", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_oob_tcp_if_include="lo", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_btl="self,vader,tcp")
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 120, expect: Optional[int] = 0,
        cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own; past ``timeout`` the whole session is killed and
    LaunchFailed raised with the output so far. ``expect``: the exit status required (None: any)."""
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        raise LaunchFailed(f"{' '.join(cmd)} ran past {timeout}s and was killed\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        kill_session(proc.pid)  # ranks a launcher left behind go with it
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    if expect is not None and proc.returncode != expect:
        raise LaunchFailed(f"{' '.join(cmd)} -> exit {proc.returncode}, expected {expect}\n"
                           f"{out[-3000:]}\n{err[-3000:]}")
    return result


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class LocalSlurm:
    """tools/local_slurm.sh in ``state_dir``: started on enter, jobs cancelled and daemons stopped
    on exit (also when the test failed)."""

    def __init__(self, state_dir, kill_wait: int = 30):
        self.dir = Path(state_dir)
        self.kill_wait = kill_wait
        self.conf = self.dir / "slurm.conf"

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why a local cluster cannot start here, or None."""
        if os.name != "posix" or os.geteuid() != 0:
            return "local SLURM needs root (slurmd starts job steps as the submitting user)"
        missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
                   if shutil.which(exe) is None]
        if missing:
            return f"SLURM is not installed ({', '.join(missing)} missing): ./install.sh installs it"
        return None

    def _script(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, FORGE_SLURM_DIR=str(self.dir), FORGE_SLURM_KILL_WAIT=str(self.kill_wait))
        return run(["bash", str(LOCAL_SLURM), action], env=env, timeout=timeout)

    def start(self) -> "LocalSlurm":
        self._script("start")
        return self

    def stop(self) -> None:
        self._script("stop", timeout=90)

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        env = dict(base if base is not None else os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def scontrol(self, *args: str) -> str:
        return run(["scontrol", *args], env=self.env(), timeout=30).stdout

    def job_fields(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (the job's record stays MinJobAge seconds after its end)."""
        text = self.scontrol("show", "job", "--oneliner", str(job_id))
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def job_state(self, job_id: str) -> str:
        return self.job_fields(job_id).get("JobState", "")

    def jobcomp(self, job_id: str) -> Dict[str, str]:
        """The job's line in the job-completion log (jobcomp/filetxt), {} when it has none yet."""
        log = self.dir / "log" / "jobcomp.log"
        for line in (log.read_text().splitlines() if log.exists() else []):
            fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
            if fields.get("JobId") == str(job_id):
                return fields
        return {}

    def step_pids(self, job_id: str) -> List[int]:
        """Pids of the job's processes (``scontrol listpids``), launcher steps included."""
        out = run(["scontrol", "listpids", str(job_id)], env=self.env(), timeout=30, expect=None).stdout
        return [int(line.split()[0]) for line in out.splitlines()[1:] if line.split() and line.split()[0].isdigit()]


def process_env(pid: int) -> Dict[str, str]:
    """The environment of a running process (/proc/<pid>/environ), {} once it has gone."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class NetnsPair:
    """Two network namespaces joined by one veth pair, addresses 10.231.<subnet>.1 and .2: two
    "nodes" on one machine, so rendezvous and interface selection run off loopback. Only the two
    namespaces made here are ever addressed; they are deleted on exit, also after a failure. Both
    ends of the pair are called IFNAME inside their namespace."""

    IFNAME = "forge0"

    def __init__(self, subnet: Optional[int] = None):
        tag = f"{os.getpid() % 100000}"
        self.subnet = subnet if subnet is not None else 1 + os.getpid() % 250
        self.names = (f"forge{tag}a", f"forge{tag}b")
        self.ifnames = (f"fg{tag}a", f"fg{tag}b")  # interface names: at most 15 characters
        self.created: List[str] = []

    def addr(self, node: int) -> str:
        return f"10.231.{self.subnet}.{node + 1}"

    @property
    def cidr(self) -> str:
        return f"10.231.{self.subnet}.0/24"

    def prefix(self, node: int) -> List[str]:
        """The command prefix that runs a program inside ``node`` (0 or 1): its network namespace,
        and a UTS namespace with the host name ``names[node]`` (OpenMPI tells nodes apart by name)."""
        return ["ip", "netns", "exec", self.names[node], "unshare", "--uts", "sh", "-c",
                f'hostname {self.names[node]} && exec "$0" "$@"']

    def hostfile(self, path, slots: int = 2) -> str:
        """A hostfile (deepspeed and OpenMPI syntax) naming both nodes by address."""
        Path(path).write_text("".join(f"{self.addr(node)} slots={slots}\n" for node in (0, 1)))
        return str(path)

    def mpi_env(self) -> Dict[str, str]:
        """What mpirun needs to reach node 1 like a remote host: its daemon is started through
        netns_rsh.sh (in place of ssh), and every MPI and gloo socket uses IFNAME."""
        return {"GLOO_SOCKET_IFNAME": self.IFNAME, "OMPI_MCA_oob_tcp_if_include": self.IFNAME,
                "OMPI_MCA_btl_tcp_if_include": self.IFNAME, "OMPI_MCA_plm_rsh_agent": str(NETNS_RSH),
                "FORGE_NETNS_HOSTS": ",".join(f"{self.addr(n)}={self.names[n]}" for n in (0, 1))}

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def __enter__(self) -> "NetnsPair":
        try:
            for name in self.names:
                self._ip("netns", "add", name)
                self.created.append(name)
            a, b = self.ifnames
            self._ip("link", "add", a, "type", "veth", "peer", "name", b)
            for node in (0, 1):
                ns, dev = self.names[node], self.ifnames[node]
                self._ip("link", "set", dev, "netns", ns)
                # the same name on both "nodes", as eth0/ib0 on a cluster: one GLOO_SOCKET_IFNAME
                self._ip("-n", ns, "link", "set", dev, "name", self.IFNAME)
                self._ip("-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", self.IFNAME)
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", ns, "link", "set", self.IFNAME, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name in reversed(self.created):  # deleting a namespace deletes its end of the veth pair
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created = []

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why namespaces cannot be made here (tried for real), or None."""
        if shutil.which("ip") is None:
            return "iproute2 (`ip`) is not installed"
        if os.name != "posix" or os.geteuid() != 0:
            return "network namespaces need root (CAP_NET_ADMIN)"
        probe = NetnsPair(subnet=0)
        probe.names = (f"forgeprobe{os.getpid() % 100000}", probe.names[1])
        try:
            subprocess.run(["ip", "netns", "add", probe.names[0]], check=True, capture_output=True, text=True,
                           timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            return f"cannot create a network namespace: {getattr(e, 'stderr', '') or e}".strip()
        subprocess.run(["ip", "netns", "del", probe.names[0]], capture_output=True, timeout=30)
        return None


class LoopbackNodes:
    """The stand-in for NetnsPair where namespaces cannot be made: both "nodes" are this host on
    127.0.0.1, so rendezvous and ranks are exercised but not interface selection."""

    IFNAME = "lo"
    names = ("localhost", "localhost")

    def __init__(self, reason: str):
        self.reason = reason

    def addr(self, node: int) -> str:
        return "127.0.0.1"

    def prefix(self, node: int) -> List[str]:
        return []

