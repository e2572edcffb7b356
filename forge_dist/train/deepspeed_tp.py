"""Tensor parallelism under DeepSpeed, from the ShardInfo on every parameter:
  * ``tensor_model_parallel`` is set on the ranks that must count a parameter in the gradient
    norm, which DeepSpeed sums over the model-parallel group: a split parameter on the first rank
    of each distinct shard, a replicated one on TP rank 0 only (DeepSpeed's rule for unmarked
    parameters), so every value counts once;
  * partial gradients (replicated parameters used on local heads or sequence shards, replicated KV
    heads) are summed over their TP ranks once per optimizer step, in one flattened all-reduce per
    group (tp_grad_sync), before DeepSpeed reduces over DP (summing over TP and averaging over DP
    commute). DeepSpeed's data-parallel reduction is held back until then (``tp_sum_mode``):
    ZeRO 1-3 through DeepSpeed's ``coalesce_grad_reduction`` (every micro-batch's gradients stay
    local, one reduction pass on exit), stage 0 through ``no_sync`` and one ``allreduce_gradients``.
    The price under ZeRO-2/3 is the overlap of that reduction with the backward, which DeepSpeed
    otherwise has. Only where DeepSpeed offers neither (its BF16_Optimizer wrapper, for bf16
    parameters with fp32 gradient accumulation at ZeRO-1, moves the gradients out of
    ``param.grad`` inside every backward) a hook on each such parameter sums its gradient as it is
    produced: one all-reduce per parameter and micro-batch.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor.metadata import shard_info, tp_grad_sync


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


def has_partial_grads(model: torch.nn.Module, groups: ProcessGroups) -> bool:
    """Whether some parameter's gradient is a partial sum over more than one rank."""
    for p in model.parameters():
        info = shard_info(p)
        if info is not None and info.partial_grad and p.requires_grad and info.reduce_group(groups).size > 1:
            return True
    return False


def tp_sum_mode(ds_engine, model: torch.nn.Module, groups: ProcessGroups) -> Optional[str]:
    """None (nothing partial), "coalesce" (ZeRO 1-3), "no_sync" (stage 0) or "hooks" (see module doc)."""
    if not has_partial_grads(model, groups):
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if hasattr(ds_engine.optimizer, "_coalesce_grad_reduction"):
        return "coalesce"
    if ds_engine.zero_optimization_stage() == 0 and not isinstance(ds_engine.optimizer, BF16_Optimizer):
        return "no_sync"
    return "hooks"


@contextlib.contextmanager
def one_reduction_per_step(ds_engine, mode: str):
    """Around all micro-batches of one optimizer step (run every backward inside, then
    ``sum_partial_grads``): DeepSpeed reduces over DP once, on exit; the ``step()`` that follows
    is the accumulation boundary."""
    ds_engine.set_gradient_accumulation_boundary(False)
    with ds_engine.coalesce_grad_reduction() if mode == "coalesce" else ds_engine.no_sync():
        yield
    ds_engine.set_gradient_accumulation_boundary(True)
    if mode == "no_sync":
        ds_engine.allreduce_gradients()


def sum_partial_grads(ds_engine, model: torch.nn.Module, groups: ProcessGroups) -> int:
    """tp_grad_sync on the gradients DeepSpeed is about to reduce (ZeRO-1 with a separate fp32
    accumulation keeps them in ``param.grad_accum``)."""
    optimizer = ds_engine.optimizer
    grad_of = getattr(optimizer, "get_gradient_for_reduction", None) if hasattr(
        optimizer, "_coalesce_grad_reduction") else None
    return tp_grad_sync(model, groups, grad_of=grad_of)
