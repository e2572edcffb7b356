"""forge-train as a SLURM batch job, on a real one-node cluster (tools/local_slurm.sh, started by
the session fixture ``slurm`` and always stopped):

  * ``sbatch --wait launcher/slurm.sbatch --tensor_parallel_size 2`` over 2 tasks logs exactly the
    metrics of the same run under torchrun;
  * the DeepSpeed engine under srun (``--deepspeed_config``, ZeRO-2, 2 data-parallel tasks) trains
    to the same losses and its checkpoint records ZeRO stage 2 over 2 ranks;
  * a rank killed mid-run (SIGKILL, as the OOM killer does) ends the job FAILED with a non-zero
    exit, in seconds, not a hang. There is no slurmdbd here, so `sacct` cannot answer: the state
    comes from `scontrol show job` and the job-completion log (jobcomp/filetxt), and sbatch --wait
    returns the job's exit status.
"""
import json
import os
import signal
import time

import pytest

from forge_dist.testing.cluster import ROOT, launch_env, process_env, run, venv_bin
from forge_dist.testing.spawn import free_port
from forge_dist.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SBATCH = str(ROOT / "launcher" / "slurm.sbatch")
TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16", "--dropout", "0.0",
        "--eval_interval", "5", "--eval_iters", "1", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress"]
LONG = 150  # iterations of the reference run: long enough to preempt a run in the middle


def series(out_dir, key="loss"):
    return {r["iter"]: r[key] for r in read_metrics(str(out_dir)) if key in r}


def assert_series_close(got, want, rel):
    """``got`` logs the first iterations of ``want`` (the learning rate is constant: a shorter run
    is a prefix of a longer one)."""
    assert got and set(got) <= set(want), (sorted(got), sorted(want))
    worst = max(abs(got[i] - want[i]) / abs(want[i]) for i in got)
    assert worst <= rel, f"worst relative difference {worst:.3g} > {rel}"


def sbatch(slurm, log, *args, wait=True, timeout=150, expect=0):
    """(job id, CompletedProcess) of ``sbatch launcher/slurm.sbatch ARGS`` with 2 tasks."""
    cmd = ["sbatch", "--parsable", "--ntasks", "2", "--output", str(log), *(["--wait"] if wait else []),
           SBATCH, *args]
    proc = run(cmd, env=slurm.env(launch_env()), cwd=str(ROOT), timeout=timeout, expect=expect)
    return proc.stdout.split()[0].split(";")[0], proc


