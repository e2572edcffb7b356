"""Where this process stands in the run: its ranks and the collectives the trainer loop needs.

The loop never reads torch.distributed state directly; it asks the context. A single process is
``RunContext()`` (rank 0 of 1, data-parallel rank 0 of 1). A launcher builds one with the process
groups it created and passes it in, so there is no module-level distributed state. Stop decisions
go through ``any``: if one rank sees a NaN, every rank leaves the loop at the same iteration
(upstream can hang with ranks waiting in a collective for one that already left).

A parallel run also carries its layout for the engine factory: ``groups`` (forge_dist.parallel's
ProcessGroups: tp, dp, ... of this rank) and ``parallel_config`` (the ParallelConfig the run was
launched with). Both are None for a single process. Every collective goes through the flight
recorder (forge_dist.parallel.flight; the ProcessGroups' one), which hang diagnosis reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch


@dataclass
class RunContext:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    group: Optional[Any] = None  # torch.distributed ProcessGroup of every rank of the run
    device: str = "cpu"  # where collective tensors live (cuda for NCCL)
    groups: Optional[Any] = None  # forge_dist.parallel.ProcessGroups of a parallel run
    parallel_config: Optional[Any] = None  # forge_dist.config.parallel.ParallelConfig likewise
    launcher: str = "single"  # torchrun | deepspeed | env | mpirun | slurm | single
    recorder: Optional[Any] = None  # forge_dist.parallel.flight.FlightRecorder (a parallel run has one)

    def __post_init__(self):
        if self.recorder is None and self.distributed:
            from forge_dist.parallel.flight import FlightRecorder

            self.recorder = getattr(self.groups, "recorder", None) or FlightRecorder(self.rank)

    def _flight(self, op: str, *tensors):
        from forge_dist.parallel.flight import recorded

        return recorded(self.recorder, op, "world", range(self.world_size), tensors, self.group)

    @classmethod
    def from_dist(cls, dist_ctx, parallel_config=None) -> "RunContext":
        """From forge_dist.dist's DistContext: the data-parallel coordinate comes from its topology
        (every rank its own replica when there is none); collectives use the default group."""
        topology = getattr(dist_ctx, "topology", None)
        dp_rank, dp_size = dist_ctx.rank, dist_ctx.world_size
        if topology is not None:
            dp_rank, dp_size = topology.coord(dist_ctx.rank).dp, topology.dp
        env = getattr(dist_ctx, "env", None)
        return cls(rank=dist_ctx.rank, world_size=dist_ctx.world_size, dp_rank=dp_rank, dp_size=dp_size,
                   device=str(dist_ctx.device), groups=getattr(dist_ctx, "groups", None),
                   parallel_config=parallel_config, launcher=getattr(env, "launcher", "env"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tp_size(self) -> int:
        return 1 if self.groups is None else self.groups.tp.size

    @property
    def tp_rank(self) -> int:
        return 0 if self.groups is None else self.groups.tp.rank

    def layout(self) -> dict:
        """The parallel layout, as recorded in checkpoints (a resume compares it with its own)."""
        pcfg = self.parallel_config
        layout = {"world_size": self.world_size, "dp_size": self.dp_size, "tensor_parallel_size": self.tp_size,
                  "sequence_parallel": bool(pcfg is not None and pcfg.sequence_parallel and self.tp_size > 1)}
        if pcfg is not None and pcfg.expert_parallel_size > 1:
            layout["expert_parallel_size"] = pcfg.expert_parallel_size
        if pcfg is not None and pcfg.pipeline_parallel_size > 1:
            layout["pipeline_parallel_size"] = pcfg.pipeline_parallel_size
        return layout

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        if not self.distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with self._flight("all_reduce_max", t):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        """The mean over all ranks (used for logged losses: tensor-parallel ranks of a replica hold
        the same loss, so this is the mean over the data-parallel replicas)."""
        if not self.distributed:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        with self._flight("all_reduce", t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return float(t.item()) / self.world_size

    def sum_over_replicas(self, values: List[float]) -> List[float]:
        """Each value summed over the data-parallel replicas (one all-reduce), for counts that the
        tensor-parallel ranks of a replica hold alike (e.g. tokens per expert)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values] or [0.0], dtype=torch.float64, device=self.device)
        with self._flight("all_reduce", t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        t /= self.world_size // self.dp_size  # the ranks of one replica counted it alike
        return t.tolist()[:len(values)]

    def gather_floats(self, value: float) -> List[float]:
        """Every rank's ``value``, in rank order, on every rank (one all-reduce of world_size floats)."""
        if not self.distributed:
            return [float(value)]
        import torch.distributed as dist

        t = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        t[self.rank] = float(value)
        with self._flight("all_reduce", t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def gather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable values only)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        with self._flight("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            with self._flight("barrier"):
                dist.barrier(group=self.group)
