"""Communication accounting: a debug counter of the collectives forge_dist issues.

Every collective of the parallel layers goes through a ``RankGroup`` method (groups.py), which
reports it here while a counter is active (``with groups.count_collectives() as c:``). The
counter belongs to the ProcessGroups object it was opened on, so no module-level state exists.

Two sizes are recorded per collective: ``nbytes``, the full (unsharded) payload, and ``traffic``,
the bytes each rank sends with the bandwidth-optimal ring algorithm:
all_reduce 2 (n-1)/n * nbytes; all_gather and reduce_scatter (n-1)/n * nbytes. So an all-reduce
costs exactly one reduce-scatter plus one all-gather of the same tensor, which is why sequence
parallelism moves no more data than plain tensor parallelism.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class CommEvent:
    phase: str  # forward | backward | grad_sync | other label given by the caller
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all
    group: str  # tp, dp, ... (the RankGroup's name)
    group_size: int
    nbytes: int
    traffic: float


def ring_traffic(kind: str, nbytes: int, n: int) -> float:
    """Bytes one rank sends for a collective over ``n`` ranks whose full payload is ``nbytes``."""
    if kind == "all_to_all":  # nbytes is what this rank sends; it keeps its own 1/n on average
        return (n - 1) / n * nbytes
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * (n - 1) / n * nbytes


def current_phase() -> str:
    """'backward' inside an autograd backward call (including recomputation), else 'forward'."""
    return "backward" if torch._C._current_autograd_node() is not None else "forward"


class CommCounter:
    """Collectives seen while active. ``count``/``nbytes``/``traffic`` filter by any of phase, kind
    and group; ``summary()`` is {(phase, kind): count}."""

    def __init__(self):
        self.events: List[CommEvent] = []

    def record(self, event: CommEvent) -> None:
        self.events.append(event)

    def _select(self, phase: Optional[str], kind: Optional[str], group: Optional[str]):
        return [e for e in self.events if (phase is None or e.phase == phase)
                and (kind is None or e.kind == kind) and (group is None or e.group == group)]

    def count(self, kind: Optional[str] = None, phase: Optional[str] = None, group: Optional[str] = None) -> int:
        return len(self._select(phase, kind, group))

    def nbytes(self, kind: Optional[str] = None, phase: Optional[str] = None, group: Optional[str] = None) -> int:
        return sum(e.nbytes for e in self._select(phase, kind, group))

    def traffic(self, kind: Optional[str] = None, phase: Optional[str] = None, group: Optional[str] = None) -> float:
        return sum(e.traffic for e in self._select(phase, kind, group))

    def summary(self) -> Dict[Tuple[str, str], int]:
        return dict(Counter((e.phase, e.kind) for e in self.events))

    def reset(self) -> None:
        self.events.clear()

    def __repr__(self) -> str:
        items = ", ".join(f"{p}/{k}: {n}" for (p, k), n in sorted(self.summary().items()))
        return f"CommCounter({items})"
