"""A ZeRO partition's flat range of one parameter as DCP pieces (parallel/sharded_state.py
fragment_pieces): the boxes cover the range exactly once, in order, and map through a tensor-parallel
split to the logical tensor's values."""
import itertools
from types import SimpleNamespace

import torch

from forge_dist.parallel.sharded_state import flat_boxes, fragment_pieces
from forge_dist.parallel.tensor.metadata import ShardInfo


def test_flat_boxes_cover_the_range_in_order():
    for shape in ((7,), (3, 5), (2, 3, 4), (4, 1, 3)):
        numel = int(torch.tensor(shape).prod())
        flat = torch.arange(numel).view(shape)
        for start, end in itertools.combinations(range(numel + 1), 2):
            got = torch.cat([flat[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].reshape(-1)
                             for offs, sizes in flat_boxes(shape, start, end)])
            assert torch.equal(got, torch.arange(start, end)), (shape, start, end)
            assert len(flat_boxes(shape, start, end)) <= 2 * len(shape) - 1


class _Groups:
    def __init__(self, rank, size):
        self.group = SimpleNamespace(rank=rank, size=size)

    def get(self, kind):
        return self.group


def test_fragment_pieces_land_on_the_logical_values():
    """Every flat range of every TP rank's shard (row split, column split, segments as in a fused
    QKV weight, replicated) holds the logical tensor's values at the pieces' offsets, and
    the ranges of all ranks cover the logical tensor once."""
    logical = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)
    cases = [ShardInfo((6, 8), 0, 2), ShardInfo((6, 8), 1, 2), ShardInfo((6, 8), 0, 2, segments=3),
             ShardInfo((6, 8), 1, 2, segments=2), ShardInfo((6, 8), None)]
    for info in cases:
        for cut in range(1, 24):
            count = torch.zeros_like(logical)
            for rank in range(2 if info.dim is not None else 1):
                groups = _Groups(rank, 2)
                local = _local(logical, info, rank)
                flat = local.reshape(-1)
                for start, end in ((0, cut), (cut, flat.numel())):
                    for piece, offsets in fragment_pieces(flat[start:end].clone(), start, tuple(local.shape), info,
                                                          groups):
                        index = tuple(slice(o, o + s) for o, s in zip(offsets, piece.shape))
                        assert torch.equal(logical[index], piece), (info, rank, cut, offsets)
                        count[index] += 1
            assert torch.equal(count, torch.ones_like(logical)), (info, cut)


def _local(logical, info, rank):
    if info.dim is None:
        return logical
    blocks = logical.chunk(info.segments, info.dim)
    return torch.cat([b.chunk(info.num_shards, info.dim)[rank] for b in blocks], info.dim)
