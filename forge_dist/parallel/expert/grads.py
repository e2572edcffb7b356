"""Gradient reduction and norm of a model whose experts are placed over the expert-parallel group.

Every rank's loss is the mean over its own tokens, and the objective is the mean over the dp
data-parallel ranks. Dense parameters are averaged over ``dp`` by DDP (data_parallel.py), which
ignores the expert parameters (it would average different experts together and broadcast rank
0's). An expert parameter lives on one rank of each expert-parallel group; the all-to-all backward
has already summed into it the gradients of the tokens every rank of the group routed to it, so
summing over ``expert_dp`` (the ranks holding the same expert) covers all dp ranks once: sum over
expert_dp, then divide by dp (not by the expert_dp size).
"""
from __future__ import annotations

from collections import defaultdict
from typing import List

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from forge_dist.parallel.expert.placement import is_expert_param
from forge_dist.parallel.groups import ProcessGroups


def reduce_expert_gradients(params: List[torch.Tensor], groups: ProcessGroups) -> int:
    """Expert gradients summed over ``expert_dp`` and divided by the dp size: one flattened
    all-reduce per dtype (every expert runs each step, so every rank has the same gradients).
    Returns how many were reduced."""
    edp, dp = groups.expert_dp, groups.dp.size
    by_dtype = defaultdict(list)
    for p in params:
        if is_expert_param(p):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype[p.grad.dtype].append(p.grad)
    n = 0
    for grads in by_dtype.values():
        flat = edp.all_reduce(_flatten_dense_tensors(grads), phase="grad_sync")
        flat = flat / dp
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
        n += len(grads)
    return n


def grad_norm(params: List[torch.Tensor], groups: ProcessGroups) -> torch.Tensor:
    """The 2-norm of the whole model's gradient: TP shards and replicas counted once (as
    tensor.metadata.tp_grad_norm), expert gradients summed over the expert-parallel group."""
    from forge_dist.parallel.tensor.metadata import ShardInfo, shard_info

    tp = groups.tp.size
    sums = torch.zeros(2, dtype=torch.float64, device=params[0].device if params else None)
    for p in params:
        if p.grad is None:
            continue
        info = shard_info(p) or ShardInfo.replicated(p)
        copies = tp if info.dim is None else tp // info.num_shards
        sums[int(is_expert_param(p))] += p.grad.detach().double().pow(2).sum() / copies
    sums = groups.tp.all_reduce(sums, phase="grad_sync")
    expert = groups.ep.all_reduce(sums[1:], phase="grad_sync")
    return (sums[0] + expert[0]).sqrt().float()