@pytest.fixture(scope="module")
def torchrun_tp2(launch_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "out"
    run([venv_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "forge_dist.train",
         *TINY, "--dataset", launch_dataset, "--batch_size", "4", "--max_iters", str(LONG), "--out_dir", str(out),
         "--tensor_parallel_size", "2"], env=launch_env(), timeout=150)
    return out


def test_sbatch_tensor_parallel_equals_torchrun(slurm, torchrun_tp2, launch_dataset, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.out"
    job, _ = sbatch(slurm, log, *TINY, "--dataset", launch_dataset, "--batch_size", "4", "--max_iters", "10",
                    "--out_dir", str(out), "--tensor_parallel_size", "2")
    assert slurm.job_state(job) == "COMPLETED", log.read_text()[-3000:]
    assert slurm.jobcomp(job).get("JobState") == "COMPLETED"
    for key in ("loss", "grad_norm", "val_loss"):  # same layout, same numerics: equal, not close
        assert_series_close(series(out, key), series(torchrun_tp2, key), 1e-6)


def test_deepspeed_zero2_under_srun(slurm, torchrun_tp2, launch_dataset, tmp_path):
    """2 data-parallel tasks of batch 2 = one batch of 4 (the torchrun TP=2 run's)."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    job, _ = sbatch(slurm, log, *TINY, "--dataset", launch_dataset, "--batch_size", "2", "--max_iters", "10",
                    "--out_dir", str(out), "--deepspeed_config", str(ROOT / "configs/deepspeed/zero2_fp32.json"))
    assert slurm.job_state(job) == "COMPLETED", log.read_text()[-3000:]
    assert_series_close(series(out, "loss"), series(torchrun_tp2, "loss"), 1e-4)
    # a launched DeepSpeed run writes the sharded checkpoint: each task its own ZeRO-2 partition
    ckpt = out / "checkpoints" / "iter_0000010"
    assert sorted(p.name for p in (ckpt / "model" / "dcp").iterdir()) == [".metadata.json", "__0_0.distcp",
                                                                          "__1_0.distcp"]
    meta = json.loads((ckpt / "optimizer.json").read_text())
    assert (meta["engine"], meta["deepspeed"]["zero_stage"], meta["layout"]["dp_size"]) == ("deepspeed", 2, 2), meta


def logged_iters(out_dir) -> int:
    """Iterations logged so far by a running job (a line being written is not counted)."""
    path = out_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()[:-1]) if path.exists() else 0


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what}: not after {timeout}s"
        time.sleep(0.3)


def test_requeue_resumes_exactly(slurm, torchrun_tp2, launch_dataset, tmp_path):
    """The time-limit warning (USR1 to the batch script, as ``#SBATCH --signal=B:USR1@120`` sends it)
    makes the script `scontrol requeue` its job: every rank gets SIGTERM, finishes its step, writes a
    checkpoint and exits 0; the requeued job resumes with --init_from resume and logs the losses of
    the uninterrupted run, bit for bit (fp32)."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    job, _ = sbatch(slurm, log, *TINY, "--dataset", launch_dataset, "--batch_size", "4", "--max_iters", str(LONG),
                    "--out_dir", str(out), "--tensor_parallel_size", "2", wait=False)
    try:
        wait_for(lambda: logged_iters(out) >= 2, 120, "training did not start")
        run(["scancel", "--batch", "--signal=USR1", job], env=slurm.env(), timeout=30)
        wait_for(lambda: slurm.job_fields(job).get("Restarts") == "1", 60, "the job was not requeued")
        preempted_at = logged_iters(out)
        assert preempted_at < LONG, "the run ended before the preemption: raise LONG"
        # SLURM holds a requeued job back for about two minutes (its BeginTime); release it now
        wait_for(lambda: slurm.job_state(job) == "PENDING", 60, "the requeued job is not pending")
        slurm.scontrol("update", f"JobId={job}", "StartTime=now")
        wait_for(lambda: slurm.job_state(job) not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), 150,
                 "the resumed job did not finish")
        text = log.read_text()
        assert slurm.job_state(job) == "COMPLETED", text[-3000:]
        assert "time limit near: requeueing" in text and "SIGTERM received" in text, text[-3000:]
        assert "restart 1 of job" in text, text[-3000:]
        for key in ("loss", "grad_norm", "val_loss"):
            got, want = series(out, key), series(torchrun_tp2, key)
            assert sorted(got) == sorted(want), (key, sorted(got))  # every iteration once, none lost
            assert_series_close(got, want, 1e-6)
    finally:
        run(["scancel", job], env=slurm.env(), timeout=30, expect=None)


def test_killed_rank_fails_the_job(slurm, launch_dataset, tmp_path):
    """SIGKILL to rank 1 mid-training: srun stops rank 0 (--kill-on-bad-exit), the job is FAILED
    with a non-zero exit code, well before its 10,000 iterations."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    job, _ = sbatch(slurm, log, *TINY, "--dataset", launch_dataset, "--batch_size", "4", "--max_iters", "10000",
                    "--out_dir", str(out), "--tensor_parallel_size", "2", wait=False)
    try:
        deadline = time.time() + 120
        victim = None
        while victim is None and time.time() < deadline:
            if (out / "metrics.jsonl").exists():  # training runs: both ranks are past the rendezvous
                victim = next((pid for pid in slurm.step_pids(job)
                               if process_env(pid).get("SLURM_PROCID") == "1"
                               and b"forge_dist.train" in open(f"/proc/{pid}/cmdline", "rb").read()), None)
            time.sleep(0.5)
        assert victim is not None, f"rank 1 never started training\n{log.read_text()[-3000:] if log.exists() else ''}"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        while slurm.job_state(job) in ("RUNNING", "COMPLETING", "PENDING") and time.time() - killed_at < 60:
            time.sleep(0.5)
        fields = slurm.job_fields(job)
        assert fields["JobState"] == "FAILED", fields
        assert fields["ExitCode"].split(":")[0] != "0", fields
        assert time.time() - killed_at < 60
        assert slurm.jobcomp(job).get("JobState") == "FAILED"
        assert len(series(out)) < 10000
    finally:
        run(["scancel", job], env=slurm.env(), timeout=30, expect=None)
