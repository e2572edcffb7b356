"""``forge_dist.from_pretrained(path)``: one entry point for every checkpoint we can read."""
from __future__ import annotations

import os
from typing import Optional

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io import forge_format, reallm_forge


def checkpoint_kind(path: str) -> str:
    """"forge" (our directory), "reallm-forge" (a ckpt.pt or an out_dir holding one), "hf" (a
    transformers model directory)."""
    from forge_dist.io.hf.files import is_hf_directory

    path = os.fspath(path)
    if forge_format.is_forge_checkpoint(path):
        return "forge"
    if is_hf_directory(path):
        return "hf"
    if os.path.isfile(path) and path.endswith(".pt"):
        return "reallm-forge"
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, reallm_forge.CKPT_NAME)):
        return "reallm-forge"
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(
        f"{path} is not a checkpoint forge_dist can read: expected a forge_dist directory "
        f"({forge_format.CONFIG_NAME} + {forge_format.WEIGHTS_NAME}), a ReaLLM-Forge ckpt.pt, an "
        f"out_dir holding ckpt.pt, or a transformers model directory (config.json + safetensors)")


def load_any(path: str):
    """(GPT in train mode, training info dict) from any format above."""
    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "forge":
        return forge_format.load_pretrained(path)
    if kind == "hf":
        from forge_dist.io.hf import load_hf

        return load_hf(path)
    return reallm_forge.load_ckpt(path)


def open_slices_any(path: str):
    """(model config, SliceReader) of a ReaLLM-Forge ckpt.pt or a transformers directory, for a
    rank that reads only its pieces (``--init_from prev_run``); nothing is converted whole.
    Our own directories: io/slice_read.py ``open_slices``."""
    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        from forge_dist.io.hf.slices import HfSlices

        reader = HfSlices(path)
        return reader.config, reader
    if kind == "reallm-forge":
        return reallm_forge.open_slices(path)
    raise CheckpointError(f"{path} is a forge_dist directory: open it with io.slice_read.open_slices")


def from_pretrained(path: str, dtype: Optional[torch.dtype] = None, device=None):
    """The GPT stored at ``path`` in eval mode (float32 unless ``dtype``), on ``device`` (CPU)."""
    model, _ = load_any(path)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
