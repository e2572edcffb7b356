"""Tensor parallelism under DeepSpeed, from the ShardInfo on every parameter:
  * ``tensor_model_parallel`` is set on the ranks that must count a parameter in the gradient
    norm, which DeepSpeed sums over the model-parallel group: a split parameter on the first rank
    of each distinct shard, a replicated one on TP rank 0 only (DeepSpeed's rule for unmarked
    parameters), so every value counts once;
  * partial gradients (replicated parameters used on local heads or sequence shards, replicated KV
    heads) are summed over their TP ranks by a gradient hook on the parameter, which runs as each
    gradient is produced, before DeepSpeed's own hooks and its data-parallel reduction (ZeRO-2/3
    reduce inside backward, so a sync after ``engine.backward`` would come too late). Summing over
    TP and averaging over DP commute, so this is tp_grad_sync, once per micro-batch.
"""
from __future__ import annotations

from typing import List

import torch

from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor.metadata import shard_info
def set_model_parallel_attributes(model: torch.nn.Module, groups: ProcessGroups) -> int:
    """Mark the parameters this rank counts in DeepSpeed's gradient norm (see the module doc);
    returns how many are marked on this rank."""
    tp_rank, tp = groups.tp.rank, groups.tp.size
    marked = 0
    for p in {id(p): p for p in model.parameters()}.values():
        info = shard_info(p)
        split = info is not None and info.dim is not None and info.num_shards > 1
        copies = tp // info.num_shards if split else tp  # ranks holding the same values
        p.tensor_model_parallel = tp > 1 and split and tp_rank % copies == 0
        marked += int(p.tensor_model_parallel)
    return marked


def register_tp_grad_hooks(model: torch.nn.Module, groups: ProcessGroups) -> List:
    """Sum partial gradients over the ranks holding the same copy as they are produced."""
    handles = []
    for p in {id(p): p for p in model.parameters()}.values():
        info = shard_info(p)
        if info is None or not info.partial_grad or not p.requires_grad:
            continue
        group = info.reduce_group(groups)
        if group.size > 1:
            handles.append(p.register_hook(lambda g, group=group: group.all_reduce(g, phase="grad_sync")))
    return handles
