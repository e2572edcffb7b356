"""Sharded checkpoints of a tensor-parallel model and its AdamW state on torch.distributed.checkpoint.

    files = save_sharded(directory, model, optimizer, groups)    # collective; this rank's files
    future = async_save_sharded(directory, model, optimizer, groups)   # written in the background
    load_sharded(directory, model, optimizer, groups)            # collective; any TP/DP layout

Entries, under logical names and shapes (the names of the single-process model's state dict):
``model/<name>`` for every parameter and persistent buffer, ``optim/<name>/exp_avg``,
``optim/<name>/exp_avg_sq`` (sharded like the parameter) and ``optim/<name>/step``. Each rank
writes only its pieces (forge_dist.parallel.sharded_state), DCP deduplicates replicas, and the
index is JSON (forge_dist.io.dcp_storage): nothing is unpickled on load. Loading asks DCP for
the pieces of the current layout, so TP 2 -> 1, 1 -> 2, 2 -> 4 and any data-parallel size resume
from the same files without any rank holding a full tensor.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import Future
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.staging import AsyncStager

from forge_dist.errors import CheckpointError
from forge_dist.io.dcp_storage import JsonMetadataReader, JsonMetadataWriter, read_index, single_process_quiet
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.zero import local_optimizers, local_state
from forge_dist.parallel.sharded_state import LocalShards, ShardLoadPlanner, ShardSavePlanner
from forge_dist.parallel.tensor.metadata import shard_info

MOMENTS = ("exp_avg", "exp_avg_sq")


def _unique_named(model: nn.Module, writing: bool = False):
    """(name, tensor) of every parameter and persistent buffer, tied tensors under their first name;
    a model of pipeline stages names its own (``logical_tensors``: one-process names, and when
    ``writing`` only the tensors this rank owns)."""
    if hasattr(model, "logical_tensors"):
        return model.logical_tensors(writing)
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def param_names(model: nn.Module, optimizer) -> List[str]:
    """The logical name of every optimizer parameter, in the optimizer's order (the one-process
    state dict's indices: io.sharded_read.one_process_optimizer_state)."""
    names = {id(t): n for n, t in _unique_named(model)}
    return [names.get(id(p), f"#{i}") for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]


def sharded_state(model: nn.Module, optimizer, groups: Optional[ProcessGroups],
                  writing: bool = False) -> Dict[str, object]:
    """The DCP state dict of this rank (views of the live tensors: a load writes into them)."""
    state: Dict[str, object] = {}
    for name, t in _unique_named(model, writing):
        info = shard_info(t)
        state[f"model/{name}"] = LocalShards.of(t.data, info, groups)
        # ZeRO-1: this replica's part only (the parameters it owns); the other replicas write theirs
        opt = _owned_state(model, optimizer, name, t)[1]
        if opt:
            for key in MOMENTS:
                state[f"optim/{name}/{key}"] = LocalShards.of(opt[key], info, groups)
            step = opt["step"]
            state[f"optim/{name}/step"] = step if torch.is_tensor(step) else torch.tensor(float(step))
    return state


def _copies(model: nn.Module, name: str, t: torch.Tensor) -> list:
    """Every local Parameter of the logical tensor ``name``: several where pipeline stages on this
    rank hold separately sharded copies that train equal (LocalStages.local_copies), else [t]."""
    fn = getattr(model, "local_copies", None)
    return (fn(name) or [t]) if fn is not None else [t]


def _owned_state(model: nn.Module, optimizer, name: str, t: torch.Tensor):
    """(copy, AdamW state) of the local copy of ``name`` whose state this replica holds (under
    ZeRO-1 one it owns), or (t, None)."""
    if optimizer is None or not isinstance(t, nn.Parameter):
        return t, None
    local = local_state(optimizer)
    for c in _copies(model, name, t):
        if local.get(c):
            return c, local[c]
    return t, None


@torch.no_grad()
def _fill_copies(model: nn.Module, optimizer) -> None:
    """After a load: the other local copies of a tensor (the V-shape's tied table and head) take the
    loaded one's value, and its AdamW state where this replica steps them."""
    for name, t in _unique_named(model):
        copies = _copies(model, name, t)
        if len(copies) < 2:
            continue
        for c in copies[1:]:
            c.copy_(copies[0])
        owner, state = _owned_state(model, optimizer, name, t)
        if state:
            for opt in local_optimizers(optimizer):  # set in the optimizer that steps the copy
                for c in copies:
                    if c is not owner and c in opt.state:
                        opt.state[c] = {k: v.clone() for k, v in state.items()}


def save_sharded(directory: str, model: nn.Module, optimizer, groups: Optional[ProcessGroups],
                 process_group=None, state: Optional[Dict[str, object]] = None) -> List[str]:
    """Write this rank's pieces into ``directory`` (collective over ``process_group``, default the
    world; one process without torch.distributed writes alone); returns the data files this rank
    wrote (relative to ``directory``), for its checksums. ``state``: the pieces to write instead of
    ``sharded_state(model, optimizer, groups)`` (an engine that lays out its own: DeepSpeed's)."""
    os.makedirs(directory, exist_ok=True)
    writer = JsonMetadataWriter(directory)
    with single_process_quiet():
        dcp.save(state if state is not None else sharded_state(model, optimizer, groups, writing=True),
                 storage_writer=writer,
                 planner=ShardSavePlanner(), process_group=process_group, no_dist=not dist.is_initialized())
    return writer.files_written


