"""A bad parallel setting under torchrun: rank 0 says it in one line, and that line is also the last
thing torchrun's own report shows (the other ranks leave quietly)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bad_parallel_setting_under_torchrun_ends_with_the_reason(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 400),
                        "-m", "forge_dist.train", "--tensor_parallel_size", "3", "--out_dir", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    reason = "forge-train: error: world size 2 is not a product of tensor_parallel_size=3"
    assert sum(line.startswith(reason) for line in text.splitlines()) == 1, text  # rank 0 alone
    last = [line for line in text.splitlines() if line.strip() and set(line.strip()) != {"="}][-1]
    assert last.strip().startswith("traceback : " + reason), text[-1500:]
    assert not (tmp_path / "out").exists()
