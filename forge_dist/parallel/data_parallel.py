"""Data-parallel gradient reduction: torch's DistributedDataParallel reducer on the DP group.

    ddp = data_parallel(model, groups)        # None when the data-parallel group has one rank
    with ddp.no_sync(): loss.backward()       # a non-final micro-batch: gradients stay local
    loss.backward()                           # the final one: buckets all-reduced during backward

DDP's reducer puts the gradients into buckets (the first ~1 MiB, then ``bucket_cap_mb``) in the
reverse order of their use and all-reduces each bucket as soon as its last gradient is produced,
while the backward goes on computing the earlier layers: the collectives per step grow with the
bytes of the model (one per bucket), not with its number of parameters, and they overlap the
backward. The average divides by the DP size, so every replica holds the gradient of the mean
loss over the global batch.

Why DDP and not FSDP2 (``fully_shard``): FSDP2 turns each parameter into a DTensor sharded over
the replicas, which our tensor-parallel layers (plain tensors with ShardInfo metadata), the
checkpoint gather and the optimizer-state resharding do not read, and it would gather the weights
before every forward. Sharding the optimizer state, gradients and weights over the replicas is
the DeepSpeed engine's job (ZeRO 1-3, --deepspeed_config); the native engine replicates them (or,
with --zero_stage 1, shards only the optimizer state: forge_dist.parallel.zero) and only needs the
reduction to be bucketed and overlapped. DDP leaves the module and its parameters
untouched: ``engine.model`` stays the plain (tensor-parallel) module that checkpoints,
evaluation and sampling use; only the training forward runs through the wrapper.

Choices, each for exactness against one process with dp times the batch:
  find_unused_parameters  a parameter may get no gradient in some step (an MoE expert no token
                          chose): DDP then counts zeros for it on the replicas without one, and a
                          parameter unused on every replica keeps grad None, so AdamW skips
                          exactly what one process would skip (one extra small all-reduce of a
                          used-parameter bitmap per step, inside DDP)
  forward_sync_buffers=False  buffers are equal on every replica by construction (same seed, same
                          checkpoint); broadcasting them would add a collective per forward
  expert parameters       (declared with ``allreduce = False`` by forge_dist.parallel.expert) are
                          ignored: each replica holds different experts, reduced over expert_dp
                          by parallel/expert/grads.py
  the comm hook           torch's own allreduce_hook, reported to the RankGroup's counters
                          (``groups.count_collectives()``) and its flight recorder (in flight
                          until the Future completes) like every other collective
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from forge_dist.parallel.groups import ProcessGroups, RankGroup

BUCKET_CAP_MB = 25  # torch's default; the first bucket is 1 MiB so the first all-reduce starts early


def counted_allreduce_hook(group: RankGroup, bucket):  # no return annotation: DDP checks it literally
    """torch's default DDP hook (average over the group), recorded as a grad_sync all-reduce."""
    buffer = bucket.buffer()
    group._record("all_reduce", buffer.numel() * buffer.element_size(), "grad_sync")
    return group.track_async("all_reduce", buffer, lambda: default_hooks.allreduce_hook(group.handle, bucket))


def data_parallel(model: nn.Module, groups: ProcessGroups, device: Optional[torch.device] = None,
                  bucket_cap_mb: float = BUCKET_CAP_MB,
                  ignore: Sequence[str] = ()) -> Optional[DistributedDataParallel]:
    """The DDP wrapper of ``model`` over ``groups.dp`` (None for one replica). Collective over the
    DP group at construction (DDP checks shapes and broadcasts DP rank 0's weights). ``ignore``:
    parameter names the caller reduces itself (a pipeline stage's parameters shared with others)."""
    dp = groups.dp
    if dp.size == 1:
        return None
    ignore = list(ignore) + [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                             if getattr(t, "allreduce", True) is False]
    if ignore:  # experts placed over the EP group: not replicas of each other
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [device.index] if device is not None and device.type == "cuda" and device.index is not None else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=dp.handle, bucket_cap_mb=bucket_cap_mb,
                                  find_unused_parameters=True, forward_sync_buffers=False,
                                  gradient_as_bucket_view=True)
    ddp.register_comm_hook(dp, counted_allreduce_hook)
    return ddp
