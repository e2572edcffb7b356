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


def test_pieces_of_a_flat_partition_are_saved_without_copies(tmp_path, monkeypatch):
    """DCP's writer clones a piece whose storage is larger than it and keeps the clone until its
    file is closed; the save planner hands it aliases of exactly the piece's bytes instead
    (exact_storage): no clone, the same memory, and the pieces read back exactly (bf16 too)."""
    from forge_dist.io.dcp_storage import read_index
    from forge_dist.parallel.sharded_state import LocalShards, exact_storage
    from forge_dist.train.sharded_checkpoint import load_pieces, save_sharded

    for dtype in (torch.float32, torch.bfloat16):
        flat = torch.arange(60, dtype=torch.float32).to(dtype)  # a partition holding two parameters
        a, b = flat[:24].view(4, 6), flat[24:54].view(5, 6)
        alias = exact_storage(a)
        assert alias.data_ptr() == a.data_ptr() and alias.untyped_storage().nbytes() == a.nbytes
        assert torch.equal(alias, a) and alias.dtype == dtype
        state = {"model/a": LocalShards([(a, (0, 0))], (4, 6)), "model/b": LocalShards([(b, (0, 0))], (5, 6))}
        clones = []
        real_clone = torch.Tensor.clone
        monkeypatch.setattr(torch.Tensor, "clone", lambda t, *x, **k: clones.append(t.numel()) or real_clone(t, *x, **k))
        directory = str(tmp_path / str(dtype))
        save_sharded(directory, None, None, None, state=state)
        monkeypatch.setattr(torch.Tensor, "clone", real_clone)
        assert not [n for n in clones if n >= 24], clones  # no piece was cloned
        back = {"model/a": LocalShards([(torch.zeros(4, 6, dtype=dtype), (0, 0))], (4, 6)),
                "model/b": LocalShards([(torch.zeros(5, 6, dtype=dtype), (0, 0))], (5, 6))}
        load_pieces(directory, back, read_index(directory))
        assert torch.equal(back["model/a"].pieces[0][0], a) and torch.equal(back["model/b"].pieces[0][0], b)
