"""The collective flight recorder: what each rank last asked the others for, to diagnose hangs.

Every collective forge_dist issues passes through ``FlightRecorder.collective`` (RankGroup's
methods, RunContext's stop flags and means, the engines' overflow flags). It keeps

  * a sequence number per process group (the n-th collective of this rank on that group): ranks
    of a group that are in sync are at the same number, so the rank that did not arrive shows;
  * a ring of the last ``capacity`` entries: op, group, sizes, dtype, call site, start, duration;
  * the entry in flight (``current``), which a watchdog thread reads while the main thread waits;
  * the seconds spent inside collectives (``comm_s``): step time minus this is the time a rank
    computed, whose maximum over ranks names the straggler (the others wait for it).

With ``debug`` on, the members of the group first exchange a fingerprint (op, shapes, dtype,
sequence number, call site) and every member raises ``CollectiveMismatch`` at the first difference,
naming the ranks and their call sites: the classic "one rank took another branch" bug becomes one
line instead of a hang. This costs one object all-gather per collective: for debugging only.

One recorder per process, created with the ProcessGroups and passed explicitly (no module state).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# frames of the communication plumbing itself, skipped when naming a collective's call site
_PLUMBING = ("flight.py", "groups.py", "contextlib.py", "mappings.py", "context.py", "function.py")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CollectiveMismatch(RuntimeError):
    """--debug_collectives: the members of a group asked for different collectives."""


@dataclass
class Entry:
    seq: int
    op: str
    group: str  # name (tp, dp, world, ...) with its ranks
    ranks: Tuple[int, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtype: str
    site: str
    start: float  # time.time()
    duration: Optional[float] = None  # None while in flight
    error: Optional[str] = None  # the exception it raised (a lost peer, a timeout)

    def fingerprint(self) -> tuple:
        return (self.op, self.group, self.shapes, self.dtype, self.seq)

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) or "scalar" for s in self.shapes)
        when = time.strftime("%H:%M:%S", time.localtime(self.start)) + f".{int(self.start % 1 * 1000):03d}"
        state = "IN FLIGHT" if self.duration is None else f"{self.duration * 1e3:.2f} ms"
        state += f"  FAILED: {self.error}" if self.error else ""
        return f"#{self.seq:<6d} {self.group:<18s} {self.op:<16s} {self.dtype}[{shapes}] at {self.site}  {when}  {state}"


def call_site(skip: int = 1) -> str:
    """``path:line in function`` of the first frame outside the communication plumbing; in a
    backward pass, the autograd node and the innermost forge_dist frame (autograd's engine calls it)."""
    frame = sys._getframe(skip)
    node = torch._C._current_autograd_node()
    innermost = None
    while frame is not None:
        name, short = _file_names(frame.f_code.co_filename)
        here = f"{short}:{frame.f_lineno} in {frame.f_code.co_name}"
        if name not in ("flight.py", "contextlib.py", "groups.py", "context.py") and innermost is None:
            innermost = here
        if node is not None and innermost is not None:
            return f"backward of {node.name()} ({innermost})"
        if node is None and name not in _PLUMBING:
            return here
        frame = frame.f_back
    return innermost or "?"


@functools.lru_cache(maxsize=4096)
def _file_names(path: str) -> Tuple[str, str]:
    """(base name, path as shown) of a source file; cached: collectives run in hot loops."""
    return os.path.basename(path), _short_path(path)


def _short_path(path: str) -> str:
    path = os.path.abspath(path)
    parent = os.path.dirname(_PACKAGE_ROOT)
    return os.path.relpath(path, parent) if path.startswith(_PACKAGE_ROOT + os.sep) else path


@dataclass
class FlightRecorder:
    rank: int = 0
    capacity: int = 64
    debug: bool = False  # --debug_collectives: compare fingerprints before each collective
    step: Optional[int] = None  # the training iteration in progress (set by the trainer)
    ring: Deque[Entry] = field(default_factory=deque)
    seq: Dict[str, int] = field(default_factory=dict)
    current: Optional[Entry] = None
    comm_s: float = 0.0
    failed: Optional[Entry] = None  # the last collective that raised
    pending: Dict[int, Entry] = field(default_factory=dict)  # asynchronous collectives in flight

    def __post_init__(self):
        self.ring = deque(maxlen=self.capacity)
        self._lock = threading.Lock()  # the watchdog thread reads while the main thread appends

    @staticmethod
    def group_label(name: str, ranks: Sequence[int]) -> str:
        ranks = list(ranks)
        shown = ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]},{ranks[1]},...,{ranks[-1]}"
        return f"{name}({shown})"

    def _entry(self, op: str, group: str, ranks: Sequence[int], tensors: Sequence[torch.Tensor], handle) -> Entry:
        label = self.group_label(group, ranks)
        with self._lock:
            seq = self.seq[label] = self.seq.get(label, 0) + 1
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        entry = Entry(seq, op, label, tuple(ranks), tuple(tuple(t.shape) for t in tensors),
                      str(tensors[0].dtype).replace("torch.", "") if tensors else "object", call_site(2), time.time())
        if self.debug:
            self._compare(entry, list(ranks), handle)
        return entry

    def issue(self, op: str, group: str, ranks: Sequence[int], tensors: Sequence[torch.Tensor] = (),
              handle=None) -> Entry:
        """An asynchronous collective (DDP's bucket all-reduces): in flight until ``complete``."""
        entry = self._entry(op, group, ranks, tensors, handle)
        with self._lock:
            self.ring.append(entry)
            self.pending[id(entry)] = entry
        return entry

    def complete(self, entry: Entry, error: Optional[BaseException] = None) -> None:
        with self._lock:
            entry.duration = time.time() - entry.start
            self.pending.pop(id(entry), None)
            if error is not None:
                entry.error = " ".join(str(error).split())[:300] or type(error).__name__
                self.failed = entry

    def in_flight(self) -> Optional[Entry]:
        """The collective this rank waits for: the blocking one, else the oldest asynchronous one."""
        with self._lock:
            return self.current or next(iter(self.pending.values()), None)

    @contextlib.contextmanager
    def collective(self, op: str, group: str, ranks: Sequence[int], tensors: Sequence[torch.Tensor] = (),
                   handle=None) -> Iterator[Entry]:
        """Record one collective of this rank on ``group`` (members ``ranks``) around the call."""
        entry = self._entry(op, group, ranks, tensors, handle)
        with self._lock:
            self.ring.append(entry)
            self.current = entry
        t0 = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            entry.error = " ".join(str(e).split())[:300] or type(e).__name__
            self.failed = entry
            raise
        finally:
            elapsed = time.perf_counter() - t0
            with self._lock:
                entry.duration = elapsed
                self.current = None
                self.comm_s += elapsed

    def _compare(self, entry: Entry, ranks: List[int], handle) -> None:
        import torch.distributed as dist

        mine = (entry.fingerprint(), entry.site)
        theirs: List[object] = [None] * len(ranks)
        dist.all_gather_object(theirs, mine, group=handle)
        if all(t[0] == mine[0] for t in theirs):
            return
        lines = []
        for rank, (fp, site) in zip(ranks, theirs):
            op, _, shapes, dtype, seq = fp
            lines.append(f"rank {rank}: {op} {dtype}{[list(s) for s in shapes]} (#{seq}) at {site}")
        raise CollectiveMismatch(f"--debug_collectives: the ranks of group {entry.group} asked for different "
                                 f"collectives at step {self.step}: " + "; ".join(lines))

    def snapshot(self) -> Tuple[List[Entry], Optional[Entry], Dict[str, int]]:
        with self._lock:
            return list(self.ring), self.current, dict(self.seq)

    def take_comm_seconds(self) -> float:
        """Seconds spent in collectives since the last call (the trainer calls it once per step)."""
        with self._lock:
            value, self.comm_s = self.comm_s, 0.0
        return value

    def format_ring(self) -> str:
        ring, _, _ = self.snapshot()
        return "\n".join(e.describe() for e in ring) or "(no collective yet)"


def recorded(recorder: Optional[FlightRecorder], op: str, group: str, ranks: Sequence[int],
             tensors: Sequence[torch.Tensor] = (), handle=None):
    """``recorder.collective(...)``, or nothing when there is no recorder (a world of one)."""
    if recorder is None:
        return contextlib.nullcontext()
    return recorder.collective(op, group, ranks, tensors, handle)
