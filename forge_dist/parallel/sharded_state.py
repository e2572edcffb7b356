"""This rank's part of the logical state, as torch.distributed.checkpoint (DCP) sees it.

A tensor-parallel parameter's local tensor is, by its ShardInfo (tensor/metadata.py), one piece
of each of its ``segments`` blocks of the logical tensor (padding beyond the logical length
dropped). ``LocalShards`` lists those pieces with their offsets in the logical tensor and
implements DCP's checkpointable protocol (``__create_write_items__``, ``__create_chunk_list__``,
``__get_tensor_shard__``), so:

  save   every rank writes only its pieces, under the logical name and shape; ranks holding the
         same piece (TP replicas of a KV head, data-parallel replicas) are deduplicated by DCP's
         planner, so each value is written once;
  load   every rank asks for the pieces of the layout it runs now, and DCP reads them from
         whichever saved chunks overlap them: resharding (TP 2 -> 1, 1 -> 2, 2 -> 4, any DP size)
         with no rank ever holding a full tensor.

Pieces are views of the local tensor, so a load writes straight into the parameters/moments.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor.metadata import ShardInfo

Piece = Tuple[torch.Tensor, Tuple[int, ...]]  # (view of the local tensor, offsets in the logical one)


def _tp_segments(info: Optional[ShardInfo], groups: ProcessGroups) -> Optional[Tuple[int, List[Tuple[int, int, int]]]]:
    """(split dim, [(local start, logical start, size)]) of a tensor-parallel tensor: where each of
    its ``segments`` blocks lies in the local tensor and in the logical one; None if not split."""
    if info is None or info.dim is None:
        return None
    group = groups.get(info.group)
    d, n, s = info.dim, info.num_shards, info.segments
    length = info.full_shape[d]
    padded = info.padded_size or length
    if padded != length and s != 1:
        raise ValueError(f"a padded tensor split into {s} segments has no chunk layout: {info}")
    index = group.rank // (group.size // n)
    block, piece = padded // s, padded // (s * n)
    out = []
    for j in range(s):
        start = j * block + index * piece
        size = min(piece, length - start)  # padding rows are not part of the logical tensor
        if size > 0:
            out.append((j * piece, start, size))
    return d, out


def box_pieces(box: torch.Tensor, offsets: Tuple[int, ...], info: Optional[ShardInfo],
               groups: ProcessGroups) -> List[Piece]:
    """The pieces of the logical tensor that ``box`` (a view of the local tensor at ``offsets``)
    holds: split at the tensor-parallel segment boundaries, offsets mapped to logical ones."""
    split = _tp_segments(info, groups)
    if split is None:
        return [(box, tuple(offsets))]
    d, segments = split
    lo_box, hi_box = offsets[d], offsets[d] + box.shape[d]
    out = []
    for local_start, logical_start, size in segments:
        lo, hi = max(lo_box, local_start), min(hi_box, local_start + size)
        if lo < hi:
            moved = list(offsets)
            moved[d] = logical_start + lo - local_start
            out.append((box.narrow(d, lo - lo_box, hi - lo), tuple(moved)))
    return out


def shard_pieces(local: torch.Tensor, info: Optional[ShardInfo], groups: ProcessGroups) -> List[Piece]:
    """The pieces of the logical tensor that ``local`` holds (see the module doc)."""
    return box_pieces(local, (0,) * local.dim(), info, groups)


def flat_boxes(shape: Tuple[int, ...], start: int, end: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """[start, end) of a row-major tensor of ``shape`` as (offsets, sizes) boxes, in order: a
    partial row, whole rows, a partial row (recursively in the inner dims). Each box is one
    contiguous run of the flat range, so box k is the next ``prod(sizes)`` elements."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    inner = 1
    for n in shape[1:]:
        inner *= n
    out: List[Tuple[Tuple[int, ...], Tuple[int, ...]]] = []
    if start % inner:  # the partial first row
        row, stop = start // inner, min(end, (start // inner + 1) * inner)
        out += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], start - row * inner, stop - row * inner)]
        start = stop
    rows = (end - start) // inner
    if rows:
        out.append(((start // inner,) + (0,) * (len(shape) - 1), (rows, *shape[1:])))
        start += rows * inner
    if start < end:  # the partial last row
        row = start // inner
        out += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], 0, end - row * inner)]
    return out


