"""Pure rank <-> (pipeline, data, tensor) coordinates; no processes, so any world size is testable.

Megatron's order: tensor-parallel ranks are adjacent, then data-parallel, then pipeline,

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank,

so a TP group (the chattiest: collectives in every layer) stays inside a node whenever tp divides
the GPUs per node. Expert parallelism is carved out of the data-parallel ranks (DeepSpeed's
layout): dp_rank = edp_rank * ep + ep_rank, so the ``ep`` consecutive data-parallel replicas of an
expert-parallel group hold different experts, and replicas holding the same experts form an
expert-data-parallel group over which expert gradients are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from forge_dist.errors import ConfigError

Group = Tuple[int, ...]
KINDS = ("tp", "dp", "pp", "ep", "expert_dp", "embedding", "mp")


@dataclass(frozen=True)
class RankCoord:
    pp: int
    dp: int
    tp: int
    ep: int  # position inside the expert-parallel group
    edp: int  # position inside the expert-data-parallel group


class Topology:
    """Sizes and rank coordinates of a (pp x dp x tp) grid, ep dividing dp.

    ``groups(kind)`` lists every group of a kind as sorted rank tuples; each rank is in exactly one
    group of each kind, except embedding: the first and last pipeline stage of one (dp, tp)
    position, which hold the tied wte / lm_head (middle stages are in none). mp (model parallel:
    tp x pp) are the ranks holding one copy of the model, as DeepSpeed's mpu calls it.
    """

    def __init__(self, world_size: int, tp: int = 1, pp: int = 1, dp: Optional[int] = None, ep: int = 1):
        for name, v in (("world_size", world_size), ("tensor_parallel_size", tp),
                        ("pipeline_parallel_size", pp), ("expert_parallel_size", ep)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not a product of tensor_parallel_size={tp} x "
                f"pipeline_parallel_size={pp} x a data-parallel size: launch a multiple of {tp * pp} "
                f"processes or change the parallel sizes")
        if dp is None:
            dp = world_size // (tp * pp)
        if tp * pp * dp != world_size:
            raise ConfigError(f"tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp} != world size {world_size}")
        if dp % ep:
            raise ConfigError(
                f"expert_parallel_size={ep} must divide the data-parallel size {dp} "
                f"(= world {world_size} / (tp={tp} x pp={pp})): experts are spread over data-parallel "
                f"replicas; choose ep among {[d for d in range(1, dp + 1) if dp % d == 0]}")
        self.world_size, self.tp, self.pp, self.dp, self.ep = world_size, tp, pp, dp, ep
        self.edp = dp // ep

    def __repr__(self) -> str:
        return f"Topology(world_size={self.world_size}, tp={self.tp}, pp={self.pp}, dp={self.dp}, ep={self.ep})"

    # --- coordinates --------------------------------------------------------------------------
    def rank(self, pp: int, dp: int, tp: int) -> int:
        if not (0 <= pp < self.pp and 0 <= dp < self.dp and 0 <= tp < self.tp):
            raise ValueError(f"coordinate (pp={pp}, dp={dp}, tp={tp}) outside {self}")
        return (pp * self.dp + dp) * self.tp + tp

    def coord(self, rank: int) -> RankCoord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return RankCoord(pp=pp, dp=dp, tp=tp, ep=dp % self.ep, edp=dp // self.ep)

    # --- groups -------------------------------------------------------------------------------
    def groups(self, kind: str) -> List[Group]:
        r, P, D, T, E = self.rank, self.pp, self.dp, self.tp, self.ep
        if kind == "tp":
            return [tuple(r(p, d, t) for t in range(T)) for p in range(P) for d in range(D)]
        if kind == "dp":
            return [tuple(r(p, d, t) for d in range(D)) for p in range(P) for t in range(T)]
        if kind == "pp":
            return [tuple(r(p, d, t) for p in range(P)) for d in range(D) for t in range(T)]
        if kind == "ep":
            return [tuple(r(p, g * E + e, t) for e in range(E))
                    for p in range(P) for g in range(self.edp) for t in range(T)]
        if kind == "expert_dp":
            return [tuple(r(p, g * E + e, t) for g in range(self.edp))
                    for p in range(P) for e in range(E) for t in range(T)]
        if kind == "embedding":
            return [tuple(sorted({r(0, d, t), r(P - 1, d, t)})) for d in range(D) for t in range(T)]
        if kind == "mp":
            return [tuple(sorted(r(p, d, t) for p in range(P) for t in range(T))) for d in range(D)]
        raise ValueError(f"unknown group kind {kind!r}; kinds: {', '.join(KINDS)}")

    def group_of(self, kind: str, rank: int) -> Group:
        """The group of ``kind`` that contains ``rank`` (computed directly, O(group size))."""
        c = self.coord(rank)
        r = self.rank
        if kind == "tp":
            return tuple(r(c.pp, c.dp, t) for t in range(self.tp))
        if kind == "dp":
            return tuple(r(c.pp, d, c.tp) for d in range(self.dp))
        if kind == "pp":
            return tuple(r(p, c.dp, c.tp) for p in range(self.pp))
        if kind == "ep":
            return tuple(r(c.pp, c.edp * self.ep + e, c.tp) for e in range(self.ep))
        if kind == "expert_dp":
            return tuple(r(c.pp, g * self.ep + c.ep, c.tp) for g in range(self.edp))
        if kind == "embedding":  # empty for a middle pipeline stage
            if c.pp not in (0, self.pp - 1):
                return ()
            return tuple(sorted({r(0, c.dp, c.tp), r(self.pp - 1, c.dp, c.tp)}))
        if kind == "mp":
            return tuple(sorted(r(p, c.dp, t) for p in range(self.pp) for t in range(self.tp)))
        raise ValueError(f"unknown group kind {kind!r}; kinds: {', '.join(KINDS)}")

    def tp_replica_groups(self, num_shards: int) -> List[Group]:
        """Split each TP group into ``num_shards`` blocks of adjacent ranks; rank t of a TP group
        holds shard t // (tp / num_shards). The groups returned are the ranks holding the *same*
        shard (e.g. one replicated KV head when n_kv_group < tp): their gradients are summed."""
        if num_shards < 1 or self.tp % num_shards:
            raise ValueError(f"{num_shards} shards do not divide tensor_parallel_size={self.tp}")
        k = self.tp // num_shards
        return [g[s * k:(s + 1) * k] for g in self.groups("tp") for s in range(num_shards)]

    def all_groups(self) -> Dict[str, List[Group]]:
        return {kind: self.groups(kind) for kind in KINDS}
