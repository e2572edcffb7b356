"""Shard metadata carried by every parameter of a parallelized model, and what reads it.

``param._forge_shard = ShardInfo(...)`` says how the local tensor relates to the logical one:
which dim is split (or None: replicated), into how many distinct shards, in what layout, with
what padding, and whether the local gradient is only a partial sum. Gradient sync, checkpoint
gather and resharding read this instead of guessing from parameter names.

Layout along ``dim`` (length L, padded to ``padded_size`` with zeros if set): ``segments`` equal
blocks (2 for a gated up-projection [a | b], 1 normally), each cut into ``num_shards`` equal
pieces; shard s is piece s of every block, concatenated. TP rank t holds shard t // k with
k = tp / num_shards, so when num_shards < tp (KV heads fewer than TP ranks) k ranks hold
identical copies: their gradients are partial and summed over ``tp_replicas(num_shards)``.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from forge_dist.parallel.grad_norm import global_grad_norm
from forge_dist.parallel.groups import ProcessGroups, RankGroup

ATTR = "_forge_shard"


@dataclass(frozen=True)
class ShardInfo:
    full_shape: Tuple[int, ...]  # the logical shape (without padding)
    dim: Optional[int] = None  # None: replicated on every rank of ``group``
    num_shards: int = 1
    segments: int = 1
    padded_size: Optional[int] = None  # length of ``dim`` after padding (vocab), stripped on gather
    partial_grad: bool = False  # the local grad is a partial sum over the ranks holding this copy
    group: str = "tp"

    @classmethod
    def replicated(cls, t: torch.Tensor, partial_grad: bool = False, group: str = "tp") -> "ShardInfo":
        return cls(tuple(t.shape), None, partial_grad=partial_grad, group=group)

    def reduce_group(self, groups: ProcessGroups) -> RankGroup:
        """The ranks over which a partial gradient is summed."""
        if self.dim is None:
            return groups.get(self.group)
        return groups.tp_replicas(self.num_shards)


def shard_info(t: torch.Tensor) -> Optional[ShardInfo]:
    return getattr(t, ATTR, None)


def set_shard_info(t: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """Attach ``info``; a tensor reached twice (tied weights) must get the same description."""
    old = shard_info(t)
    if old is not None and old != info:
        raise ValueError(f"conflicting shard metadata for one tensor (tied weights?): {old} vs {info}")
    setattr(t, ATTR, info)
    return t


def mark_replicated(module: nn.Module, partial_grad: bool, recurse: bool = True) -> None:
    """Mark every parameter of ``module`` replicated (its gradient partial or not)."""
    for p in module.parameters(recurse=recurse):
        set_shard_info(p, ShardInfo.replicated(p, partial_grad))


def _pad(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    extra = (info.padded_size or full.shape[info.dim]) - full.shape[info.dim]
    if extra <= 0:
        return full
    shape = list(full.shape)
    shape[info.dim] = extra
    return torch.cat([full, full.new_zeros(shape)], dim=info.dim)


def shard_tensor(full: torch.Tensor, info: ShardInfo, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The local shard of the logical tensor ``full`` on TP rank ``tp_rank`` (a new tensor)."""
    if info.dim is None:
        return full.detach().clone()
    if tp_size % info.num_shards:
        raise ValueError(f"{info.num_shards} shards do not divide tensor_parallel_size={tp_size}")
    index = tp_rank // (tp_size // info.num_shards)
    blocks = _pad(full.detach(), info).chunk(info.segments, dim=info.dim)
    pieces = [b.chunk(info.num_shards, dim=info.dim)[index] for b in blocks]
    return (torch.cat(pieces, dim=info.dim) if len(pieces) > 1 else pieces[0]).clone()  # one copy, not two


def unshard(locals_in_tp_order: List[torch.Tensor], info: ShardInfo) -> torch.Tensor:
    """Inverse of shard_tensor: the logical tensor from every TP rank's local tensor."""
    if info.dim is None:
        return locals_in_tp_order[0]
    k = len(locals_in_tp_order) // info.num_shards
    distinct = locals_in_tp_order[::k]
    per_shard = [t.chunk(info.segments, dim=info.dim) for t in distinct]
    full = torch.cat([piece for s in range(info.segments) for piece in (p[s] for p in per_shard)], dim=info.dim)
    return full.narrow(info.dim, 0, info.full_shape[info.dim])


def full_tensor(t: torch.Tensor, info: Optional[ShardInfo], groups: ProcessGroups) -> torch.Tensor:
    """Gather the logical tensor of a (possibly sharded) local tensor; collective over the TP group."""
    t = t.detach()
    if info is None or info.dim is None:
        return t
    group = groups.get(info.group)
    stacked = group.all_gather(t.unsqueeze(0), dim=0, phase="gather")
    return unshard(list(stacked.unbind(0)), info)


