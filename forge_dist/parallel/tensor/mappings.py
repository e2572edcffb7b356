"""The named autograd collectives of tensor and sequence parallelism (Megatron's mappings).

Each is a pair (forward op, backward op), the backward being the adjoint of the forward:

  name                               forward          backward        used at
  copy_to_tp_region                  identity         all-reduce      entry of a TP region (replicated input)
  reduce_from_tp_region              all-reduce       identity        exit of a TP region (row-parallel output)
  scatter_to_tp_region               split last dim   all-gather      a replicated tensor into feature shards
  gather_from_tp_region              all-gather last  split           feature shards into a replicated tensor
  scatter_to_sequence_region         split seq        all-gather      residual stream into sequence shards
  gather_from_sequence_region        all-gather seq   reduce-scatter  entry of a TP region under sequence
                                                      (or split)      parallelism (or a gather for replicated use)
  reduce_scatter_to_sequence_region  reduce-scatter   all-gather      exit of a TP region under sequence parallelism
  gather_to_sharded_consumer         all-gather last  reduce-scatter  feature shards into a layer sharded again (co4)

Activations are batch-first (B, T, C), so the sequence dim is 1. On a group of one rank every
mapping is the identity and adds no autograd node.
"""
from __future__ import annotations

import torch

from forge_dist.parallel.groups import RankGroup

SEQ_DIM = 1

_OPS = {
    "identity": lambda x, group, dim: x,
    "all_reduce": lambda x, group, dim: group.all_reduce(x),
    "all_gather": lambda x, group, dim: group.all_gather(x, dim),
    "reduce_scatter": lambda x, group, dim: group.reduce_scatter(x, dim),
    "split": lambda x, group, dim: group.split(x, dim),
}


class _Mapping(torch.autograd.Function):
    """forward: _OPS[fwd](x); backward: _OPS[bwd](grad)."""

    @staticmethod
    def forward(ctx, x, group: RankGroup, dim: int, fwd: str, bwd: str):
        ctx.group, ctx.dim, ctx.bwd = group, dim, bwd
        return _OPS[fwd](x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _OPS[ctx.bwd](grad, ctx.group, ctx.dim), None, None, None, None


def _map(x: torch.Tensor, group: RankGroup, dim: int, fwd: str, bwd: str) -> torch.Tensor:
    if group.size == 1:
        return x
    return _Mapping.apply(x, group, dim, fwd, bwd)


def copy_to_tp_region(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    return _map(x, group, -1, "identity", "all_reduce")


def reduce_from_tp_region(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    return _map(x, group, -1, "all_reduce", "identity")


def scatter_to_tp_region(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    return _map(x, group, -1, "split", "all_gather")


def gather_from_tp_region(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    return _map(x, group, -1, "all_gather", "split")


def scatter_to_sequence_region(x: torch.Tensor, group: RankGroup, dim: int = SEQ_DIM) -> torch.Tensor:
    return _map(x, group, dim, "split", "all_gather")


def gather_from_sequence_region(x: torch.Tensor, group: RankGroup, dim: int = SEQ_DIM,
                                grad_is_partial: bool = True) -> torch.Tensor:
    """All-gather the sequence shards. ``grad_is_partial``: the consumer is tensor-parallel, so
    each rank's gradient is a partial sum and the backward reduce-scatters it (Megatron's case);
    False when the consumer is replicated (identical gradients): the backward just splits."""
    return _map(x, group, dim, "all_gather", "reduce_scatter" if grad_is_partial else "split")


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: RankGroup, dim: int = SEQ_DIM) -> torch.Tensor:
    return _map(x, group, dim, "reduce_scatter", "all_gather")


def gather_to_sharded_consumer(x: torch.Tensor, group: RankGroup, dim: int = -1) -> torch.Tensor:
    """All-gather feature shards for a consumer that is itself tensor-parallel (each rank uses the
    full tensor for its own output shard), so the backward sums the partial gradients and keeps
    this rank's shard."""
    return _map(x, group, dim, "all_gather", "reduce_scatter")


def enter_tp_region(x: torch.Tensor, group: RankGroup, sequence_parallel: bool) -> torch.Tensor:
    """Input of a TP region (column-parallel layers): replicated -> copy; sequence shards -> gather."""
    return gather_from_sequence_region(x, group) if sequence_parallel else copy_to_tp_region(x, group)


def exit_tp_region(x: torch.Tensor, group: RankGroup, sequence_parallel: bool) -> torch.Tensor:
    """Output of a TP region (row-parallel partial sums): all-reduce, or reduce-scatter into shards."""
    return reduce_scatter_to_sequence_region(x, group) if sequence_parallel else reduce_from_tp_region(x, group)
