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


def shard_pieces(local: torch.Tensor, info: Optional[ShardInfo], groups: ProcessGroups) -> List[Piece]:
    """The pieces of the logical tensor that ``local`` holds (see the module doc)."""
    if info is None or info.dim is None:
        return [(local, (0,) * local.dim())]
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
        if size <= 0:
            continue
        offsets = [0] * local.dim()
        offsets[d] = start
        out.append((local.narrow(d, j * piece, size), tuple(offsets)))
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
    """DCP's default save planner that resolves LocalShards pieces (contiguous, on CPU)."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        if isinstance(obj, LocalShards):
            return obj.__get_tensor_shard__(index).detach().cpu().contiguous()
        return super().lookup_object(index)


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
