"""Process groups, built once from a Topology and passed explicitly to everything that communicates.

``ProcessGroups.build`` makes every rank create every group of the topology in the same order
(torch.distributed requires it) and keeps the ones containing this rank as ``RankGroup`` objects.
A RankGroup carries its members, this rank's index and the torch handle, and runs the collectives
of the parallel layers, so the communication counter and the flight recorder (flight.py: sequence
numbers, the last collectives, for hang diagnosis) see every one of them. A group of one rank
has no handle and its collectives return their input: ``ProcessGroups.single()`` is a complete
world-1 instance that needs no torch.distributed at all.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from forge_dist.parallel.comm import CommCounter, CommEvent, current_phase, ring_traffic
from forge_dist.parallel.flight import FlightRecorder, recorded
from forge_dist.parallel.topology import KINDS, RankCoord, Topology

_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class RankGroup:
    """One process group as seen from a member: ``ranks`` (global, sorted), ``rank`` (this rank's
    index in it), ``size``, ``handle`` (None when size is 1)."""

    def __init__(self, name: str, ranks: Tuple[int, ...], global_rank: int, handle=None,
                 counters: Optional[List[CommCounter]] = None, recorder: Optional[FlightRecorder] = None):
        self.name = name
        self.ranks = tuple(ranks)
        self.rank = self.ranks.index(global_rank)
        self.size = len(self.ranks)
        self.handle = handle
        self._counters = counters if counters is not None else []
        self.recorder = recorder

    def _flight(self, op: str, *tensors: torch.Tensor):
        return recorded(self.recorder, op, self.name, self.ranks, tensors, self.handle)

    def track_async(self, op: str, tensor: torch.Tensor, start):
        """``start()`` issues an asynchronous collective on this group and returns its Future; the
        flight recorder holds it in flight until the Future completes (DDP's comm hook uses this)."""
        if self.recorder is None:
            return start()
        recorder = self.recorder
        entry = recorder.issue(op, self.name, self.ranks, [tensor], self.handle)

        def done(fut):
            try:
                value = fut.value()
            except Exception as e:
                recorder.complete(entry, e)
                raise
            recorder.complete(entry)
            return value

        return start().then(done)

    def __repr__(self) -> str:
        return f"RankGroup({self.name}, ranks={self.ranks}, rank={self.rank})"

    def _record(self, kind: str, nbytes: int, phase: Optional[str]) -> None:
        if self.handle is None:
            raise RuntimeError(f"{self} has no process group (a layout for planning only); build the "
                               "groups with ProcessGroups.build after init_distributed")
        if self._counters:
            event = CommEvent(phase or current_phase(), kind, self.name, self.size, nbytes,
                              ring_traffic(kind, nbytes, self.size))
            for counter in self._counters:
                counter.record(event)

    # --- collectives: new tensors out, inputs untouched ---------------------------------------
    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM, phase: Optional[str] = None) -> torch.Tensor:
        if self.size == 1:
            return x
        out = x.contiguous().clone()
        self._record("all_reduce", out.numel() * out.element_size(), phase)
        with self._flight("all_reduce", out):
            dist.all_reduce(out, op=op, group=self.handle)
        return out

    def all_reduce_(self, x: torch.Tensor, op=dist.ReduceOp.SUM, phase: Optional[str] = None) -> torch.Tensor:
        """all_reduce into ``x`` itself (contiguous, the caller's own buffer: a flattened bucket),
        without all_reduce's copy."""
        if self.size == 1:
            return x
        if not x.is_contiguous():
            raise ValueError("all_reduce_ needs a contiguous tensor")
        self._record("all_reduce", x.numel() * x.element_size(), phase)
        with self._flight("all_reduce", x):
            dist.all_reduce(x, op=op, group=self.handle)
        return x

    def all_gather(self, x: torch.Tensor, dim: int, phase: Optional[str] = None) -> torch.Tensor:
        """Concatenate every member's ``x`` along ``dim``, in group order."""
        if self.size == 1:
            return x
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((self.size * moved.shape[0],) + tuple(moved.shape[1:]))
        self._record("all_gather", out.numel() * out.element_size(), phase)
        with self._flight("all_gather", moved):
            _all_gather_single(out, moved, group=self.handle)
        return out.movedim(0, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int, phase: Optional[str] = None) -> torch.Tensor:
        """Sum ``x`` over the members and keep this member's chunk of ``dim``."""
        if self.size == 1:
            return x
        if x.shape[dim] % self.size:
            raise ValueError(f"reduce-scatter over {self.size} ranks: dim {dim} of shape {tuple(x.shape)} "
                             f"is not divisible by {self.size}")
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((moved.shape[0] // self.size,) + tuple(moved.shape[1:]))
        self._record("reduce_scatter", moved.numel() * moved.element_size(), phase)
        with self._flight("reduce_scatter", moved):
            _reduce_scatter_single(out, moved, op=dist.ReduceOp.SUM, group=self.handle)
        return out.movedim(0, dim)

    def all_to_all(self, x: torch.Tensor, output_splits: List[int], input_splits: List[int],
                   phase: Optional[str] = None) -> torch.Tensor:
        """Rows ``x[sum(input_splits[:j]) : ...]`` go to member j; the rows from member j arrive
        as block j of the result (``output_splits[j]`` rows): torch's all_to_all_single."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        self._record("all_to_all", x.numel() * x.element_size(), phase)
        dist.all_to_all_single(out, x, output_splits, input_splits, group=self.handle)
        return out

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This member's chunk of ``dim`` (no communication)."""
        if self.size == 1:
            return x
        if x.shape[dim] % self.size:
            raise ValueError(f"cannot split dim {dim} of shape {tuple(x.shape)} into {self.size} equal "
                             f"parts for the {self.name} group")
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()


class ProcessGroups:
    """This rank's groups of every kind in KINDS (tp, dp, pp, ep, expert_dp, embedding, mp), and
    the TP replica groups (``tp_replicas(n)``) used when a tensor has fewer distinct shards than
    TP ranks, like KV heads when n_kv_group < tp. ``embedding`` is None on a middle pipeline stage."""

    def __init__(self, topology: Topology, rank: int, groups: Dict[str, RankGroup],
                 replicas: Dict[int, RankGroup], counters: List[CommCounter],
                 recorder: Optional[FlightRecorder] = None):
        self.topology = topology
        self.recorder = recorder  # the flight recorder of this process (None without process groups)
        self.global_rank = rank
        self.coord: RankCoord = topology.coord(rank)
        self._groups = groups
        self._replicas = replicas
        self._counters = counters
        for kind in KINDS:
            setattr(self, kind, groups.get(kind))

    def __repr__(self) -> str:
        return f"ProcessGroups(rank={self.global_rank}, {self.topology})"

    def get(self, kind: str) -> Optional[RankGroup]:
        return self._groups.get(kind)

    def tp_replicas(self, num_shards: int) -> RankGroup:
        """The ranks of this TP group holding the same one of ``num_shards`` shards as this rank."""
        if num_shards not in self._replicas:
            raise ValueError(f"{num_shards} shards do not divide tensor_parallel_size={self.topology.tp}")
        return self._replicas[num_shards]

    @contextlib.contextmanager
    def count_collectives(self):
        """Count the collectives run on these groups inside the block: ``with g.count_collectives() as c``."""
        counter = CommCounter()
        self._counters.append(counter)
        try:
            yield counter
        finally:
            self._counters.remove(counter)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def single(cls, topology: Optional[Topology] = None) -> "ProcessGroups":
        """A world of one process: every group is {0}; no torch.distributed needed."""
        topology = topology or Topology(1)
        if topology.world_size != 1:
            raise ValueError(f"ProcessGroups.single() needs a world of 1, not {topology}")
        counters: List[CommCounter] = []
        groups = {k: RankGroup(k, (0,), 0, None, counters) for k in KINDS}
        return cls(topology, 0, groups, {1: RankGroup("tp_replica", (0,), 0, None, counters)}, counters)

    @classmethod
    def layout(cls, topology: Topology, rank: int) -> "ProcessGroups":
        """Membership of ``rank`` without process groups: for planning and validation before any
        group exists (collectives on it raise)."""
        counters: List[CommCounter] = []
        groups = {k: RankGroup(k, topology.group_of(k, rank), rank, None, counters) for k in KINDS
                  if topology.group_of(k, rank)}
        replicas = {}
        for n in (d for d in range(1, topology.tp + 1) if topology.tp % d == 0):
            ranks = next(g for g in topology.tp_replica_groups(n) if rank in g)
            replicas[n] = RankGroup("tp_replica", ranks, rank, None, counters)
        return cls(topology, rank, groups, replicas, counters)

    @classmethod
    def build(cls, topology: Topology, timeout: Optional[timedelta] = None,
              backend: Optional[str] = None) -> "ProcessGroups":
        """Create the groups of ``topology`` on every rank (a collective call: all ranks, same order)."""
        if not dist.is_initialized():
            if topology.world_size == 1:
                return cls.single(topology)
            raise RuntimeError(f"ProcessGroups.build({topology}) needs torch.distributed initialised "
                               "(forge_dist.dist.init_distributed)")
        world = dist.get_world_size()
        if world != topology.world_size:
            raise ValueError(f"{topology} does not match the initialised world of {world} processes")
        rank = dist.get_rank()
        handles: Dict[Tuple[int, ...], object] = {}

        def handle(ranks: Tuple[int, ...]):
            if len(ranks) == 1:
                return None
            if ranks not in handles:  # identical rank sets share one group (same on every rank)
                handles[ranks] = (dist.group.WORLD if len(ranks) == world
                                  else dist.new_group(list(ranks), timeout=timeout, backend=backend))
            return handles[ranks]

        counters: List[CommCounter] = []
        recorder = FlightRecorder(rank)
        mine: Dict[str, RankGroup] = {}
        for kind in KINDS:
            for ranks in topology.groups(kind):
                h = handle(ranks)
                if rank in ranks:
                    mine[kind] = RankGroup(kind, ranks, rank, h, counters, recorder)
        replicas: Dict[int, RankGroup] = {}
        for n in (d for d in range(1, topology.tp + 1) if topology.tp % d == 0):
            for ranks in topology.tp_replica_groups(n):
                h = handle(ranks)
                if rank in ranks:
                    replicas[n] = RankGroup("tp_replica", ranks, rank, h, counters, recorder)
        return cls(topology, rank, mine, replicas, counters, recorder)
