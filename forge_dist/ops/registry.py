"""Which implementation each op uses: the fused kernels where loaded, else the reference.

FORGE_OPS (read when the process first asks, or on ``refresh()``):
  auto       (default) kernels where available: a prebuilt library, else a JIT build on first use;
             anything that fails falls back to the references with one warning saying why;
  reference  the pure-PyTorch references everywhere (parity runs, debugging);
  kernels    like auto, but an unavailable library is an error instead of a fallback.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from forge_dist.ops import builder

MODES = ("auto", "reference", "kernels")
OP_NAMES = ("norm_fwd", "norm_bwd", "score_elementwise_fwd", "score_elementwise_bwd", "score_rownorm_fwd",
            "score_rownorm_bwd", "fake_quantize", "int8_linear")
# "<date>, <GPU>, torch <version>" once bench/gpu_check.sh has passed on a GPU and its output is recorded
# in docs/BENCHMARKS.md; until then the CUDA kernels are reported "unverified on GPU".
GPU_VERIFIED: Optional[str] = None


@dataclass
class LibraryState:
    mode: str = "auto"
    source: Optional[str] = None  # "prebuilt" | "jit" | None (not loaded)
    path: Optional[str] = None
    reason: str = "not loaded yet (loads on first use)"
    devices: frozenset = frozenset()  # device types with a kernel for every op
    tried: bool = False
    warned: Dict[str, bool] = field(default_factory=dict)


_STATE = LibraryState()
_LOCK = threading.Lock()


def mode() -> str:
    value = os.environ.get("FORGE_OPS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"FORGE_OPS={value!r}; valid values: {', '.join(MODES)}")
    return value


def _devices_with_kernels() -> frozenset:
    def has(op: str, key: str) -> bool:
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"forge_ops::{op}", key)
        except RuntimeError:  # an operator the loaded library does not define
            return False

    return frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if all(has(op, key) for op in OP_NAMES))


def _already_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("forge_ops::norm_fwd", "CPU")
    except RuntimeError:  # the operator does not exist: no library loaded
        return False


def _log(message: str) -> None:
    if os.environ.get("FORGE_OPS_QUIET") != "1":
        print(message, flush=True)


def _load_library() -> None:
    """Prebuilt, else JIT; records the outcome in _STATE (never raises in auto mode)."""
    prebuilt, why_not = builder.find_prebuilt()
    try:
        if prebuilt is not None:
            torch.ops.load_library(str(prebuilt))
            _STATE.source, _STATE.path = "prebuilt", str(prebuilt)
        else:
            with_cuda = builder.cuda_toolkit() is not None and torch.cuda.is_available()
            path, _ = builder.jit_build(with_cuda, log=_log)
            torch.ops.load_library(str(path))
            _STATE.source, _STATE.path = "jit", str(path)
        _STATE.reason = ""
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use the references
        _STATE.source, _STATE.reason = None, f"{why_not}; JIT build unavailable: {e}"
        return
    from forge_dist.ops import autograd  # registers fake tensors and gradients for the loaded ops

    autograd.register_all()
    _STATE.devices = _devices_with_kernels()


def ensure_loaded() -> LibraryState:
    """Loads the library once per process (thread-safe); returns the state."""
    if _STATE.tried:
        return _STATE
    with _LOCK:
        if not _STATE.tried:
            _STATE.mode = mode()
            if _STATE.mode == "reference":
                _STATE.reason = "FORGE_OPS=reference"
            elif _already_registered():  # loaded by someone else in this process (e.g. a test)
                _STATE.source, _STATE.reason = _STATE.source or "jit", ""
                from forge_dist.ops import autograd

                autograd.register_all()
                _STATE.devices = _devices_with_kernels()
            else:
                _load_library()
            _STATE.tried = True
            if _STATE.mode == "kernels" and not _STATE.devices:
                raise RuntimeError(f"FORGE_OPS=kernels but the fused kernels are unavailable: {_STATE.reason}")
    return _STATE


def refresh() -> None:
    """Re-read FORGE_OPS (a loaded library stays loaded; it is only used or not)."""
    with _LOCK:
        _STATE.mode = mode()
        _STATE.warned.clear()
        if _STATE.source is None:
            _STATE.tried = False


_EAGER_LOADER = None


def _ensure_loaded_eager() -> None:
    """ensure_loaded() outside torch.compile's tracing. Decorating at import time would import
    torch._dynamo in every process (seconds per spawned rank); dynamo is only in sys.modules when
    something compiles, and only then does the loader need hiding from it."""
    global _EAGER_LOADER
    if _EAGER_LOADER is None:
        _EAGER_LOADER = torch.compiler.disable(ensure_loaded) if "torch._dynamo" in sys.modules else ensure_loaded
    _EAGER_LOADER()


def kernel_device(t: torch.Tensor, op: str) -> bool:
    """True when ``op`` should run its fused kernel on ``t``'s device; otherwise the caller uses
    the reference, and the first such fallback per op says why (once)."""
    if not _STATE.tried:
        _ensure_loaded_eager()
    if _STATE.mode == "reference":
        return False
    dev = t.device.type
    if dev in _STATE.devices or (dev == "meta" and _STATE.devices):
        return True
    if not _STATE.warned.get(op):
        _STATE.warned[op] = True
        why = _STATE.reason or f"no {dev} kernel in the loaded library"
        warnings.warn(f"forge_dist.ops.{op}: using the PyTorch reference ({why})", RuntimeWarning, stacklevel=3)
    return False


# (input dtype, output dtype) pairs each device's kernels take; anything else uses the reference.
_F32, _F64, _BF16, _F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
IO_DTYPES = {
    "cpu": {(_F32, _F32), (_F64, _F64), (_BF16, _BF16), (_BF16, _F32)},
    "cuda": {(_F32, _F32), (_BF16, _BF16), (_BF16, _F32), (_F16, _F16), (_F16, _F32)},
}
IO_DTYPES["meta"] = IO_DTYPES["cpu"] | IO_DTYPES["cuda"]


_RANK = {_BF16: 1, _F16: 1, _F32: 2, _F64: 3}


def result_dtype(x: torch.Tensor, *params) -> torch.dtype:
    """torch's type promotion of x with its float parameters, in plain Python (torch.result_type
    returns a non-tensor, which torch.compile cannot trace): a dimensioned parameter of a wider float
    type promotes, a 0-d tensor or a Python number does not (same category), bf16 with fp16 gives fp32."""
    dtype = x.dtype
    for p in params:
        if not isinstance(p, torch.Tensor) or p.dim() == 0 or p.dtype == dtype:
            continue
        a, b = _RANK.get(dtype), _RANK.get(p.dtype)
        if a is None or b is None:  # not both floating: leave it to the reference
            continue
        dtype = _F32 if a == b else (dtype if a > b else p.dtype)
    return dtype


def usable(op: str, t: torch.Tensor, out_dtype: Optional[torch.dtype] = None, *others) -> bool:
    """kernel_device, and the dtypes and devices of ``t`` and the tensors in ``others`` suit the kernel."""
    if not kernel_device(t, op):
        return False
    if (t.dtype, out_dtype or t.dtype) not in IO_DTYPES.get(t.device.type, ()):
        return False
    return all(o.device == t.device for o in others if isinstance(o, torch.Tensor))


def state() -> LibraryState:
    return _STATE
