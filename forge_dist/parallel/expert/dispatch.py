"""Token dispatch of expert parallelism: the local experts of an MoE layer and the all-to-all
exchange that brings them their tokens (GShard, Lepikhin et al. 2020; DeepSpeed-MoE; Megatron's
AllToAll token dispatcher).

The plain layer (forge_dist.model.moe) hands its ``experts`` module the (M, C) tokens of this rank
grouped by global expert id and the (E,) counts per expert. Here the E experts are split over the
``ep`` ranks of the expert-parallel group, rank r holding experts [r E/ep, (r+1) E/ep); since the
tokens are sorted by expert they are already sorted by destination rank, so

  1. counts:   all-to-all of the (ep, E/ep) count matrix: how many rows arrive from each rank
               for each local expert
  2. dispatch: all_to_all_single of the rows (split sizes from the counts)
  3. compute:  rows regrouped from (source, expert) to (expert, source) order, each local
               expert runs once on its contiguous slice
  4. return:   the inverse regrouping and the inverse all-to-all; the layer then combines with
               the gate weights in token order, exactly as on one process.

Both row exchanges are autograd functions whose backward is the transposed exchange, so an
expert's gradient on its owner is the sum over every rank's tokens routed to it.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from forge_dist.model.moe import run_grouped
from forge_dist.parallel.groups import RankGroup


class _AllToAll(torch.autograd.Function):
    """forward: rows exchanged with splits (out, in); backward: the gradient exchanged back."""

    @staticmethod
    def forward(ctx, x, group: RankGroup, output_splits: List[int], input_splits: List[int]):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        return group.all_to_all(x, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return ctx.group.all_to_all(grad, input_splits, output_splits), None, None, None


def all_to_all(x: torch.Tensor, group: RankGroup, output_splits: List[int], input_splits: List[int]) -> torch.Tensor:
    if group.size == 1:
        return x
    return _AllToAll.apply(x, group, list(output_splits), list(input_splits))


class ExpertParallelExperts(nn.Module):
    """This rank's experts of one MoE layer, registered under their global index (state-dict names
    ``experts.{e}.*`` as on one process), with the all-to-all exchange in front. Same call as
    forge_dist.model.moe.ExpertList: (M, C) rows grouped by global expert, (E,) counts."""

    def __init__(self, experts: nn.ModuleList, group: RankGroup, tensor_parallel_experts: bool):
        super().__init__()
        self.n_experts = len(experts)
        self.group = group
        self.n_local = self.n_experts // group.size
        self.first = group.rank * self.n_local
        for e in range(self.first, self.first + self.n_local):
            self.add_module(str(e), experts[e])
        self.tensor_parallel_experts = tensor_parallel_experts  # read by the TP rule (rules.py)

    def local_experts(self) -> List[nn.Module]:
        return list(self._modules.values())

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return self.n_local

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.group.size, self.n_local
        if ep == 1:
            return run_grouped(self.local_experts(), x, counts)
        send = counts.view(ep, n_local)  # row r: rows for rank r's experts
        recv = self.group.all_to_all(send.contiguous(), [1] * ep, [1] * ep)  # row s: from rank s
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = all_to_all(x, self.group, out_splits, in_splits)  # (source, expert) order
        segment = torch.repeat_interleave(torch.arange(ep * n_local, device=x.device), recv.reshape(-1))
        by_expert = torch.argsort((segment % n_local) * ep + segment // n_local, stable=True)
        y = run_grouped(self.local_experts(), received[by_expert], recv.sum(0))
        back = y[torch.argsort(by_expert)]  # (source, expert) order again
        return all_to_all(back, self.group, in_splits, out_splits)

    def extra_repr(self) -> str:
        return (f"experts {self.first}..{self.first + self.n_local - 1} of {self.n_experts} on rank "
                f"{self.group.rank} of {self.group.name}")
