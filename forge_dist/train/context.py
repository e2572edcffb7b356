"""Where this process stands in the run: its ranks and the collectives the trainer loop needs.

The loop never reads torch.distributed state directly; it asks the context. A single process is
``RunContext()`` (rank 0 of 1, data-parallel rank 0 of 1). A launcher builds one with the process
groups it created and passes it in, so there is no module-level distributed state. Stop decisions
go through ``any``: if one rank sees a NaN, every rank leaves the loop at the same iteration
(upstream can hang with ranks waiting in a collective for one that already left).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class RunContext:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    group: Optional[Any] = None  # torch.distributed ProcessGroup of every rank of the run
    device: str = "cpu"  # where collective tensors live (cuda for NCCL)

    @classmethod
    def from_dist(cls, dist_ctx) -> "RunContext":
        """From forge_dist.dist's DistContext: the data-parallel coordinate comes from its topology
        (every rank its own replica when there is none); collectives use the default group."""
        topology = getattr(dist_ctx, "topology", None)
        dp_rank, dp_size = dist_ctx.rank, dist_ctx.world_size
        if topology is not None:
            dp_rank, dp_size = topology.coord(dist_ctx.rank).dp, topology.dp
        return cls(rank=dist_ctx.rank, world_size=dist_ctx.world_size, dp_rank=dp_rank, dp_size=dp_size,
                   device=str(dist_ctx.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        if not self.distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        """The mean over all ranks (used for logged losses)."""
        if not self.distributed:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)