class ShardStager(AsyncStager):
    """DCP's staging step for LocalShards: a copy of the state in fresh CPU memory (every piece of
    every LocalShards included), what an async save writes while the live tensors move on."""
    _synchronize_after_execute = False  # staging is done when stage() returns

    def stage(self, state: Dict[str, object]) -> Dict[str, object]:
        out: Dict[str, object] = {}
        for key, value in state.items():
            if isinstance(value, LocalShards):
                out[key] = LocalShards([(t.detach().to("cpu", copy=True), o) for t, o in value.pieces], value.size())
            else:
                out[key] = value.detach().to("cpu", copy=True)
        return out

    def close(self) -> None:
        pass


def async_save_sharded(directory: str, model: nn.Module, optimizer, groups: Optional[ProcessGroups],
                       process_group=None, state: Optional[Dict[str, object]] = None
                       ) -> Tuple[Future, JsonMetadataWriter]:
    """DCP's async save: the state is copied to CPU memory now and written by a background thread
    (its collectives on ``process_group``, which must not be the group training uses: gloo runs
    one collective at a time per group) while training goes on. Returns (future, writer): the
    future's ``.result()`` waits; then ``writer.files_written`` lists this rank's files. The index
    (.metadata.json) is written last, so a crash mid-write leaves a directory without one, which
    load refuses. Nothing is published until the caller does it after the future is done."""
    os.makedirs(directory, exist_ok=True)
    writer = JsonMetadataWriter(directory)
    if not dist.is_initialized():  # the background thread's warning too (catch_warnings is per thread)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    with single_process_quiet():
        future = dcp.async_save(state if state is not None else sharded_state(model, optimizer, groups, writing=True),
                                storage_writer=writer,
                                planner=ShardSavePlanner(), process_group=process_group,
                                async_stager=ShardStager(), no_dist=not dist.is_initialized())
    return future, writer


def _create_adam_state(model: nn.Module, optimizer, step: torch.Tensor) -> None:
    """torch AdamW's state for every parameter this rank steps (zeros, ``step``), to load into:
    under ZeRO-1 the parameters this replica owns in the current partition."""
    for owner in local_optimizers(optimizer):
        for group in owner.param_groups:
            for p in group["params"]:
                if p not in owner.state or not owner.state[p]:
                    owner.state[p] = {"step": step.clone(), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def pieces_of(state: Dict[str, object]) -> Dict[str, list]:
    """{logical name: [(offsets, sizes)]} of what this rank asks for (io.sharded_read.files_to_read)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, LocalShards):
            out[key] = [(tuple(o), tuple(t.shape)) for t, o in value.pieces]
        else:
            out[key] = [((0,) * value.dim(), tuple(value.shape))]
    return out


def load_pieces(directory: str, state: Dict[str, object], metadata,
                verify: Optional[Callable[[List[str]], None]] = None) -> None:
    """DCP's load of ``state`` (LocalShards pieces written in place, plain tensors replaced in the
    dict), after ``verify(files)`` of the data files its pieces are read from."""
    if verify is not None:
        from forge_dist.io.sharded_read import files_to_read

        verify(files_to_read(metadata, pieces_of(state)))
    with single_process_quiet():
        dcp.load(state, storage_reader=JsonMetadataReader(directory), planner=ShardLoadPlanner(),
                 no_dist=not dist.is_initialized())


def load_sharded(directory: str, model: nn.Module, optimizer, groups: Optional[ProcessGroups],
                 verify: Optional[Callable[[List[str]], None]] = None) -> None:
    """Fill ``model`` (and ``optimizer``) from a sharded checkpoint written at any layout (collective
    over the world when torch.distributed is initialised). ``verify(files)`` is called first with
    the data files this rank's pieces are read from (its checksums: io.sharded_read.files_to_read)."""
    metadata = read_index(directory)
    index = metadata.state_dict_metadata
    names = [n for n, _ in _unique_named(model)]
    missing = [n for n in names if f"model/{n}" not in index]
    if missing:
        raise CheckpointError(f"{directory} lacks {missing[:4]}: it is from another model")
    has_optim = optimizer is not None and any(k.startswith("optim/") for k in index)
    if has_optim:
        _create_adam_state(model, optimizer, torch.zeros((), dtype=torch.float32))
    state = sharded_state(model, optimizer if has_optim else None, groups)
    # parameters that had no optimizer state when saved (never a gradient) keep the fresh zeros
    state = {k: v for k, v in state.items() if k in index or not k.startswith("optim/")}
    steps = {k: v for k, v in state.items() if k.endswith("/step")}
    load_pieces(directory, state, metadata, verify)
    if has_optim:  # plain tensors are replaced in the dict, not written in place
        for name, p in _unique_named(model):
            key = f"optim/{name}/step"
            owner, opt = _owned_state(model, optimizer, name, p)
            if key in steps and opt:
                opt["step"] = state[key].to(torch.float32).reshape(())
    _fill_copies(model, optimizer if has_optim else None)
