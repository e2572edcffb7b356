"""Gradients of a pipelined model: the pieces the engine runs after the schedule's backward.

  scale_microbatches   divide every distinct local parameter's gradient by the micro-batch count
                       once (the schedules are built with scale_grads=False: their own scaling
                       divides a parameter held by two local chunks twice)
  sync_shared          sum the gradients of a logical parameter held by several pipeline ranks
                       (tied table and head, shared_* modules, shared FIRE): over the ``embedding``
                       group when the holders are exactly its first and last stage, else over the
                       pipeline group with zeros from the ranks that do not hold it
  dp_average           average over the data-parallel group, one flattened all-reduce per bucket
                       of at most BUCKET_BYTES, for the parameters DDP does not reduce: the
                       shared ones (shared_canonical); every other parameter is averaged by
                       torch's DDP reducer wrapping each stage (schedule.py), bucketed and
                       overlapped with the last micro-batch's backward
  grad_norm            the 2-norm of the whole model's gradient over PP x TP (each logical value
                       counted once: shard copies as tp_grad_norm does, pipeline copies on their
                       lowest holder only, placed experts summed over the expert-parallel group);
                       data-parallel replicas hold the same averaged gradient
"""
from __future__ import annotations

from typing import Dict, List, Set

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from forge_dist.parallel.expert.placement import is_expert_param
from forge_dist.parallel.grad_norm import global_grad_norm
from forge_dist.parallel.pipeline.stage import StageLayout
from forge_dist.parallel.tensor.metadata import tp_copies


def distinct_params(layout: StageLayout) -> List[torch.nn.Parameter]:
    return list({id(p): p for ps in layout.local_params().values() for p in ps}.values())


def shared_canonical(layout: StageLayout) -> Set[str]:
    """Logical parameters held by several pipeline ranks or by several local chunks (tied table
    and head, shared_* modules, shared FIRE): DDP must not reduce them per chunk (a reducer per
    chunk would reduce a copy before the other chunk's backward added to it), dp_average does."""
    count: Dict[str, int] = {}
    for s, c in {(s, c) for (s, _), c in layout.canonical.items()}:
        count[c] = count.get(c, 0) + 1
    return set(layout.holders) | {c for c, k in count.items() if k > 1}


def reduced_by_hand(layout: StageLayout) -> List[torch.nn.Parameter]:
    """The distinct local parameters of the shared logical ones (reduced after the schedule)."""
    shared = shared_canonical(layout)
    return [p for c, ps in layout.local_params().items() if c in shared for p in ps]


@torch.no_grad()
def scale_microbatches(params: List[torch.nn.Parameter], n: int) -> None:
    if n != 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(n)


@torch.no_grad()
def sync_shared(layout: StageLayout, groups) -> int:
    """Sum the pipeline copies' gradients (every pipeline rank calls it, in the same order).
    Returns how many local Parameters received a summed gradient."""
    local = layout.local_params()
    n = 0
    for c, ps in local.items():  # two local chunks holding separately sharded copies (V-shape rank 0)
        if len(ps) > 1 and c not in layout.holders and any(p.grad is not None for p in ps):
            g = sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in ps)
            for p in ps:
                p.grad = g.clone()
                n += 1
    if not layout.holders:
        return n
    plan = layout.plan
    edge = (0, plan.pp - 1)  # the embedding group's pipeline ranks (loop placement: stages 0 and S-1)
    buckets: Dict[str, List[str]] = {"embedding": [], "pp": []}
    for name in sorted(layout.holders):  # the same order on every rank
        buckets["embedding" if plan.pp > 1 and layout.holders[name] == edge else "pp"].append(name)
    for kind, names in buckets.items():
        group = groups.embedding if kind == "embedding" else groups.pp
        if not names or group is None:  # a middle stage is in no embedding group
            continue
        grads = [sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in local[c])
                 if c in local else None for c in names]
        if kind == "pp":  # collective on the first call, on every pipeline rank
            grads = _fill_shapes(grads, names, local, layout, groups)
        has = torch.tensor([float(c in local and any(p.grad is not None for p in local[c])) for c in names])
        has = group.all_reduce(has, phase="grad_sync")  # a parameter no copy used keeps grad None
        total = group.all_reduce(_flatten_dense_tensors(grads), phase="grad_sync")
        for c, g, used in zip(names, _unflatten_dense_tensors(total, grads), has.tolist()):
            for p in local.get(c, ()):
                p.grad = g.clone() if used else None
                n += 1
    return n


def _fill_shapes(grads, names, local, layout, groups):
    """Zeros for the logical parameters this rank does not hold, shaped as the holders' local
    shards. The shapes are exchanged once over the pipeline group (every pipeline rank takes part
    on the first call, holder or not) and cached on the layout."""
    cache = layout.__dict__.get("_shapes")
    if cache is None:
        import torch.distributed as dist

        mine = {c: (tuple(local[c][0].shape), local[c][0].dtype) for c in names if c in local}
        every = [None] * groups.pp.size
        dist.all_gather_object(every, mine, group=groups.pp.handle)
        cache = layout.__dict__["_shapes"] = {k: v for d in every for k, v in d.items()}
    return [g if g is not None else torch.zeros(cache[c][0], dtype=cache[c][1]) for g, c in zip(grads, names)]


BUCKET_BYTES = 64 << 20


@torch.no_grad()
def dp_average(params: List[torch.nn.Parameter], group) -> None:
    """Every replica passes the same parameter list; a gradient missing on a replica counts as
    zeros (the pipeline stages give every parameter a gradient each step)."""
    if group.size == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: List[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        last = i == len(grads) - 1
        if last or size + grads[i + 1].numel() * grads[i + 1].element_size() > BUCKET_BYTES \
                or grads[i + 1].dtype != g.dtype:
            flat = group.all_reduce(_flatten_dense_tensors(bucket), phase="grad_sync").div_(group.size)
            for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(synced)
            bucket, size = [], 0


def grad_norm(layout: StageLayout, groups) -> torch.Tensor:
    """The global 2-norm over every pipeline stage and TP shard (parallel/grad_norm.py; collective
    over tp, pp and, for the placed experts, ep)."""
    tp = groups.tp.size
    counted, local = [], layout.local_params()
    for c, ps in local.items():
        holders = layout.holders.get(c)
        if holders is not None and holders[0] != layout.pp_rank:
            continue  # counted on the lowest pipeline rank holding it
        counted.append(ps[0])
    terms = ((p.grad, tp_copies(p, tp), is_expert_param(p)) for p in counted if p.grad is not None)
    return global_grad_norm(terms, [groups.tp, groups.pp], experts=groups.ep,
                            device=next((ps[0].device for ps in local.values()), None))
