"""``forge-ops-report`` (also ``python tools/op_report.py``): what forge_dist.ops runs here, and why.

Prints the torch / compiler / CUDA versions, where the kernel library comes from (prebuilt, JIT-built
into the cache, or not available and why), and for every op and device whether it runs its fused
kernel or falls back to the reference. CUDA kernels are reported "unverified on GPU" until
bench/gpu_check.sh has passed on a GPU (recorded in registry.GPU_VERIFIED and docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from forge_dist.ops import builder, registry

# user-facing op -> the library operator it runs (None: reference only, with the reason)
OPS: Dict[str, Optional[str]] = {
    "rms_norm": "norm_fwd", "partial_rms_norm": "norm_fwd", "add_rms_norm": "norm_fwd",
    "hypersphere_norm": "norm_fwd", "layer_norm": "norm_fwd",
    **{name: "score_elementwise_fwd" for name in (
        "consmax", "saturating_consmax", "polymax", "vpolymax", "exppolymax", "relumax", "relu2max", "sigmoidmax",
        "softplus", "squareplus")},
    **{name: "score_rownorm_fwd" for name in ("softmax", "softermax", "strongermax", "sigsoftmax")},
    "fake_quantize": "fake_quantize", "int8_linear": "int8_linear",
    "attention": "attention_fwd",  # fused attention over the score normalisers (CUDA: FlexAttention route)
    "k_rms_norm": None,
}
REFERENCE_ONLY = {"k_rms_norm": "reference only (gathers, quantizes)"}


def _first_line(cmd: List[str], last: bool = False) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"
    return (out[-1] if last else out[0]) if out else "?"


def environment() -> List[str]:
    from torch.utils.cpp_extension import is_ninja_available

    cuda = torch.version.cuda or "none (CPU build)"
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "none visible")
    return [f"python     {sys.version.split()[0]} ({platform.machine()})",
            f"torch      {torch.__version__}, CUDA {cuda}, GPU: {gpu}",
            f"compiler   {_first_line(['c++', '--version'])}; ninja {'yes' if is_ninja_available() else 'no'}",
            f"nvcc       {_first_line(['nvcc', '--version'], last=True)}",
            f"FORGE_OPS  {registry.mode()}; cache {builder.cache_root()}"]


def _cuda_reason(state: registry.LibraryState) -> str:
    if torch.version.cuda is None:
        return "falling back: torch is a CPU build (no CUDA kernels compiled)"
    if not torch.cuda.is_available():
        return "falling back: no GPU visible"
    if builder.cuda_toolkit() is None:
        return "falling back: no CUDA toolkit found (CUDA_HOME)"
    return f"falling back: {state.reason or 'the loaded library has no CUDA kernels'}"


def op_table(state: registry.LibraryState) -> List[str]:
    origin = {"prebuilt": "prebuilt", "jit": "JIT-built"}.get(state.source or "", "")
    devices = ["cpu", "cuda"]
    rows = [f"{'op':20s} " + " ".join(f"{d:34s}" for d in devices)]
    for op, lib_op in OPS.items():
        cells = []
        for dev in devices:
            if lib_op is None:
                cell = REFERENCE_ONLY[op]
            elif state.mode == "reference":
                cell = "reference (FORGE_OPS=reference)"
            elif dev in state.devices:
                cell = origin + (" (unverified on GPU)" if dev == "cuda" and not registry.GPU_VERIFIED else "")
            elif dev == "cuda":
                cell = _cuda_reason(state)
            else:
                cell = f"falling back: {state.reason}"
            cells.append(f"{cell:34s}")
        rows.append(f"{op:20s} " + " ".join(cells))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="forge-ops-report", description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true",
                        help="only report; do not compile the library if this machine has no build yet")
    args = parser.parse_args(argv)
    print("\n".join(environment()))
    if args.no_build and registry.mode() != "reference":
        prebuilt, why = builder.find_prebuilt()
        key = builder.build_key(builder.cuda_toolkit() is not None and torch.cuda.is_available())
        built = (builder.cache_root() / key / "BUILT").is_file()
        print(f"library    {'prebuilt ' + str(prebuilt) if prebuilt else why}; "
              f"JIT cache {'has' if built else 'has no'} a build for key {key}")
        return 0
    state = registry.ensure_loaded()
    where = {"prebuilt": "prebuilt", "jit": "JIT-built"}.get(state.source or "", "not loaded")
    print(f"library    {where}" + (f": {state.path}" if state.path else f" ({state.reason})"))
    print(f"GPU        {'verified: ' + registry.GPU_VERIFIED if registry.GPU_VERIFIED else 'CUDA kernels unverified on GPU (bench/gpu_check.sh has not passed on a GPU yet)'}")
    print()
    print("\n".join(op_table(state)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
