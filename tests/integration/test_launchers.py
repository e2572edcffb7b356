"""launcher/: every script parses, and the torchrun wrapper trains a tiny TP=2 model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "launcher").iterdir() if p.suffix in (".sh", ".sbatch"))
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--block_size", "16", "--batch_size", "4",
        "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "2", "--no-progress"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_is_valid_bash(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_torchrun_wrapper_trains_tensor_parallel(tmp_path):
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_PORT=str(29700 + os.getpid() % 200),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run([str(ROOT / "launcher" / "torchrun.sh"), "--tensor_parallel_size", "2",
                        "--out_dir", str(tmp_path / "out"), *TINY], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(rec["loss"] == rec["loss"] for rec in records if "loss" in rec)
