"""Fixtures shared by the spawned-world tests."""
import time

import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """A directory of this test module's own, shared by the worlds its fixtures spawn in turn (one
    saves, the next resumes)."""
    return str(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


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


@pytest.fixture(scope="session")
def deepspeed_aio_op():
    """DeepSpeed's async_io op (NVMe offload; with pin_memory, which it loads first), JIT-built here
    once per machine like deepspeed_adam_ops. It links libaio: install.sh installs libaio-dev."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if not builder.is_compatible():
        pytest.fail("DeepSpeed's async_io op needs libaio (apt-get install libaio-dev; install.sh does it)")
    start = time.perf_counter()
    builder.load(verbose=False)
    print(f"\nDeepSpeed async_io loaded (built on first use) in {time.perf_counter() - start:.1f} s", end="")
