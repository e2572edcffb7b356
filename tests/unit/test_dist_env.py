"""Launcher detection from environment variables (torchrun, deepspeed, mpirun, SLURM), SLURM node
lists, single-process init, and (slow) real 2-process launches with torchrun and mpirun."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from forge_dist.dist.env import LaunchEnvError, detect_launch_env, expand_nodelist, first_slurm_host
from forge_dist.testing.spawn import free_port

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7",
            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1"}
DEEPSPEED = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
             "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "4"}
SLURM = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "node[01-04,07]",
         "SLURM_TASKS_PER_NODE": "4(x2)"}


def fields(e):
    return (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.master_port)


def test_torchrun():
    assert fields(detect_launch_env(TORCHRUN)) == ("torchrun", 3, 8, 1, 2, "node7", 29400)


def test_deepspeed_launcher():
    assert fields(detect_launch_env(DEEPSPEED)) == ("deepspeed", 5, 8, 1, 4, "10.0.0.1", 29500)


def test_plain_env_rendezvous_defaults():
    assert fields(detect_launch_env({"RANK": "0", "WORLD_SIZE": "2"})) == ("env", 0, 2, 0, 2, "127.0.0.1", 29500)


def test_single_process():
    assert fields(detect_launch_env({})) == ("single", 0, 1, 0, 1, "127.0.0.1", 29500)


def test_mpirun_single_node_uses_loopback():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "29123"}
    assert fields(detect_launch_env(env)) == ("mpirun", 1, 2, 1, 2, "127.0.0.1", 29123)


class FakeComm:
    """mpi4py's COMM_WORLD as seen by rank 3 of a two-node job: bcast returns rank 0's value."""

    def __init__(self, root_value):
        self.root_value = root_value
        self.calls = []

    def Get_rank(self):
        return 3

    def bcast(self, value, root=0):
        self.calls.append((value, root))
        return self.root_value


def test_mpirun_multi_node_broadcasts_rank0_host():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    comm = FakeComm(("10.1.2.3", 29500))
    assert fields(detect_launch_env(env, mpi_comm=comm)) == ("mpirun", 3, 4, 1, 2, "10.1.2.3", 29500)
    assert comm.calls == [(None, 0)]  # a non-root rank sends nothing
    env["MASTER_ADDR"] = "given"  # an explicit address wins and MPI is not consulted
    comm = FakeComm(("10.1.2.3", 29500))
    assert detect_launch_env(env, mpi_comm=comm).master_addr == "given" and comm.calls == []


def test_slurm():
    assert fields(detect_launch_env(SLURM)) == ("slurm", 6, 8, 2, 4, "node01", 29500)


def test_launcher_precedence():
    assert detect_launch_env({**SLURM, **TORCHRUN}).launcher == "torchrun"  # torchrun inside an allocation
    ompi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert detect_launch_env({**SLURM, **ompi}).launcher == "mpirun"


@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a,b[1-3]", ["a", "b1", "b2", "b3"]),
    ("gpu-[9-11]-ib", ["gpu-9-ib", "gpu-10-ib", "gpu-11-ib"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("single", ["single"]),
    ("x[007],y", ["x007", "y"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist,message", [
    ("node[01-04", "unbalanced"), ("node01]", "unbalanced"), ("node[a-b]", "cannot parse range"), ("", "names no host"),
])
def test_bad_nodelists(nodelist, message):
    with pytest.raises(LaunchEnvError, match=message):
        first_slurm_host(nodelist)


@pytest.mark.parametrize("env,message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 outside world of 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "world size 0"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not set"),
])
def test_inconsistent_env(env, message):
    with pytest.raises(LaunchEnvError, match=message):
        detect_launch_env(env)


def test_exports_are_what_env_rendezvous_and_deepspeed_read():
    e = detect_launch_env(SLURM)
    assert e.exports() == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                           "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}


@pytest.mark.timeout(60)
def test_single_process_init_needs_no_network():
    from forge_dist.dist.init import init_distributed

    with init_distributed(environ={}) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.env.launcher) == (0, 1, "gloo", "single")
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    assert not dist.is_initialized()


# --- real launches ------------------------------------------------------------------------------
def _launch(cmd, timeout=180):
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):  # from an enclosing launcher, if any
        env.pop(k, None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return sorted(_reports(out.stdout), key=lambda r: r["rank"])


def _reports(stdout: str):
    return [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", stdout)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_launch():
    script = os.path.join(os.path.dirname(sys.executable), "torchrun")  # the venv's own torchrun
    torchrun = [script] if os.path.exists(script) else [sys.executable, "-m", "torch.distributed.run"]
    reports = _launch(torchrun + ["--nproc_per_node", "2", "-m", "forge_dist.dist.check"])
    assert [(r["launcher"], r["rank"], r["world_size"], r["sum"]) for r in reports] == [
        ("torchrun", 0, 2, 3.0), ("torchrun", 1, 2, 3.0)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_file_rendezvous_launch(tmp_path):
    """Two processes started by hand (RANK/WORLD_SIZE only) meeting through a shared file."""
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "forge_dist.dist.check", "--init_method", f"file://{tmp_path / 'rdzv'}"]
    procs = [subprocess.Popen(cmd, env=dict(base, RANK=str(r), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                                             GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    reports = [r for out in outs for r in _reports(out)]
    assert sorted((r["launcher"], r["rank"], r["sum"]) for r in reports) == [("env", 0, 3.0), ("env", 1, 3.0)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mpirun_launch():
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    reports = _launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
                       sys.executable, "-m", "forge_dist.dist.check"])
    assert [(r["launcher"], r["rank"], r["world_size"], r["master_addr"], r["sum"]) for r in reports] == [
        ("mpirun", 0, 2, "127.0.0.1", 3.0), ("mpirun", 1, 2, "127.0.0.1", 3.0)]
