"""Drills 1 and the hang: ranks that die or freeze in the middle of a step, in worlds started the way
a plain env:// launcher (or a node of a multi-node job) starts them: one process per rank, nobody
killing the survivors for us.

  * SIGKILL of rank 3 at TP=2 x DP=2 in the middle of iteration 4, inside its async sharded save
    (--async_checkpoint: the background thread has written rank 3's shards, nothing is published yet,
    the main thread trains on): every other rank exits 3 within the timeout, its last line naming
    rank 3, with out_dir/diagnostics/rank_<r>.txt; ``latest`` stays the previous checkpoint (2),
    which verifies, and ``--init_from resume`` continues with the losses the killed run had logged
    (fp32, bit for bit);
  * SIGKILL of rank 0 of a DeepSpeed ZeRO-2 run (DP=2) while it publishes its async save of iteration 4
    (the sealed checkpoint renamed into place, ``latest`` not yet moved): rank 1 fails in DeepSpeed's
    own all-reduce (gloo's connection reset, outside our flight recorder) and still exits 3 naming
    rank 0 and its host (the rendezvous store died with it); ``latest`` stays 2, the resume from it
    names the unpublished iteration 4, replays the logged losses bit for bit and publishes 4 and 6;
  * a frozen rank (SIGSTOP: its sockets stay open, so the others hang in a collective): SIGUSR2
    to the survivor writes its diagnostics file at once; after --collective_timeout_s it names the
    frozen rank and exits 3.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.runs import logged_losses
from forge_dist.testing.spawn import free_port
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.dist]
HOST = socket.gethostname()  # every rank of these drills runs here: each message names its host

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--eval_interval", "4", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--always_save_checkpoint",
        "--lr_scheduler", "cosine", "--warmup_iters", "2", "--lr_decay_iters", "8"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 40_000)


def launch(n, args, fault=("KILL", -1, 1)):
    """Start ``n`` ranks of forge-train (through the drill wrapper: ``fault`` = signal, rank, and the
    forward-backward call, or "POINT:N": that point of the save of iteration N, e.g. "save:N" (this
    rank's shards written) or "publish:N" (rank 0 publishing it): forge_dist.testing.kill_points)."""
    port = str(free_port())
    procs = []
    for r in range(n):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", FORGE_OPS="reference")
        where = ["--at", str(fault[2])] if ":" in str(fault[2]) else ["--call", str(fault[2])]
        cmd = [sys.executable, "-m", "forge_dist.testing.drill", "--signal", fault[0], "--rank", str(fault[1]),
               *where, "--", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=150):
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


losses = logged_losses


@pytest.mark.timeout(400)
def test_killed_rank_is_named_and_resume_is_exact(dataset, tmp_path):
    out = tmp_path / "out"
    args = TINY + ["--dataset", dataset, "--out_dir", str(out), "--tensor_parallel_size", "2", "--max_iters", "6",
                   "--collective_timeout_s", "10", "--async_checkpoint", "--eval_interval", "2"]
    start = time.monotonic()
    results = finish(launch(4, args, ("KILL", 3, "save:4")))  # rank 3 dies in its async save of iteration 4
    assert time.monotonic() - start < 140
    assert results[3][0] == -signal.SIGKILL
    for rank, (code, _, err) in enumerate(results[:3]):
        last = err.strip().splitlines()[-1]
        # rank 0 names rank 3; another survivor may find rank 0 (the store's host) already gone after that
        named = (f"rank 3 on {HOST} did not arrive" in last
                 or (rank > 0 and f"rank 0 on {HOST} (which hosts the rendezvous store" in last))
        assert code == 3 and last.startswith(f"forge-train: error: rank {rank}: ") and named, err
        text = (out / "diagnostics" / f"rank_{rank}.txt").read_text()
        assert f"rank: {rank} of 4" in text and "FAILED" in text and "python stacks (all threads):" in text
    assert not (out / "diagnostics" / "rank_3.txt").exists()
    before = losses(out)
    # the save of 4 is written while iteration 4 (or 5) runs: rank 3 dies there
    assert sorted(before) in (list(range(4)), list(range(5))), sorted(before)
    latest = ckpt.resolve_checkpoint(str(out))
    assert latest.endswith("iter_0000002") and (out / "checkpoints" / ".tmp-iter_0000004").is_dir()
    assert not (out / "checkpoints" / "iter_0000004").exists()
    assert any(f.startswith("__3_") for f in os.listdir(out / "checkpoints" / ".tmp-iter_0000004" / "model" / "dcp"))
    ckpt.verify_checkpoint(latest)

    results = finish(launch(4, args + ["--init_from", "resume"]))
    assert [r[0] for r in results] == [0] * 4, results[0][2][-3000:]
    after = losses(out)
    assert sorted(after) == list(range(6))
    assert [after[i] for i in before if i >= 2] == [before[i] for i in before if i >= 2]  # replayed, bit for bit
    assert ckpt.resolve_checkpoint(str(out)).endswith("iter_0000006")
    stepped = [r for r in read_metrics(str(out)) if "loss" in r]
    assert all({"straggler_rank", "straggler_compute_s", "compute_s_median"} <= set(r) for r in stepped[-4:])


DS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed",
                         "zero2_fp32.json")


@pytest.mark.timeout(400)
def test_rank0_killed_while_publishing_a_deepspeed_async_save(dataset, tmp_path):
    out = tmp_path / "out"
    args = TINY + ["--dataset", dataset, "--out_dir", str(out), "--max_iters", "6", "--collective_timeout_s", "10",
                   "--async_checkpoint", "--eval_interval", "2", "--deepspeed_config", DS_CONFIG]
    results = finish(launch(2, args, ("KILL", 0, "publish:4")))
    assert results[0][0] == -signal.SIGKILL
    # rank 1 fails in DeepSpeed's own all-reduce (gloo's "connection reset"), outside our recorder; its
    # error still names the lost rank and its host (train/foreign_collectives.py), like the native engine's
    code, _, err = results[1]
    last = err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("forge-train: error: rank 1: ") and " failed: " in last, err[-3000:]
    assert f"rank 0 on {HOST} (which hosts the rendezvous store at 127.0.0.1:" in last, last
    assert "FAILED: " in (out / "diagnostics" / "rank_1.txt").read_text()
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000002"
    latest = ckpt.resolve_checkpoint(str(out))
    assert latest.endswith("iter_0000002")
    ckpt.verify_checkpoint(latest)
    # renamed into place but not pointed to: whole and sealed (never half a checkpoint), never latest
    ckpt.verify_checkpoint(str(root / "iter_0000004"))
    assert not (root / ".tmp-iter_0000004").exists()
    before = losses(out)
    assert sorted(before)[:4] == list(range(4)), sorted(before)

    results = finish(launch(2, args + ["--init_from", "resume"]))
    assert [r[0] for r in results] == [0, 0], results[0][2][-3000:]
    assert "iter_0000004 is sealed but was never published" in results[0][1] + results[0][2]  # named, not resumed
    after = losses(out)
    assert sorted(after) == list(range(6))
    assert [after[i] for i in before if i >= 2] == [before[i] for i in before if i >= 2]  # replayed, bit for bit
    assert ckpt.resolve_checkpoint(str(out)).endswith("iter_0000006")
    for name in ("iter_0000004", "iter_0000006"):
        ckpt.verify_checkpoint(str(root / name))


@pytest.mark.timeout(120)
def test_deepspeed_collective_failure_names_the_lost_rank(tmp_path):
    """Deterministically inside DeepSpeed's own all-reduce (the drill above may fail in one of ours):
    rank 0 killed (the rendezvous store dies with it) and rank 1 killed (rank 0 reads its stale
    heartbeat); two worlds of 2 at once."""
    worlds = {}
    for dies in (0, 1):
        port, procs = str(free_port()), []
        for r in range(2):
            env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
            env.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu")
            cmd = [sys.executable, "-m", "forge_dist.testing.lost_peer", "--dies", str(dies), str(tmp_path / str(dies))]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        worlds[dies] = procs
    for dies, procs in worlds.items():
        results = finish(procs, timeout=100)
        survivor = 1 - dies
        assert results[dies][0] == -signal.SIGKILL, results[dies][2][-2000:]
        code, _, err = results[survivor]
        last = err.strip().splitlines()[-1] if err.strip() else ""
        head = f"forge-train: error: rank {survivor}: all_reduce on world(0,1) at "
        assert code == 3 and last.startswith(head) and "in test_" not in last, err[-3000:]
        assert "forge_dist/testing/lost_peer.py:" in last  # the caller of DeepSpeed's comm layer
        lost = (f"rank 0 on {HOST} (which hosts the rendezvous store at 127.0.0.1:" if dies == 0 else
                f"rank 1 on {HOST} did not arrive (heartbeat: none for ")
        assert lost in last, last
        text = (tmp_path / str(dies) / "diagnostics" / f"rank_{survivor}.txt").read_text()
        assert "failed: #0" in text and "Connection" in text, text[:2000]


def _wait_stopped(pid, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} was never stopped")


@pytest.mark.timeout(300)
def test_frozen_rank_dump_on_request_then_named_after_timeout(dataset, tmp_path):
    out = tmp_path / "out"
    args = TINY + ["--dataset", dataset, "--out_dir", str(out), "--max_iters", "6", "--collective_timeout_s", "8"]
    procs = launch(2, args, ("STOP", 1, 3))  # rank 1 freezes inside iteration 2
    try:
        _wait_stopped(procs[1].pid)
        dump = out / "diagnostics" / "rank_0.txt"
        time.sleep(1.0)
        os.kill(procs[0].pid, signal.SIGUSR2)  # while rank 0's main thread waits in a collective
        end = time.monotonic() + 30
        while not dump.exists() and time.monotonic() < end:
            time.sleep(0.2)
        first = dump.read_text()
        assert first.startswith("forge_dist diagnostics: SIGUSR2 received") and "IN FLIGHT" in first, first
        code, _, err = finish(procs[:1], timeout=120)[0]
    finally:
        procs[1].kill()
        procs[1].wait()
    last = err.strip().splitlines()[-1]
    assert code == 3 and "has waited" in last and f"rank 1 on {HOST} did not arrive (heartbeat: none for" in last, err
    assert dump.read_text().startswith(f"forge_dist diagnostics: collective timeout: rank 1 on {HOST} did not arrive")
