"""Fixtures shared by the spawned-world tests."""
import time

import pytest


@pytest.fixture(scope="session")
def deepspeed_adam_ops():
    """DeepSpeed's fused_adam and cpu_adam ops, the optimizers a DeepSpeed config's "optimizer"
    section builds (FusedAdam; DeepSpeedCPUAdam under offload_optimizer), JIT-built here once per
    machine into TORCH_EXTENSIONS_DIR (tests/conftest.py: the checkout's .torch_extensions/) before
    any spawned world loads them: both are built at most once per CI run (cached: under a second)."""
    from deepspeed.accelerator import get_accelerator

    seconds = {}
    for name in ("FusedAdamBuilder", "CPUAdamBuilder"):
        start = time.perf_counter()
        get_accelerator().create_op_builder(name).load(verbose=False)
        seconds[name] = round(time.perf_counter() - start, 1)
    print(f"\nDeepSpeed ops loaded (built on first use) in seconds: {seconds}", end="")
    return seconds
