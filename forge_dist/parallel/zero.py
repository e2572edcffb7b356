"""ZeRO-1 in the native engines: torch's ZeroRedundancyOptimizer over the data-parallel group.

Each data-parallel replica keeps the optimizer state (AdamW's two moments) of a part of the
parameters, steps that part after the gradients were averaged, and broadcasts the updated values
to the other replicas (ZeRO stage 1, Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models"). AdamW is elementwise, so the weights equal replicated
AdamW's exactly. Under pipeline parallelism the group is the stage's data-parallel group
(ProcessGroups.dp: the ranks with the same pipeline and tensor coordinates).

Checkpoints stay layout-free. Sharded (train/sharded_checkpoint.py): each replica writes the moments
of the parameters it owns (``local_state``) and, on resume, reads those of its new part, so ZeRO-1
and replicated AdamW resume from each other at any layout. Gathered: ``consolidate_state_dict``
gathers every replica's part on data-parallel rank 0, whose ``state_dict()`` is then the
replicated optimizer's; loading a replicated state dict keeps this replica's part.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer


def zero_optimizer(param_groups: List[Dict], dp_group, optimizer_class=torch.optim.AdamW, **defaults):
    """``optimizer_class`` over ``param_groups``, its state sharded over ``dp_group`` (a RankGroup)."""
    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, process_group=dp_group.handle,
                                   **defaults)


def is_zero(optimizer) -> bool:
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def consolidate(optimizer) -> None:
    """Gather every replica's state on data-parallel rank 0 (collective over the group; nothing
    for a replicated optimizer; each part of an ExpertZeroOptimizer on its own group's rank 0)."""
    if is_zero(optimizer) or hasattr(optimizer, "parts"):
        optimizer.consolidate_state_dict(to=0)


def consolidated_state(optimizer) -> Dict[torch.Tensor, dict]:
    """Parameter -> state entry: every parameter's after ``consolidate`` (on data-parallel rank 0)."""
    if not is_zero(optimizer):
        return optimizer.state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {params[i]: entry for i, entry in optimizer.state_dict()["state"].items()}


def local_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    """The optimizers that step on this rank: ZeRO-1's local one, each part's of an
    ExpertZeroOptimizer (parallel/expert/zero.py), or ``optimizer`` itself."""
    if hasattr(optimizer, "parts"):
        return [o for part in optimizer.optimizers for o in local_optimizers(part)]
    return [optimizer.optim] if is_zero(optimizer) else [optimizer]


def local_state(optimizer) -> Dict[torch.Tensor, dict]:
    """Parameter -> state entry this replica holds (its part under ZeRO-1): the optimizer's own dict
    (entries set in it are the optimizer's), or for several local optimizers a merged copy."""
    optimizers = local_optimizers(optimizer)
    if len(optimizers) == 1:
        return optimizers[0].state
    out: Dict[torch.Tensor, dict] = {}
    for opt in optimizers:
        out.update(opt.state)
    return out


def group_layout(optimizer) -> List[Dict]:
    """``state_dict()["param_groups"]`` without the state (a ZeroRedundancyOptimizer has one only
    after a consolidation): each group's options, its params as indices."""
    out, start = [], 0
    for g in optimizer.param_groups:
        n = len(g["params"])
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return out
