"""``--device`` and ``--dtype``: what ``auto`` means here, and the combinations that cannot run,
refused before anything is built (shared by forge-train, forge-sample and forge-eval)."""
from __future__ import annotations

import torch

from forge_dist.errors import ConfigError


def resolve_device(device: str) -> str:
    """auto -> cuda if a GPU is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """auto -> bfloat16 on a GPU that supports it, else float32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def check_device(device: str, dtype: str) -> None:
    """The device/dtype combinations that cannot run here, refused with what to use instead."""
    if not device.startswith(("cpu", "cuda")):
        raise ConfigError(f"device={device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use --device cpu")
    if dtype == "float16" and not device.startswith("cuda"):
        raise ConfigError("dtype=float16 runs on CUDA GPUs only (with a gradient scaler for training); "
                          "use --dtype bfloat16 (or float32) on CPU")
