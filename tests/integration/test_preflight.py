"""forge-preflight and ``forge-train --preflight``, and launchers' exit statuses:

  * under torchrun (4 ranks, TP=2 x DP=2) forge-train --preflight prints one table (every rank's
    facts, every tp/dp group's collectives 'ok' with latency and bandwidth) and then trains;
  * forge-preflight under mpirun (2 ranks) exits 0 with the table;
  * in one spawned world: a rank with another configuration, and a disk below --min_free_gb, make
    every rank return 1 and rank 0 name the ranks;
  * torchrun, deepspeed, mpirun and srun exit non-zero when one rank of four fails while the others
    succeed (forge_dist.testing.rank_exit): a launcher's status is its worst rank's.
"""
import io
import re
import shutil
from contextlib import redirect_stderr

import pytest

from forge_dist.testing import spawn
from forge_dist.testing.cluster import ROOT, launch_env, run, venv_bin
from forge_dist.testing.spawn import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16", "--batch_size", "2",
        "--eval_interval", "5", "--eval_iters", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress"]


def group_rows(stdout):
    """{(group, ranks): [statuses of the 5 collectives]} from the preflight table."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(world|tp|dp|pp|ep)\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+([\d.]+)", line)
        if m:
            rows[(m.group(1), m.group(2))] = list(m.groups()[2:7])
    return rows


def test_forge_train_preflight_under_torchrun(launch_dataset, tmp_path):
    out = tmp_path / "out"
    proc = run([venv_bin("torchrun"), "--nproc_per_node", "4", "--master_port", str(free_port()), "-m",
                "forge_dist.train", "--preflight", *TINY, "--max_iters", "2", "--tensor_parallel_size", "2",
                "--dataset", launch_dataset, "--out_dir", str(out)], env=launch_env(), timeout=240)
    assert "forge-preflight: 4 ranks, tp=2 pp=1 dp=2 ep=1, launcher torchrun" in proc.stdout, proc.stdout
    assert len(re.findall(r"^\d\s+\S+\s+\d\s+cpu", proc.stdout, re.M)) == 4, proc.stdout
    rows = group_rows(proc.stdout)
    ok3 = ["ok", "ok", "ok", "-", "-"]
    assert rows == {("world", "0,1,2,3"): ["ok", "-", "-", "ok", "-"], ("tp", "0,1"): ok3, ("tp", "2,3"): ok3,
                    ("dp", "0,2"): ok3, ("dp", "1,3"): ok3}, proc.stdout
    assert (out / "metrics.jsonl").exists()  # and then it trained


def test_forge_preflight_under_mpirun(launch_dataset, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    proc = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", venv_bin("python"), "-m",
                "forge_dist.train.preflight", "--bandwidth_mb", "1", *TINY, "--dataset", launch_dataset,
                "--out_dir", str(tmp_path / "out")], env=launch_env(), timeout=180)
    assert "launcher mpirun" in proc.stdout and "every rank agrees" in proc.stdout, proc.stdout
    assert group_rows(proc.stdout) == {("world", "0,1"): ["ok", "-", "-", "ok", "-"],
                                       ("dp", "0,1"): ["ok", "ok", "ok", "-", "-"]}, proc.stdout
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # a preflight trains nothing


def _preflight_cases(rank, world, out_dir):
    """In one gloo world: (exit status, rank 0's stderr) for several bad launches."""
    from forge_dist.dist.preflight import run_preflight
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.train.context import RunContext

    groups = ProcessGroups.build(Topology(world))
    ctx = RunContext(rank=rank, world_size=world, dp_rank=rank, dp_size=world, groups=groups, launcher="env")
    results = {}
    for name, values, min_free in (("same", {"lr": 1.0}, 0.0),
                                   ("config", {"lr": 1.0 if rank == 0 else 2.0}, 0.0),
                                   ("disk", {"lr": 1.0}, 1e9)):
        err = io.StringIO()
        with redirect_stderr(err):
            status = run_preflight(ctx, values, out_dir, bandwidth_mb=0.01, min_free_gb=min_free, stream=io.StringIO())
        results[name] = (status, err.getvalue())
    return results


@pytest.mark.dist
def test_preflight_names_disagreeing_ranks(tmp_path):
    results = spawn(_preflight_cases, 2, str(tmp_path), timeout=120, return_all=True)
    for rank, res in enumerate(results):
        assert [res[k][0] for k in ("same", "config", "disk")] == [0, 1, 1], (rank, res)
    rank0 = results[0]
    assert rank0["same"][1] == ""
    assert re.search(r"FAILED: config_hash differs: rank 1 \(\S+\) has \w+ where the others have", rank0["config"][1]) \
        or re.search(r"FAILED: config_hash differs: rank 0", rank0["config"][1]), rank0["config"][1]
    assert "less than 1000000000.0 GB free in out_dir: rank 0" in rank0["disk"][1] and "rank 1" in rank0["disk"][1]


RANK_EXIT = ["-m", "forge_dist.testing.rank_exit", "1=3"]


def _launchers():
    py = venv_bin("python")
    yield "torchrun", [venv_bin("torchrun"), "--nproc_per_node", "4", "--master_port", str(free_port()), *RANK_EXIT]
    yield "deepspeed", [venv_bin("deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()), "--module",
                        *RANK_EXIT[1:]]
    if shutil.which("mpirun"):
        yield "mpirun", ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "4", py, *RANK_EXIT]


@pytest.mark.parametrize("name", ["torchrun", "deepspeed", "mpirun"])
def test_launcher_status_is_the_worst_ranks(name):
    cmds = dict(_launchers())
    if name not in cmds:
        pytest.skip(f"{name} is not installed")
    proc = run(cmds[name], env=launch_env(), timeout=120, expect=None)
    assert proc.returncode != 0, f"{name} exited 0 although rank 1 exited 3\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    assert "rank 1 exits 3" in proc.stdout + proc.stderr


def test_srun_status_is_the_worst_ranks(slurm):
    proc = run(["srun", "--ntasks", "4", "--overcommit", venv_bin("python"), *RANK_EXIT],
               env=slurm.env(launch_env()), cwd=str(ROOT), timeout=120, expect=None)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "rank 1 exits 3" in proc.stdout
