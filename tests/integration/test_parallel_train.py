"""forge-train in parallel, end to end under the real launchers, on a tiny model and the bundled
corpus in float32:

  * tensor parallelism: ``torchrun --nproc_per_node 2 -m forge_dist.train --tensor_parallel_size 2``
    logs the losses of the one-process run to 1e-4 over 20 iterations (metrics.jsonl), writes the
    same weights and prints the same sample; ``mpirun -np 2 forge-train`` likewise, here with
    sequence parallelism on top;
  * data parallelism: 2 replicas of batch b equal one process of batch 2b to 1e-5 (10 iterations),
    alone and beside TP=2 (4 ranks, sequence parallel, clipping acting);
  * checkpoints: a resume at the same layout (TP=2 + SP, dropout on) continues bit for bit; a
    resume at another TP size reshards weights and optimizer state (TP=2 -> 1 and 1 -> 2);
  * a bad option under mpirun stops both ranks with one line.

The tensor-parallel numerics themselves (every variant, every gradient) are the parity matrix's
(tests/dist/test_tp_parity.py); here it is the trainer around them.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from forge_dist.testing.spawn import free_port
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.metrics import read_metrics

pytestmark = pytest.mark.slow

MODEL = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--dropout", "0.0"]
RUN = ["--batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_interval", "10", "--eval_iters", "2", "--log_interval", "1", "--device", "cpu",
       "--dtype", "float32", "--no-tensorboard_log", "--no-progress", "--lr_scheduler", "cosine", "--warmup_iters",
       "3", "--lr_decay_iters", "20", "--always_save_checkpoint"]
SAMPLE = ["--max_sample_tokens", "24"]
NO_SAMPLE = ["--max_sample_tokens", "none"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def _bin(name):
    path = os.path.join(os.path.dirname(sys.executable), name)  # the venv's own script
    return path if os.path.exists(path) else None


def _env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(FORGE_OPS="reference",  # the pure-PyTorch numerics; no kernel build inside a test
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_PORT=str(free_port()),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_oob_tcp_if_include="lo",
               OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_btl="self,vader,tcp")
    return env


def _run(cmd, timeout=150, expect=0):
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert out.returncode == expect, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def single(*args, **kw):
    return _run([sys.executable, "-m", "forge_dist.train", *args], **kw)


def torchrun(n, *args, **kw):
    launcher = [_bin("torchrun")] if _bin("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    return _run(launcher + ["--nproc_per_node", str(n), "--master_port", str(free_port()), "-m", "forge_dist.train",
                            *args], **kw)


def mpirun(n, *args, **kw):
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    script = [_bin("forge-train")] if _bin("forge-train") else [sys.executable, "-m", "forge_dist.train"]
    return _run([exe, "--allow-run-as-root", "--oversubscribe", "-np", str(n), *script, *args], **kw)


def series(out_dir, key="loss"):
    return {r["iter"]: r[key] for r in read_metrics(str(out_dir)) if key in r}


def assert_close_series(got, want, rel, iters):
    assert sorted(got) == sorted(want) == list(iters), (sorted(got), sorted(want))
    worst = max(abs(got[i] - want[i]) / abs(want[i]) for i in iters)
    assert worst <= rel, f"worst relative difference {worst:.3g} > {rel}"


def sample_of(stdout):
    assert stdout.count("--- sample ---") == 1, stdout  # printed once, by rank 0
    return stdout.split("--- sample ---\n", 1)[1].split("\n--------------", 1)[0]


def weights(out_dir_or_ckpt):
    from forge_dist.io import from_pretrained

    path = ckpt.resolve_checkpoint(str(out_dir_or_ckpt))
    ckpt.verify_checkpoint(path)
    return from_pretrained(os.path.join(path, ckpt.MODEL_DIR)).state_dict()


def assert_weights_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled corpus, prepared once into this module's cache (what --dataset default uses)."""
    from forge_dist.data.prepare import prepare_default_dataset

    return str(prepare_default_dataset(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The one-process run (TP=1) every parallel run is compared with: (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = single(*MODEL, *RUN, *SAMPLE, "--dataset", corpus, "--max_iters", "20", "--out_dir", str(out))
    return out, proc.stdout


@pytest.fixture(scope="module")
def tp2(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2") / "out"
    proc = torchrun(2, *MODEL, *RUN, *SAMPLE, "--dataset", corpus, "--max_iters", "20", "--out_dir", str(out),
                    "--tensor_parallel_size", "2", "--checkpoint_format", "gathered")  # the sharded format: the
    return out, proc.stdout  # same-layout resume below and tests/dist/test_sharded_resume.py


@pytest.mark.timeout(200)
def test_tp2_under_torchrun_matches_one_process(reference, tp2):
    (ref, ref_stdout), (out, stdout) = reference, tp2
    assert_close_series(series(out), series(ref), 1e-4, range(20))
    assert_close_series(series(out, "val_loss"), series(ref, "val_loss"), 1e-4, (0, 10, 20))
    assert_close_series(series(out, "grad_norm"), series(ref, "grad_norm"), 1e-4, range(20))
    assert_weights_close(weights(out), weights(ref), 1e-5)  # logical full weights, the one-process layout
    assert sample_of(stdout) == sample_of(ref_stdout)  # every TP rank ran the forward; rank 0 printed
    saved = ckpt.read_config(ckpt.resolve_checkpoint(str(out)))
    assert saved["tensor_parallel_size"] == 2  # recorded, though a resume takes the launch's own


@pytest.mark.timeout(200)
def test_tp2_sequence_parallel_under_mpirun_matches_one_process(reference, corpus, tmp_path):
    (ref, ref_stdout), out = reference, tmp_path / "out"
    proc = mpirun(2, *MODEL, *RUN, *SAMPLE, "--dataset", corpus, "--max_iters", "20", "--out_dir", str(out),
                  "--tensor_parallel_size", "2", "--sequence_parallel")
    assert_close_series(series(out), series(ref), 1e-4, range(20))
    assert_weights_close(weights(out), weights(ref), 1e-5)
    assert sample_of(proc.stdout) == sample_of(ref_stdout)  # decoded by a non-SP TP copy of the model


@pytest.mark.timeout(200)
def test_dp2_matches_one_process_with_twice_the_batch(reference, corpus, tmp_path):
    """2 replicas of micro-batch 2 (x 2 accumulation steps) take, rank after rank, the rows of the
    one-process run of micro-batch 4: its first 10 iterations, evaluation and weights at 10. With
    ZeRO-1 (--zero_stage 1: each replica steps half of the AdamW state), whose checkpoint holds the
    one-process AdamW state."""
    ref, out = reference[0], tmp_path / "dp2"
    torchrun(2, *MODEL, *RUN, *NO_SAMPLE, "--dataset", corpus, "--max_iters", "10", "--batch_size", "2",
             "--out_dir", str(out), "--zero_stage", "1")
    for key, iters in (("loss", range(10)), ("grad_norm", range(10)), ("val_loss", (0, 10))):
        want = {i: v for i, v in series(ref, key).items() if i in iters}
        assert_close_series(series(out, key), want, 1e-5, iters)
    assert_weights_close(weights(out), weights(os.path.join(ref, "checkpoints", "iter_0000010")), 1e-5)
    got = _optimizer_state(out)
    from forge_dist.io.sharded_read import checkpoint_optimizer_state

    want = checkpoint_optimizer_state(os.path.join(ref, "checkpoints", "iter_0000010"))
    assert got["state"].keys() == want["state"].keys() and got["param_groups"] == want["param_groups"]
    for i, moments in want["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = got["state"][i][k], moments[k]
            assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-4, (i, k)


@pytest.mark.timeout(240)
def test_tp2_dp2_under_torchrun_matches_one_process_with_clipping(reference, corpus, tmp_path):
    """The README's TP x DP command: 4 ranks, TP=2 (sequence parallel) x 2 replicas of micro-batch
    2, against the one-process run of micro-batch 4, with grad_clip 1.0 acting."""
    ref, out = reference[0], tmp_path / "tp2dp2"
    torchrun(4, *MODEL, *RUN, *NO_SAMPLE, "--dataset", corpus, "--max_iters", "10", "--batch_size", "2",
             "--out_dir", str(out), "--tensor_parallel_size", "2", "--sequence_parallel")
    assert max(v for i, v in series(ref, "grad_norm").items() if i < 10) > 1.0  # clipping acts
    for key, iters in (("loss", range(10)), ("grad_norm", range(10)), ("val_loss", (0, 10))):
        want = {i: v for i, v in series(ref, key).items() if i in iters}
        assert_close_series(series(out, key), want, 1e-5, iters)
    assert_weights_close(weights(out), weights(os.path.join(ref, "checkpoints", "iter_0000010")), 1e-5)


@pytest.mark.timeout(200)
def test_resume_at_the_same_layout_is_exact(corpus, tmp_path):
    """TP=2 + sequence parallelism with dropout: resumed from the checkpoint an uninterrupted run wrote
    at iteration 4, every rank's RNG streams, the optimizer shards and the loader continue exactly,
    so the losses are equal bit for bit."""
    common = [*MODEL, *RUN, *NO_SAMPLE, "--dataset", corpus, "--dropout", "0.1", "--eval_interval", "4",
              "--max_iters", "8", "--tensor_parallel_size", "2", "--sequence_parallel"]
    torchrun(2, *common, "--out_dir", str(tmp_path / "full"))
    torchrun(2, *common, "--out_dir", str(tmp_path / "resumed"), "--init_from", "resume",
             "--init_from_ckpt", str(tmp_path / "full" / "checkpoints" / "iter_0000004"))
    full, resumed = series(tmp_path / "full"), series(tmp_path / "resumed")
    assert sorted(resumed) == list(range(4, 8))
    assert [full[i] for i in range(4, 8)] == [resumed[i] for i in range(4, 8)]
    assert series(tmp_path / "resumed", "val_loss") == {8: series(tmp_path / "full", "val_loss")[8]}
    assert_weights_close(weights(tmp_path / "resumed"), weights(tmp_path / "full"), 0.0)


def _optimizer_state(out_dir):
    """The one-process AdamW state of the latest checkpoint (gathered or, from a launch, sharded)."""
    from forge_dist.io.sharded_read import checkpoint_optimizer_state

    return checkpoint_optimizer_state(ckpt.resolve_checkpoint(str(out_dir)))


@pytest.mark.timeout(240)
def test_resume_at_another_tensor_parallel_size(reference, tp2, corpus, tmp_path):
    """Checkpoints hold logical weights and the one-process optimizer state: a TP=2 checkpoint resumes
    in one process and a one-process checkpoint under TP=2, both continuing the reference run."""
    (ref, _), (tp2_out, _) = reference, tp2
    args = [*MODEL, *RUN, *NO_SAMPLE, "--dataset", corpus, "--max_iters", "20", "--init_from", "resume"]
    single(*args, "--init_from_ckpt", os.path.join(tp2_out, "checkpoints", "iter_0000010"),
           "--out_dir", str(tmp_path / "to1"))
    proc = torchrun(2, *args, "--init_from_ckpt", os.path.join(ref, "checkpoints", "iter_0000010"),
                    "--out_dir", str(tmp_path / "to2"), "--tensor_parallel_size", "2")
    assert "resharded" in proc.stdout + proc.stderr
    for out in (tmp_path / "to1", tmp_path / "to2"):
        assert_close_series(series(out), {i: v for i, v in series(ref).items() if i >= 10}, 1e-4, range(10, 20))
        assert_weights_close(weights(out), weights(ref), 1e-5)
        got, want = _optimizer_state(out), _optimizer_state(ref)
        assert got["state"].keys() == want["state"].keys() and got["param_groups"] == want["param_groups"]
        for i, moments in want["state"].items():
            assert int(got["state"][i]["step"]) == int(moments["step"]) == 20
            for k in ("exp_avg", "exp_avg_sq"):  # whole-tensor relative error: fp32 noise is ~1e-7
                a, b = got["state"][i][k], moments[k]
                assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-4, (i, k)


@pytest.mark.timeout(120)
def test_bad_option_under_mpirun_stops_every_rank_with_one_line(corpus, tmp_path):
    proc = mpirun(2, *MODEL, *RUN, "--dataset", corpus, "--out_dir", str(tmp_path / "out"),
                  "--tensor_parallel_size", "2", "--n_head", "3", "--n_embd", "48", expect=None)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("forge-train: error:")]
    assert len(lines) == 1 and "n_head=3 is not divisible by tensor_parallel_size=2" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)
def test_pp2_under_torchrun_matches_one_process(corpus, tmp_path):
    """Pipeline parallelism (1f1b, 2 stages of a 4-layer model, 2 micro-batches): the losses,
    gradient norms, validation losses, weights and sample of one process with the same flags. The
    numerics of every schedule and layout are tests/dist/test_pp_parity.py's."""
    args = ["--n_layer", "4", *MODEL[2:], *RUN, *SAMPLE, "--dataset", corpus, "--max_iters", "6",
            "--eval_interval", "5", "--grad_clip", "1.0"]
    ref = single(*args, "--out_dir", str(tmp_path / "ref"))
    pp = torchrun(2, *args, "--out_dir", str(tmp_path / "pp2"), "--pipeline_parallel_size", "2", timeout=250)
    for key in ("loss", "grad_norm", "val_loss"):
        want = series(tmp_path / "ref", key)
        assert_close_series(series(tmp_path / "pp2", key), want, 1e-5, sorted(want))
    assert_weights_close(weights(tmp_path / "pp2"), weights(tmp_path / "ref"), 1e-5)
    assert sample_of(pp.stdout) == sample_of(ref.stdout)


@pytest.mark.timeout(420)
def test_pp2_checkpoint_resumes_in_one_process_and_back(corpus, tmp_path):
    """Layout-free pipelined checkpoints: the PP=2 (sharded) checkpoint at iteration 5 resumes in one process
    and at TP=2 x PP=2, and the one-process checkpoint resumes at PP=2, each continuing the
    uninterrupted one-process run (loss of iteration 5, weights and the one-process AdamW state at 6)."""
    args = ["--n_layer", "4", *MODEL[2:], *RUN, *NO_SAMPLE, "--dataset", corpus, "--max_iters", "6",
            "--eval_interval", "5"]
    pp_flags = ["--pipeline_parallel_size", "2"]
    single(*args, "--out_dir", str(tmp_path / "ref"))
    torchrun(2, *args, *pp_flags, "--out_dir", str(tmp_path / "pp2"), timeout=250)
    resume = [*args, "--init_from", "resume", "--init_from_ckpt"]
    single(*resume, os.path.join(tmp_path, "pp2", "checkpoints", "iter_0000005"), "--out_dir", str(tmp_path / "to1"))
    torchrun(2, *resume, os.path.join(tmp_path, "ref", "checkpoints", "iter_0000005"), *pp_flags,
             "--out_dir", str(tmp_path / "to2"), timeout=250)
    torchrun(4, *resume, os.path.join(tmp_path, "pp2", "checkpoints", "iter_0000005"), *pp_flags,
             "--tensor_parallel_size", "2", "--out_dir", str(tmp_path / "to_tp2pp2"), timeout=250)
    from forge_dist.train.sharded_save import is_sharded_checkpoint

    # launched pipelined runs write the sharded format (each stage rank its own tensors): PP=2 -> 1 reshards
    assert is_sharded_checkpoint(os.path.join(tmp_path, "pp2", "checkpoints", "iter_0000005"))
    want = {5: series(tmp_path / "ref")[5]}
    for out in (tmp_path / "pp2", tmp_path / "to1", tmp_path / "to2", tmp_path / "to_tp2pp2"):
        assert_close_series({5: series(out)[5]}, want, 1e-5, (5,))
        assert_weights_close(weights(out), weights(tmp_path / "ref"), 1e-5)
        got, ref = _optimizer_state(out), _optimizer_state(tmp_path / "ref")
        assert got["state"].keys() == ref["state"].keys() and got["param_groups"] == ref["param_groups"]
        for i, moments in ref["state"].items():
            assert int(got["state"][i]["step"]) == int(moments["step"]) == 6
            for k in ("exp_avg", "exp_avg_sq"):
                a, b = got["state"][i][k], moments[k]
                assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-4, (out, i, k)