def fragment_pieces(fragment: torch.Tensor, start: int, shape: Tuple[int, ...], info: Optional[ShardInfo],
                    groups: ProcessGroups) -> List[Piece]:
    """The pieces of the logical tensor that ``fragment`` holds: the flat range [start, start +
    numel) of a local tensor of ``shape`` (a ZeRO partition's part of one parameter), as views of
    the fragment (a load writes into it)."""
    out, at = [], 0
    for offsets, sizes in flat_boxes(tuple(shape), start, start + fragment.numel()):
        n = 1
        for s in sizes:
            n *= s
        out += box_pieces(fragment.narrow(0, at, n).view(sizes), offsets, info, groups)
        at += n
    return out


class LocalShards:
    """DCP's view of one logical tensor on this rank: its pieces (see the module doc)."""

    def __init__(self, pieces: List[Piece], size: Tuple[int, ...]):
        self.pieces, self._size = pieces, torch.Size(size)

    @classmethod
    def of(cls, local: torch.Tensor, info: Optional[ShardInfo], groups: ProcessGroups) -> "LocalShards":
        size = tuple(info.full_shape) if info is not None else tuple(local.shape)
        return cls(shard_pieces(local, info, groups), size)

    def size(self) -> torch.Size:
        return self._size

    def _chunk(self, t: torch.Tensor, offsets) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape)

    def __create_write_items__(self, fqn: str, obj) -> List[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(t, offsets),
                                                      properties=TensorProperties(dtype=t.dtype),
                                                      size=self._size))
                for t, offsets in self.pieces]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [self._chunk(t, offsets) for t, offsets in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for t, offsets in self.pieces:
            if torch.Size(offsets) == index.offset:
                return t
        raise ValueError(f"{index.fqn}: this rank holds no piece at offset {tuple(index.offset or ())}")


class ShardSavePlanner(DefaultSavePlanner):
    """DCP's default save planner that resolves LocalShards pieces (contiguous, on CPU), each as
    an alias whose storage is exactly its bytes (``exact_storage``)."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        if isinstance(obj, LocalShards):
            return exact_storage(obj.__get_tensor_shard__(index).detach().cpu().contiguous())
        return super().lookup_object(index)


def exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous, CPU) over a storage of exactly its own bytes, sharing its memory.

    DCP's file writer clones a tensor whose storage is larger than the tensor (so that torch.save
    writes only its bytes) and keeps every clone until the file is closed (torch 2.13
    ``_write_files_from_queue``): a piece that is a view of a flat partition (ZeRO-3, ZeRO-1/2
    fragments, TP slices) would otherwise cost a second copy of this rank's whole state during
    the save (docs/BENCHMARKS.md, ZeRO-3 save). A numpy view of the bytes gives torch a storage
    of that size at the same address, kept alive by ``t``."""
    if t.numel() == 0 or t.untyped_storage().nbytes() == t.nbytes or not t.is_contiguous() or t.device.type != "cpu":
        return t
    return torch.from_numpy(t.reshape(-1).view(torch.uint8).numpy()).view(t.dtype).view(t.shape)


class ShardLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner that writes into LocalShards pieces. Its set-up skips
    ``_init_state_dict`` (which allocates meta tensors, and replaces objects it does not know,
    like LocalShards, by None): our state never holds meta tensors."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = state_dict
        if self.flatten_state_dict:
            state_dict, self.mappings = flatten_state_dict(state_dict)
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, LocalShards):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)
