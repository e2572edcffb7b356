"""The optimizer state of a pipelined run in the one-process layout, so checkpoints stay
layout-free: a PP (x TP) checkpoint resumes in one process, at another pipeline or tensor size,
and a one-process checkpoint resumes pipelined.

The one-process AdamW numbers its parameters in the order of ``param_groups(GPT)``
(forge_dist.train.optim): the engine passes that order by canonical name (``order``, built by
train/pipeline_engine.py's ``one_process_order`` from a GPT on the meta device). Saving gathers every moment tensor to its logical shape over TP (``full_tensor``)
(experts over the expert-parallel group) and the per-stage entries to pipeline rank 0 of
data-parallel replica 0; loading keeps this rank's entries and slices them for its TP rank
(``shard_tensor``). With ``--zero_stage 1`` (torch's ZeroRedundancyOptimizer over the stage's
data-parallel group) the replicas' parts are consolidated on data-parallel rank 0 first, and
loading keeps each replica's part: the file is the same.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from forge_dist.errors import CheckpointError
from forge_dist.parallel.zero import consolidate, consolidated_state, group_layout
from forge_dist.parallel.tensor.metadata import ShardInfo, full_tensor, shard_info, shard_tensor


def _local(engine) -> Dict[str, List[torch.nn.Parameter]]:
    return engine.layout.local_params()


def full_optimizer_state(engine, order: List[List[str]]) -> Optional[dict]:
    """The one-process AdamW state dict on global rank 0 (None elsewhere). Collective: every rank
    calls it (TP gathers; the pipeline gather on data-parallel replica 0)."""
    groups, opt = engine.groups, engine.optimizer
    consolidate(opt)  # ZeRO-1: every replica's part gathered on data-parallel rank 0 (collective over dp)
    if groups.coord.edp != 0:  # replica 0, with the replicas holding its other experts
        return None
    state = consolidated_state(opt)
    mine: Dict[str, dict] = {}
    for c, ps in sorted(_local(engine).items()):
        p = ps[0]
        info = shard_info(p)
        mine[c] = {k: (full_tensor(v, info, groups).cpu() if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
                       else v) for k, v in state.get(p, {}).items()}
    if groups.ep.size > 1:  # every expert's moments under its global name
        from forge_dist.parallel.expert.state import gather_expert_entries

        mine = gather_expert_entries(mine, list(engine.layout.chunks.values()), groups)
    if groups.tp.rank != 0 or groups.coord.dp != 0:
        return None
    pp = groups.pp
    parts = [None] * pp.size if pp.rank == 0 else None
    dist.gather_object(mine, parts, dst=pp.ranks[0], group=pp.handle)
    if pp.rank != 0:
        return None
    merged = {c: e for part in parts for c, e in part.items()}
    index = {c: i for i, c in enumerate(c for g in order for c in g)}
    local_groups = group_layout(opt)
    out_groups, start = [], 0
    for g, names in zip(local_groups, order):
        out_groups.append({**g, "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": {index[c]: e for c, e in merged.items() if e}, "param_groups": out_groups}


def load_optimizer_state(engine, sd: dict, order: List[List[str]], source: str) -> None:
    """Load this rank's part of a one-process AdamW state dict into the engine's optimizer."""
    index = {c: i for i, c in enumerate(c for g in order for c in g)}
    if len(sd["param_groups"]) != len(order) or sum(len(g["params"]) for g in sd["param_groups"]) != len(index):
        raise CheckpointError(f"the optimizer state in {source} does not fit this model's optimizer groups; it is "
                              f"from another model or weight_decay_split setting")
    tp, tp_rank = engine.groups.tp.size, engine.groups.tp.rank
    local_groups = group_layout(engine.optimizer)
    by_param = {id(p): i for i, p in enumerate(q for g in engine.optimizer.param_groups for q in g["params"])}
    state = {}
    for c, ps in _local(engine).items():
        entry = sd["state"].get(index[c])
        if entry is None:
            continue
        info = shard_info(ps[0]) or ShardInfo.replicated(ps[0])
        for p in ps:
            local = {}
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if tuple(v.shape) != tuple(info.full_shape):
                        raise CheckpointError(f"the optimizer state {k} of {c} in {source} has shape {tuple(v.shape)}, "
                                              f"the parameter's logical shape is {info.full_shape}")
                    v = shard_tensor(v, info, tp_rank, tp)
                local[k] = v
            state[by_param[id(p)]] = local
    groups_out = [{**saved, "params": mine["params"]} for saved, mine in zip(sd["param_groups"], local_groups)]
    engine.optimizer.load_state_dict({"state": state, "param_groups": groups_out})
