"""mpirun discovery's address rules and the preflight verdict, in-process (the real launches are
tests/integration/test_multinode.py and test_preflight.py)."""
import socket

import pytest

from forge_dist.dist import env as denv
from forge_dist.dist.env import LaunchEnvError, detect_launch_env, master_address, mpi_master
from forge_dist.dist.preflight import problems


def test_socket_interface_rules():
    assert denv._socket_ifname({"GLOO_SOCKET_IFNAME": "^docker,eth1,eth2"}) == "eth1"
    assert denv._socket_ifname({"NCCL_SOCKET_IFNAME": "ib0"}) == "ib0"
    assert denv._socket_ifname({"GLOO_SOCKET_IFNAME": "^docker"}) is None
    assert denv.interface_address("lo") == "127.0.0.1"
    assert denv.interface_address("no-such-if0") is None


def test_master_address():
    assert master_address({}, one_node=True) == "127.0.0.1"
    assert master_address({"GLOO_SOCKET_IFNAME": "lo"}, one_node=False) == "127.0.0.1"
    with pytest.raises(LaunchEnvError, match="names 'no-such-if0', which has no IPv4 address"):
        master_address({"GLOO_SOCKET_IFNAME": "no-such-if0"}, one_node=False)


def test_multi_node_refuses_a_loopback_host_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(LaunchEnvError, match="resolves to 127.0.1.1, which other nodes cannot reach"):
        master_address({}, one_node=False)


class Comm:
    """A COMM_WORLD of ``size`` seen from rank ``rank``; bcast hands out what rank 0 sent."""

    def __init__(self, rank, size):
        self.rank, self.size, self.sent = rank, size, []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, value, root=0):
        self.sent.append(value)
        return value


def test_rank0_error_reaches_every_rank():
    """Rank 0 cannot find its address: it broadcasts the error, so no rank waits for it."""
    comm = Comm(0, 4)
    with pytest.raises(LaunchEnvError, match="no-such-if0"):
        mpi_master(None, comm, one_node=False, env={"GLOO_SOCKET_IFNAME": "no-such-if0"})
    assert isinstance(comm.sent[0], Exception)
    addr, port = mpi_master(None, Comm(0, 4), one_node=True, env={})
    assert addr == "127.0.0.1" and 0 < port < 65536  # a free port, found by rank 0


def test_mpi_world_must_match_the_launcher():
    class Split(Comm):
        def Split_type(self, *a, **k):
            raise AssertionError("not reached")

    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}
    with pytest.raises(LaunchEnvError, match="OMPI_COMM_WORLD_SIZE=4 but MPI's COMM_WORLD has 1"):
        detect_launch_env(env, mpi_comm=Split(0, 1))


def _report(rank, host="n0", config="c1", code="k1", free=50.0, groups=()):
    facts = {"host": host, "python": "3.11", "torch": "2.13", "deepspeed": "0.19", "forge_dist": "0.1",
             "config_hash": config, "code_hash": code, "free_gb": free}
    return {"rank": rank, "facts": facts, "groups": list(groups)}


def test_preflight_verdict_names_the_ranks():
    assert problems([_report(0), _report(1)], 1.0) == []
    found = problems([_report(0), _report(1, host="n1", code="k2"), _report(2)], 1.0)
    assert found == ["code_hash differs: rank 1 (n1) has k2 where the others have k1"]
    bad = {"group": "tp", "ranks": [0, 1], "all_reduce": "ok", "all_gather": "FAILED: AssertionError: got [0.0, 0.0]"}
    found = problems([_report(0, groups=[bad]), _report(1, free=0.5)], 1.0)
    assert "less than 1.0 GB free in out_dir: rank 1 (0.5 GB)" in found
    assert "rank 0: all_gather on tp group [0, 1]: FAILED: AssertionError: got [0.0, 0.0]" in found
