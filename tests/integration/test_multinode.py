"""Two nodes on one machine, off loopback: two network namespaces joined by a veth pair
(10.231.<n>.1 and .2, interface ``forge0`` in both, each with its own host name), made and always
deleted by the test. Only those two namespaces are ever addressed.

Every launch trains tensor parallelism inside a node and data parallelism across the two
(TP=2 x DP=2, 2 sequences per replica) and must give the losses of one process training on the
same 4 sequences:

  * torchrun: two agents, ``--nnodes 2 --rdzv_backend c10d``, one per namespace;
  * mpirun -np 4 -H <node0>:2,<node1>:2: ranks, local ranks and the master address come from
    mpi4py (nothing exported by hand but the interface); node 1's daemon is started by
    forge_dist/testing/netns_rsh.sh where a cluster would use ssh (a gloo all-reduce checks them;
    the DeepSpeed run below trains over the same mpirun and discovery);
  * deepspeed --hostfile (two host entries) --launcher openmpi with ZeRO-1. OpenMPI rather than
    pdsh: it needs no ssh server or keys, and it is the runner DeepSpeed documents for clusters
    without passwordless ssh; pdsh would need sshd in each namespace.
"""
import json
import warnings

import pytest

from forge_dist.testing.cluster import LoopbackNodes, NetnsPair, ROOT, launch_env, run, venv_bin
from forge_dist.testing.spawn import free_port
from forge_dist.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16", "--dropout", "0.0",
        "--eval_interval", "5", "--eval_iters", "1", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--max_iters", "10"]
TP2_DP2 = ["--tensor_parallel_size", "2", "--batch_size", "2"]


def series(out_dir, key="loss"):
    return {r["iter"]: r[key] for r in read_metrics(str(out_dir)) if key in r}


def assert_same_run(out, ref, rel):
    for key in ("loss", "grad_norm", "val_loss"):
        got, want = series(out, key), series(ref, key)
        assert sorted(got) == sorted(want) and got, (key, sorted(got), sorted(want))
        worst = max(abs(got[i] - want[i]) / abs(want[i]) for i in got)
        assert worst <= rel, f"{key}: worst relative difference {worst:.3g} > {rel}"


@pytest.fixture(scope="module")
def nodes():
    """Two namespaces, or (where they cannot be made) loopback, saying why: torchrun still runs two
    agents on it; the mpirun tests need two distinct hosts and skip."""
    why = NetnsPair.unavailable()
    if why:
        warnings.warn(f"two-node launches fall back to loopback: {why}")
        yield LoopbackNodes(why)
        return
    with NetnsPair() as pair:
        yield pair


def two_hosts(nodes):
    if isinstance(nodes, LoopbackNodes):
        pytest.skip(f"mpirun over two hosts needs network namespaces: {nodes.reason}")


@pytest.fixture(scope="module")
def reference(launch_dataset, tmp_path_factory):
    """One process, the 4 sequences of both replicas in one batch."""
    out = tmp_path_factory.mktemp("one") / "out"
    run([venv_bin("python") or "python", "-m", "forge_dist.train", *TINY, "--dataset", launch_dataset,
         "--batch_size", "4", "--out_dir", str(out)], env=launch_env(), timeout=120)
    return out


def test_torchrun_two_agents(nodes, reference, launch_dataset, tmp_path):
    """c10d rendezvous at node 0's address; node 0's agent hosts the store (is_host=1: its address is
    not the machine's host name, so torchrun cannot tell by itself); --local_addr is what each
    agent advertises to the workers as MASTER_ADDR. --node_rank is ignored by c10d (ranks go by
    arrival), but every agent gets a contiguous block of ranks, so TP=2 stays inside a node."""
    out, port = tmp_path / "out", free_port()
    env = launch_env({"GLOO_SOCKET_IFNAME": nodes.IFNAME})
    import subprocess

    procs = []
    try:
        for node in (0, 1):
            cmd = nodes.prefix(node) + [
                venv_bin("torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "2",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes.addr(0)}:{port}", "--rdzv_id", "forge-test",
                "--rdzv_conf", f"is_host={int(node == 0)},join_timeout=120", "--local_addr", nodes.addr(node),
                "-m", "forge_dist.train", *TINY, *TP2_DP2, "--dataset", launch_dataset, "--out_dir", str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        from forge_dist.testing.cluster import kill_session

        for p in procs:
            kill_session(p.pid)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert_same_run(out, reference, 1e-5)


def test_mpirun_two_hosts(nodes):
    """Each rank's place comes from MPI itself (mpi4py): rank, local rank (shared-memory split) and
    rank 0's address on GLOO_SOCKET_IFNAME with a free port; nothing else is exported. (Training
    over this discovery across the two hosts is the DeepSpeed test below: its openmpi runner is
    this mpirun.)"""
    two_hosts(nodes)
    cmd = nodes.prefix(0) + [
        "mpirun", "--allow-run-as-root", "-np", "4", "-H", f"{nodes.addr(0)}:2,{nodes.addr(1)}:2",
        "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "GLOO_SOCKET_IFNAME",
        venv_bin("python") or "python", "-m", "forge_dist.dist.check"]
    proc = run(cmd, env=launch_env(nodes.mpi_env()), timeout=180)
    reports = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [(r["launcher"], r["rank"], r["local_rank"], r["master_addr"], r["sum"]) for r in reports] == [
        ("mpirun", rank, rank % 2, nodes.addr(0), 10.0) for rank in range(4)], proc.stdout


def test_deepspeed_hostfile_openmpi_zero1(nodes, reference, launch_dataset, tmp_path):
    two_hosts(nodes)
    out = tmp_path / "out"
    hostfile = nodes.hostfile(tmp_path / "hostfile")
    mca = " ".join(f"--mca {k} {v}" for k, v in (("btl_tcp_if_include", nodes.IFNAME),
                                                  ("oob_tcp_if_include", nodes.IFNAME)))
    cmd = nodes.prefix(0) + [
        venv_bin("deepspeed"), "--hostfile", hostfile, "--launcher", "openmpi", "--force_multi", "--no_ssh_check",
        "--master_addr", nodes.addr(0),
        f"--launcher_args=--allow-run-as-root {mca} -x GLOO_SOCKET_IFNAME -x FORGE_OPS -x OMP_NUM_THREADS -x DS_ACCELERATOR",
        "--module", "forge_dist.train", *TINY, *TP2_DP2, "--dataset", launch_dataset, "--out_dir", str(out),
        "--deepspeed_config", str(ROOT / "configs/deepspeed/zero1_fp32.json")]
    run(cmd, env=launch_env(nodes.mpi_env()), timeout=240)
    assert_same_run(out, reference, 1e-4)
    # the sharded checkpoint (launched DeepSpeed runs' default), written by both hosts' ranks
    meta = json.loads(next((out / "checkpoints").glob("iter_*/optimizer.json")).read_text())
    layout = meta["layout"]
    assert (meta["deepspeed"]["zero_stage"], layout["dp_size"], layout["tensor_parallel_size"]) == (1, 2, 2), meta
