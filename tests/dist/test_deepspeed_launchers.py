"""forge-train --deepspeed_config under DeepSpeed's launcher (the sharded checkpoint, each rank its
partitions), torchrun (its resume, bit for bit, writing the gathered format on), one process (resume
on one replica) and mpirun (no MPI discovery); then DeepSpeed checkpoints carrying a code-running
pickle payload, refused on resume and by forge-convert without the payload ever running."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deepspeed_harness import CONFIGS

pytestmark = [pytest.mark.dist, pytest.mark.slow]


# --- forge-train --deepspeed_config under the launchers ----------------------------------------------
CLI = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--dropout", "0.0",
       "--batch_size", "2", "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1",
       "--device", "cpu", "--dtype", "float32", "--no-tensorboard_log", "--no-progress", "--max_sample_tokens", "8",
       "--always_save_checkpoint", "--lr_scheduler", "cosine", "--warmup_iters", "2", "--lr_decay_iters", "6"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)  # the venv's own script


def _launch(cmd, extra_env=None, timeout=180, check=True):
    from forge_dist.testing.spawn import free_port

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(FORGE_OPS="reference", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_PORT=str(free_port()), **(extra_env or {}))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 or not check, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _losses(out_dir, key="loss"):
    from forge_dist.train.metrics import read_metrics

    return {r["iter"]: r[key] for r in read_metrics(str(out_dir)) if key in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from forge_dist.data.prepare import prepare_default_dataset

    return str(prepare_default_dataset(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def ds_launch(corpus, tmp_path_factory):
    """DeepSpeed's launcher, 2 ranks, ZeRO-2 fp32, 6 iterations, checkpoints at 3 and 6: the sharded
    format (``auto`` for a launched run: each rank writes its ZeRO partitions)."""
    from forge_dist.testing.spawn import free_port

    out = tmp_path_factory.mktemp("dslaunch") / "out"
    _launch([_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "forge_dist.train",
             "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"), *CLI, "--dataset", corpus,
             "--out_dir", str(out)])
    return out


def test_deepspeed_launcher_trains_and_checkpoints(ds_launch):
    losses = _losses(ds_launch)
    assert sorted(losses) == list(range(6)) and losses[5] < losses[0]
    ckpt_dir = os.path.join(ds_launch, "checkpoints", "iter_0000003")
    assert {"model", "manifest.json", "optimizer.json", "trainer_state.json"} <= set(os.listdir(ckpt_dir))
    assert not {"deepspeed", "deepspeed_logical.json"} & set(os.listdir(ckpt_dir))  # nothing gathered
    files = sorted(os.listdir(os.path.join(ckpt_dir, "model", "dcp")))
    assert files == [".metadata.json", "__0_0.distcp", "__1_0.distcp"], files  # each rank its partitions
    with open(os.path.join(ckpt_dir, "optimizer.json")) as fh:
        assert json.load(fh)["engine"] == "deepspeed"


@pytest.fixture(scope="module")
def ds_resumed(ds_launch, tmp_path_factory):
    """torchrun resuming ds_launch's sharded iteration 3 at the same layout, writing the gathered
    format from there (DeepSpeed's own files at iteration 6, which the hostile tests poison)."""
    from forge_dist.testing.spawn import free_port

    out = tmp_path_factory.mktemp("dsresumed") / "out"
    shutil.copytree(ds_launch, out)
    _launch([_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "forge_dist.train", "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"), *CLI,
             "--out_dir", str(out), "--init_from", "resume", "--init_from_ckpt", "iter_0000003",
             "--checkpoint_format", "gathered"])
    return out


def test_resume_under_torchrun_continues_exactly(ds_launch, ds_resumed):
    full, resumed = _losses(ds_launch), _losses(ds_resumed)
    assert [resumed[i] for i in range(3, 6)] == [full[i] for i in range(3, 6)]  # bit for bit
    assert _losses(ds_resumed, "val_loss")[6] == _losses(ds_launch, "val_loss")[6]
    ckpt_dir = os.path.join(ds_resumed, "checkpoints", "iter_0000006")
    with open(os.path.join(ckpt_dir, "deepspeed", "forge_layout.json")) as fh:
        assert json.load(fh)["layout"]["dp_size"] == 2


def test_resume_on_one_process_from_two(ds_launch, tmp_path):
    """DP 2 -> 1 through forge-train: the global batch stays 4 (--batch_size 2 x 2 -> 4 x 1)."""
    out = tmp_path / "out"
    shutil.copytree(ds_launch, out)
    _launch([sys.executable, "-m", "forge_dist.train", "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"),
             *CLI, "--batch_size", "4", "--out_dir", str(out), "--init_from", "resume", "--init_from_ckpt",
             "iter_0000003"])
    full, resumed = _losses(ds_launch), _losses(out)
    assert max(abs(resumed[i] - full[i]) / full[i] for i in range(3, 6)) <= 1e-5


