"""The one-process optimizer state a native engine (LocalEngine, ParallelEngine) resumes from,
whichever engine wrote the checkpoint.

forge_dist's own engines write ``optimizer.*``: torch AdamW's state dict of the one-process model
(parallel engines gather it). The DeepSpeed engine writes its files plus a logical copy,
``deepspeed_logical.*``: fp32 master weights, exp_avg, exp_avg_sq and the step by parameter name,
ZeRO partitions and TP shards joined (train/deepspeed_logical.py). That copy is turned into the
same state dict here, ordered by this run's optimizer, so a run trained at any ZeRO stage resumes
without DeepSpeed (no ZeRO) and continues exactly: the weights come from the checkpoint's model/
(the same fp32 masters), the moments and step from the logical copy.
"""
from __future__ import annotations

import os

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io.deepspeed_ckpt import LOGICAL_FORMAT, LOGICAL_NAME
from forge_dist.io.statefile import load_state
from forge_dist.train.deepspeed_logical import one_process_adamw_state


def require_optimizer_files(directory: str) -> None:
    """A checkpoint written by another engine (DeepSpeed keeps its own files) is named as such."""
    if not os.path.isfile(os.path.join(directory, "optimizer.json")):
        raise CheckpointError(f"{directory} has no optimizer state of forge_dist's own engine (optimizer.json); "
                              f"it was written by another engine (e.g. DeepSpeed): resume with the same "
                              f"--deepspeed_config, or start from its weights with --init_from prev_run")


def read_optimizer_state(directory: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                         map_location="cpu") -> dict:
    """``{"optimizer": state dict, "scaler": ...}`` of the checkpoint ``directory`` for ``optimizer``
    over ``model`` (names from model.named_parameters; the one-process order, as a parallel
    engine's own files have it). Full tensors: a parallel engine slices its shards."""
    if not os.path.isfile(os.path.join(directory, "optimizer.json")) and os.path.isfile(
            os.path.join(directory, f"{LOGICAL_NAME}.json")):
        return from_deepspeed_logical(load_state(directory, LOGICAL_NAME, map_location=map_location), optimizer,
                                      model, directory)
    require_optimizer_files(directory)
    return load_state(directory, "optimizer", map_location=map_location)


def from_deepspeed_logical(logical: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                           source: str = "the checkpoint") -> dict:
    """torch AdamW's state dict (this run's groups and hyperparameters) filled from DeepSpeed's
    logical copy (deepspeed_logical.one_process_adamw_state, numbered in this optimizer's order)."""
    if logical.get("format") != LOGICAL_FORMAT:
        raise CheckpointError(f"{source}: not a forge_dist logical optimizer state (format {logical.get('format')!r})")
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise CheckpointError(f"{source} holds AdamW state from DeepSpeed; this run steps with "
                              f"{type(optimizer).__name__}")
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    order = [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]
    missing = [n for names_ in order for n in names_ if n not in logical["params"]]
    if missing:
        raise CheckpointError(f"{source}: the DeepSpeed optimizer state has no {missing[:4]}; it is from another "
                              f"model")
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"optimizer": one_process_adamw_state(logical, order, hyper), "scaler": None}
