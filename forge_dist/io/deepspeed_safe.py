"""DeepSpeed checkpoints read without running code from them.

DeepSpeed 0.19.8 reads its own ``*.pt`` files with ``torch.load(weights_only=False)`` (its
TorchCheckpointEngine, ``zero_to_fp32``), so a checkpoint from an untrusted source can execute
anything when unpickled. forge_dist reads them with ``weights_only=True`` instead, with an explicit
allow-list of the few DeepSpeed classes its files hold (ALLOWED: the loss scaler, the ZeRO stage
enum, ZeRO-1/2's fragment addresses; found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
on checkpoints of every ZeRO stage, fp32 and bf16). Anything else is refused with a
CheckpointError naming the object, before it is built:

    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)  # DeepSpeed's loads
    with weights_only_loads(ckpt):   # every torch.load inside (zero_to_fp32, DeepSpeed's other paths)
        ...
    state = safe_load(path)          # one file
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from typing import Iterator, List

import torch

from forge_dist.errors import CheckpointError

# (module, name): plain data holders, built with __new__ and a __dict__ update (no code of theirs runs)
ALLOWED = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # fp16 (GPU only: unverified here)
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load honours it even where weights_only=False is passed


def allowed_globals() -> List[type]:
    """The ALLOWED classes (DeepSpeed imported); a missing one is skipped (it cannot be in a file
    this DeepSpeed wrote, and an older file naming it is refused)."""
    out = []
    for module, name in ALLOWED:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return out


def refusal(path: str, error: Exception) -> CheckpointError:
    """The CheckpointError for a file the restricted unpickler stopped at ``error``."""
    text = " ".join(str(error).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = found.group(1) if found else text[:200]
    allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED)
    return CheckpointError(
        f"refused DeepSpeed checkpoint file {path}: it holds {what}, which is not a tensor, a plain Python value "
        f"or one of the DeepSpeed classes forge_dist allows ({allowed}). Unpickling it could run code from the "
        f"file, so it was not loaded; use checkpoints only from runs you trust, or re-save this one from such "
        f"a run")


def safe_load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) with the DeepSpeed allow-list; refusals as CheckpointError."""
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None


@contextlib.contextmanager
def weights_only_loads(where: str) -> Iterator[None]:
    """Every torch.load in this block (this process) is weights_only=True with the allow-list, even
    one that passes weights_only=False (DeepSpeed's zero_to_fp32 and its loads that bypass the
    checkpoint engine). A refused file raises CheckpointError naming ``where`` (the checkpoint)."""
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise refusal(f"in {where}", e) from None
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` replaced by safe_load; everything else (how and
    which ranks write) is the wrapped engine's. DeepSpeed 0.19.8 builds its engine from the config
    in ``initialize`` and calls it through ``engine.checkpoint_engine``, which is where this goes."""

    def __init__(self, inner):
        self.inner = inner
        self.name = f"forge_dist.safe({getattr(inner, 'name', type(inner).__name__)})"

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")

    def __getattr__(self, name):  # create, save, commit, makedirs, is_data_parallel_writer, ...
        return getattr(self.inner, name)


def install(ds_engine) -> SafeCheckpointEngine:
    """Put a SafeCheckpointEngine in front of ``ds_engine``'s checkpoint engine (once)."""
    current = ds_engine.checkpoint_engine
    if not isinstance(current, SafeCheckpointEngine):
        ds_engine.checkpoint_engine = SafeCheckpointEngine(current)
    return ds_engine.checkpoint_engine