def gather_full_state_dict(model: nn.Module, groups: ProcessGroups,
                           grads: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """Logical names -> full (unsharded, unpadded) tensors: the state dict (parameters and
    persistent buffers) or, with ``grads``, the gradients of the parameters (None when a
    parameter has none). Tied tensors appear under every name, as in model.state_dict().
    Collective over the TP group: every TP rank must call it."""
    if grads:
        items = [(n, p.grad, shard_info(p)) for n, p in model.named_parameters(remove_duplicate=False)]
    else:
        items = [(n, t, shard_info(t)) for n, t in model.state_dict(keep_vars=True).items()]
    unique = list({id(t): (t, info) for _, t, info in items if t is not None}.values())
    done = dict(zip((id(t) for t, _ in unique), full_tensors(unique, groups)))
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, t, _ in items:
        out[name] = None if t is None else done[id(t)]
    return out


def full_tensors(tensors: List[Tuple[torch.Tensor, Optional[ShardInfo]]],
                 groups: ProcessGroups) -> List[torch.Tensor]:
    """``full_tensor`` of many tensors with one all-gather per (group, dtype, device) instead of one
    per tensor: the local shards of a bucket are flattened into one vector (every rank's shards
    have the same shapes). Collective over the TP group."""
    out: List[Optional[torch.Tensor]] = [t.detach() if info is None or info.dim is None else None
                                         for t, info in tensors]
    buckets: Dict[tuple, List[int]] = defaultdict(list)
    for i, (t, info) in enumerate(tensors):
        if out[i] is None:
            buckets[(info.group, t.dtype, t.device)].append(i)
    for (group_name, _, _), members in buckets.items():
        group = groups.get(group_name)
        flat = torch.cat([tensors[i][0].detach().reshape(-1) for i in members])
        stacked = group.all_gather(flat.unsqueeze(0), dim=0, phase="gather")  # (ranks, N)
        offset = 0
        for i in members:
            t, info = tensors[i]
            part = stacked[:, offset:offset + t.numel()].reshape(stacked.shape[0], *t.shape)
            out[i] = unshard(list(part.unbind(0)), info)
            offset += t.numel()
    return out


def _unique_params(model: nn.Module):
    return list({id(p): p for p in model.parameters()}.values())


def tp_grad_sync(model: nn.Module, groups: ProcessGroups,
                 grad_of: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None) -> int:
    """Sum the partial gradients (metadata partial_grad) over the ranks holding the same copy:
    replicated parameters used on local heads or sequence shards, replicated KV heads. One
    flattened all-reduce per group. Call after backward, before clipping and the optimizer step.
    ``grad_of(param)`` says where a parameter's gradient is (default ``param.grad``; an engine
    may keep it elsewhere). Returns the number of gradients reduced."""
    buckets: Dict[Tuple[int, ...], Tuple[RankGroup, List[torch.Tensor]]] = {}  # by member ranks
    for p in _unique_params(model):
        info = shard_info(p)
        grad = p.grad if grad_of is None else grad_of(p)
        if grad is None or info is None or not info.partial_grad:
            continue
        group = info.reduce_group(groups)
        if group.size > 1:
            buckets.setdefault(group.ranks, (group, []))[1].append(grad)
    n = 0
    for group, grads in buckets.values():
        by_dtype = defaultdict(list)
        for g in grads:
            by_dtype[g.dtype].append(g)
        for same in by_dtype.values():
            flat = group.all_reduce(_flatten_dense_tensors(same), phase="grad_sync")
            for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(synced)
            n += len(same)
    return n


def tp_copies(p: torch.Tensor, tp: int) -> int:
    """How many TP ranks hold the value of ``p`` (all of them for a replicated parameter)."""
    info = shard_info(p) or ShardInfo.replicated(p)
    return tp if info.dim is None else tp // info.num_shards


def tp_grad_norm(model: nn.Module, groups: ProcessGroups, norm_type: float = 2.0) -> torch.Tensor:
    """The 2-norm of the full model's gradient, from sharded gradients (after tp_grad_sync):
    each distinct value counted once (parallel/grad_norm.py). Collective over the TP group."""
    if norm_type != 2.0:
        raise ValueError("tp_grad_norm computes the 2-norm only")
    tp = groups.tp.size
    params = _unique_params(model)
    return global_grad_norm(((p.grad, tp_copies(p, tp), False) for p in params if p.grad is not None),
                            [groups.tp], device=params[0].device if params else None)