def test_mpirun_keeps_rendezvous_on_loopback(ds_launch, corpus, tmp_path):
    """Under mpirun our launcher detection exports all five rendezvous variables, so DeepSpeed never
    runs its MPI discovery (which takes ``hostname -I``, not loopback here): a ``hostname`` on PATH
    that records any call with -I stays silent. ZeRO-3 from scratch matches the ZeRO-2 run."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    shim, marker, real = tmp_path / "bin", tmp_path / "hostname_I_called", shutil.which("hostname") or "hostname"
    shim.mkdir()
    (shim / "hostname").write_text(f"#!/bin/sh\n[ \"$1\" = -I ] && touch {marker} && echo 192.0.2.99 && exit 0\n"
                                   f"exec {real} \"$@\"\n")
    (shim / "hostname").chmod(0o755)
    out = tmp_path / "out"
    _launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "forge_dist.train",
             "--deepspeed_config", os.path.join(CONFIGS, "zero3_fp32.json"), *CLI, "--max_iters", "3",
             "--dataset", corpus, "--out_dir", str(out)],
            extra_env={"PATH": f"{shim}:{os.environ['PATH']}", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
                       "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_btl": "self,vader,tcp"})
    assert not marker.exists()
    zero3, zero2 = _losses(out), _losses(ds_launch)
    assert sorted(zero3) == [0, 1, 2]
    assert max(abs(zero3[i] - zero2[i]) / zero2[i] for i in range(3)) <= 1e-6


# --- hostile checkpoints: nothing in DeepSpeed's files is unpickled ----------------------------------
def _poisoned_copy(ds_resumed, tmp_path, pattern):
    """A copy of the run whose iteration-6 DeepSpeed files matching ``pattern`` each carry a
    code-running payload, the manifest re-sealed around them (as an attacker would); returns
    (out_dir, checkpoint, marker files the payloads would create)."""
    from forge_dist.testing.hostile import plant_payload, reseal

    out = tmp_path / "out"
    shutil.copytree(ds_resumed, out)
    ckpt = out / "checkpoints" / "iter_0000006"
    files = sorted(glob.glob(str(ckpt / "deepspeed" / "*" / pattern)))
    assert files, pattern
    control = tmp_path / "control_ran"  # the payload is live: DeepSpeed's torch.load would run it
    plant_payload(shutil.copy(files[0], tmp_path / "control.pt"), str(control))
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    markers = [tmp_path / f"payload_ran_{i}" for i in range(len(files))]
    for f, marker in zip(files, markers):
        plant_payload(f, str(marker))
    reseal(str(ckpt))
    return out, ckpt, markers


def test_code_in_a_deepspeed_checkpoint_never_runs_on_resume(ds_resumed, tmp_path):
    """torchrun resume at the saved layout (DeepSpeed reads its own ZeRO-2 files) of a checkpoint
    whose optimizer partitions carry a payload: refused with the file named, the payload never runs."""
    from forge_dist.testing.spawn import free_port

    out, _, markers = _poisoned_copy(ds_resumed, tmp_path, "*_optim_states.pt")
    proc = _launch([_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "-m", "forge_dist.train", "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"), *CLI,
                    "--max_iters", "8", "--out_dir", str(out), "--init_from", "resume", "--init_from_ckpt",
                    "iter_0000006"], check=False)
    assert proc.returncode != 0
    assert "refused DeepSpeed checkpoint file" in proc.stderr, proc.stderr[-3000:]
    assert "io.open" in proc.stderr
    assert not any(m.exists() for m in markers)


def test_code_in_a_deepspeed_checkpoint_never_runs_in_forge_convert(ds_resumed, tmp_path, capsys):
    """forge-convert --to forge (streaming the partitions through deepspeed_safe's allow-list, where
    DeepSpeed's zero_to_fp32 would pass weights_only=False) refuses a payload in the model states and
    in the optimizer partitions."""
    from forge_dist.io.convert import main as convert_main

    for pattern in ("*_model_states.pt", "*_optim_states.pt"):
        sub = tmp_path / pattern.strip("*_.pt")
        sub.mkdir()
        _, ckpt, markers = _poisoned_copy(ds_resumed, sub, pattern)
        assert convert_main([str(ckpt), str(sub / "model"), "--to", "forge"]) == 2
        err = capsys.readouterr().err
        assert "refused DeepSpeed checkpoint file" in err and "io.open" in err, err
        assert not any(m.exists() for m in markers) and not (sub / "model").exists()
