"""``--device`` and ``--dtype``: what ``auto`` means here, and the combinations that cannot run,
refused before anything is built (shared by forge-train, forge-sample and forge-eval), and the
accelerator noise of the libraries we drive."""
from __future__ import annotations

import os
import warnings

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


def quiet_libraries() -> None:
    """Silence what is not ours to fix: DeepSpeed warns "Setting accelerator to CPU" on every
    import where it has to guess (so we tell it, when no GPU is visible), and torch deprecates
    collectives that DeepSpeed still calls."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf".*{name}` is deprecated", category=FutureWarning)
