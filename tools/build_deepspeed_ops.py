"""Build DeepSpeed's CPU ops that the tests load (FusedAdam, DeepSpeedCPUAdam, async_io for NVMe
offload) into TORCH_EXTENSIONS_DIR ahead of time: ``./install.sh --test`` runs it, so the suite
loads them from that cache instead of compiling them inside a test (about 6 minutes on 2 cores,
once per machine). A run that needs an op this did not build still JIT-builds it on first use."""
import os
import sys
import time


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    for name in ("FusedAdamBuilder", "CPUAdamBuilder", "AsyncIOBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if not builder.is_compatible():
            print(f"build_deepspeed_ops: {name} cannot build here (async_io needs libaio-dev)", file=sys.stderr)
            return 1
        start = time.perf_counter()
        builder.load(verbose=False)
        print(f"build_deepspeed_ops: {name} ready in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
