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
from forge_dist.parallel.grad_norm import global_grad_norm
from forge_dist.parallel.groups import ProcessGroups


BUCKET_BYTES = 25 * 2 ** 20  # as DDP's bucket_cap_mb (data_parallel.BUCKET_CAP_MB)


def _buckets(grads: List[torch.Tensor], cap: int):
    """Consecutive runs of ``grads`` of at most ``cap`` bytes (a larger tensor alone)."""
    bucket: List[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and size + nbytes > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def reduce_expert_gradients(params: List[torch.Tensor], groups: ProcessGroups) -> int:
    """Expert gradients summed over ``expert_dp`` and divided by the dp size: one flattened
    all-reduce per bucket of BUCKET_BYTES per dtype (every expert runs each step, so every rank has
    the same gradients), so the copies are a bucket, never the rank's whole expert gradient; with
    one rank in expert_dp (EP = DP) nothing is exchanged and the gradients are divided in place.
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
        n += len(grads)
        if edp.size == 1:
            if dp > 1:
                torch._foreach_div_(grads, dp)
            continue
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = edp.all_reduce_(_flatten_dense_tensors(bucket), phase="grad_sync")  # one bucket's copy
            flat.div_(dp)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
    return n


def grad_norm(params: List[torch.Tensor], groups: ProcessGroups) -> torch.Tensor:
    """The 2-norm of the whole model's gradient (parallel/grad_norm.py): TP shards and replicas
    counted once (as tensor.metadata.tp_grad_norm), expert gradients summed over the
    expert-parallel group."""
    from forge_dist.parallel.tensor.metadata import tp_copies

    tp = groups.tp.size
    terms = ((p.grad, tp_copies(p, tp), is_expert_param(p)) for p in params if p.grad is not None)
    return global_grad_norm(terms, [groups.tp], experts=groups.ep,
                            device=params[0].device if params else None)
