"""What a process keeps of a parameter, and how to draw only that.

A ``Kept`` describes the part of a parameter's logical (full) value a process holds: its
tensor-parallel shard (the parameter's ShardInfo on a rank of its group: row or column blocks,
gated halves, vocabulary padding), and of that shard a flat range (a ZeRO-3 partition; the whole
shard by default). ``take`` fills it from the full value's flat pieces in order
(``InitRule.chunks``), copying only what falls in the kept part and stopping once it is complete,
so drawing a shard holds the shard plus one piece (1 MiB), never the full parameter (a rule that
needs its whole tensor at once yields it as one piece). It keeps exactly the values
``shard_tensor`` cuts from a full single-process build.

    kept = Kept.of(param, info, tp_rank, tp_size)          # param: the meta parameter (local shape)
    value = kept.take(rule.chunks(config, full_shape, generator), dtype)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, List, Optional, Tuple

import torch

from forge_dist.parallel.tensor.metadata import ShardInfo, shard_tensor


@dataclass(frozen=True)
class Kept:
    full_shape: Tuple[int, ...]  # the logical shape
    shape: Tuple[int, ...]  # this process's shard (the local parameter's shape)
    info: Optional[ShardInfo] = None  # None, or dim None: the whole logical tensor
    rank: int = 0  # in the ShardInfo's group
    size: int = 1
    start: int = 0  # the flat range of the shard that is written; the rest is left unwritten
    stop: Optional[int] = None

    @classmethod
    def of(cls, param: torch.Tensor, full_shape, info: Optional[ShardInfo] = None, rank: int = 0,
           size: int = 1) -> "Kept":
        return cls(tuple(full_shape), tuple(param.shape), info, rank, size)

    def partition(self, start: int, stop: int) -> "Kept":
        """Only the flat range [start, stop) of the shard (a ZeRO-3 partition)."""
        return replace(self, start=start, stop=stop)

    @property
    def sharded(self) -> bool:
        return self.info is not None and self.info.dim is not None

    def take(self, pieces: Iterable[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The shard, of ``dtype``, from the full value's consecutive flat pieces; only the range is
        written (vocabulary padding in it as zeros), and no piece past it is pulled."""
        out = torch.empty(self.shape, dtype=dtype)
        flat = out.view(-1)
        start, stop = self.start, flat.numel() if self.stop is None else self.stop
        if self.sharded and self.info.padded_size and self.info.padded_size > self.full_shape[self.info.dim]:
            flat[start:stop].zero_()  # padding rows get no piece
        if start >= stop:
            return out
        for offset, piece in self._local_pieces(pieces):
            lo, hi = max(offset, start), min(offset + piece.numel(), stop)
            if lo < hi:
                flat[lo:hi].copy_(piece[lo - offset:hi - offset])
            if offset + piece.numel() >= stop:
                break
        return out

    def _local_pieces(self, pieces: Iterable[torch.Tensor]) -> Iterator[Tuple[int, torch.Tensor]]:
        """(offset in the shard's flat order, values) of the shard's elements in each full piece,
        in increasing offsets. The logical tensor is viewed as (A, L, B) around the split dim of
        length L; a piece's whole A-rows are cut by ``shard_tensor`` (vectorised), its partial rows
        by the shard's runs along L."""
        if not self.sharded:
            offset = 0
            for piece in pieces:
                yield offset, piece
                offset += piece.numel()
            return
        d = self.info.dim
        L, B = self.full_shape[d], math.prod(self.full_shape[d + 1:])
        row, local_row = L * B, self.shape[d] * B
        runs, along_dim = self._runs(), replace(self.info, dim=1)
        pos = 0
        for piece in pieces:
            p0, p1 = pos, pos + piece.numel()
            pos = p1
            p = p0
            while p < p1:
                a, into = divmod(p, row)
                if into == 0 and p1 - p >= row:  # whole rows
                    n = (p1 - p) // row
                    block = piece[p - p0:p - p0 + n * row].view(n, L, B)
                    yield a * local_row, shard_tensor(block, along_dim, self.rank, self.size).view(-1)
                    p += n * row
                    continue
                end = min(p1, (a + 1) * row)
                for s, e, loc in runs:
                    lo, hi = max(p, a * row + s * B), min(end, a * row + e * B)
                    if lo < hi:
                        yield a * local_row + loc * B + lo - a * row - s * B, piece[lo - p0:hi - p0]
                p = end

    def _runs(self) -> List[Tuple[int, int, int]]:
        """(start, end, local start) along the split dim, in logical coordinates (padding rows left
        out): where this rank's shard comes from, found by cutting ``arange`` with shard_tensor
        itself, so the layout (segments, uneven chunks, replicas) is exactly a full build's."""
        d, L = self.info.dim, self.full_shape[self.info.dim]
        padded = self.info.padded_size or L
        idx = shard_tensor(torch.arange(padded), ShardInfo((padded,), 0, self.info.num_shards, self.info.segments),
                           self.rank, self.size)
        if idx.numel() != self.shape[d]:
            raise ValueError(f"shard of {self.full_shape} by {self.info} on rank {self.rank} of {self.size} has "
                             f"{idx.numel()} rows along dim {d}, the local parameter {self.shape[d]}")
        breaks = [0, *((idx[1:] != idx[:-1] + 1).nonzero().flatten() + 1).tolist(), idx.numel()]
        runs = []
        for i0, i1 in zip(breaks, breaks[1:]):
            s, e = int(idx[i0]), min(int(idx[i1 - 1]) + 1, L)
            if s < e:
                runs.append((s, e, i0))
        return runs
