"""Drawing only what a rank keeps gives exactly a full build's values.

``InitRule.chunks`` yields a parameter's full value in pieces bit-identical to ``build`` (and
leaves its generator where ``build`` leaves it), for every rule, every token-table variant, fp32
and fp64, sizes below 16, not multiples of 16, and piece boundaries inside rows. ``Kept.take`` cuts
from those pieces exactly what ``shard_tensor`` cuts from the full tensor (rows, columns, gated
halves, KV replicas, vocabulary padding), and of that any flat range (a ZeRO-3 partition), and
stops pulling pieces once its part is complete. A GPT drawn through ``materialize(keep=...)``
with small pieces equals ``GPT(cfg)`` for every init_variant.
"""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from forge_dist import ModelConfig
from forge_dist.model.init import InitRule, param_generator
from forge_dist.parallel.kept import Kept
from forge_dist.parallel.tensor.metadata import ShardInfo, shard_tensor

SHAPES = [(1,), (5,), (15,), (16,), (17,), (3, 5), (7, 9), (4, 16), (33, 7), (5, 48), (2, 3, 11), (130, 3)]
CHUNKS = [16, 32, 48, 160]
VARIANTS = ["gaussian", "onehot", "hypercube", "rand_hypercube", "unique_hypercube", "angle_hypersphere",
            "gaussian_norm_range"]


def _config(variant="gaussian"):
    extra = dict(gaussian_min_norm=0.0, gaussian_max_norm=10.0) if variant == "gaussian_norm_range" else {}
    return ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=32, block_size=8, init_variant=variant,
                       embedding_mean_init=0.25, embedding_std_init=0.5, **extra)


def _drawn(rule, cfg, shape, chunk):
    g_full, g_piece = param_generator(1, "w"), param_generator(1, "w")
    full = rule.build(cfg, shape, g_full)
    pieces = [p.clone() for p in rule.chunks(cfg, shape, g_piece, chunk=chunk)]
    return full, pieces, g_full, g_piece


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", [InitRule("normal", 0.1, 0.02), InitRule("zeros"), InitRule("embedding")])
def test_chunks_are_the_full_draw_bit_for_bit(rule, dtype):
    cfg = _config()
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for shape in SHAPES:
            for chunk in CHUNKS:
                full, pieces, g_full, g_piece = _drawn(rule, cfg, shape, chunk)
                assert all(p.dtype == dtype for p in pieces)
                assert torch.equal(torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype), full.reshape(-1)), \
                    (shape, chunk)
                assert torch.equal(g_full.get_state(), g_piece.get_state()), (shape, chunk)
                assert all(p.numel() <= chunk + 15 for p in pieces)  # never the whole tensor at once
    finally:
        torch.set_default_dtype(before)


def test_every_token_table_variant_chunks_to_its_full_draw():
    shape = (32, 40)
    for variant in VARIANTS:
        cfg = _config(variant)
        full, pieces, _, _ = _drawn(InitRule("embedding"), cfg, shape, 64)
        assert torch.equal(torch.cat(pieces), full.reshape(-1)), variant
        assert (len(pieces) > 1) == (variant == "gaussian"), variant  # only the normal draw streams


def test_numpy_import_table_chunks_to_its_file(tmp_path):
    path = tmp_path / "wte.npy"
    np.save(path, np.arange(32 * 40, dtype=np.float32).reshape(32, 40))
    cfg = replace(_config("numpy_import"), init_wte_npy=str(path))
    full, pieces, _, _ = _drawn(InitRule("embedding"), cfg, (32, 40), 64)
    assert torch.equal(torch.cat(pieces), full.reshape(-1))


def test_chunk_must_be_a_positive_multiple_of_16():
    for bad in (0, 8, 40):
        with pytest.raises(ValueError, match="multiple of 16"):
            next(InitRule("normal", 0.0, 1.0).chunks(_config(), (64,), param_generator(0, "w"), chunk=bad))


def _layouts():
    """(full shape, ShardInfo, tp size): row and column splits, gated [a | b] halves, fewer
    shards than ranks (replicated KV heads), vocabulary padding, a 3-d tensor split inside."""
    yield (12, 7), ShardInfo((12, 7), 0, num_shards=2), 2
    yield (12, 7), ShardInfo((12, 7), 1, num_shards=1), 2  # replicas: both ranks hold it all
    yield (9, 10), ShardInfo((9, 10), 1, num_shards=2), 2
    yield (16, 5), ShardInfo((16, 5), 0, num_shards=4, segments=2), 4
    yield (6, 16), ShardInfo((6, 16), 1, num_shards=2, segments=2), 2
    yield (8, 3), ShardInfo((8, 3), 0, num_shards=2), 4  # KV heads: rank pairs hold one shard
    yield (13, 6), ShardInfo((13, 6), 0, num_shards=4, padded_size=16), 4  # last rank: 3 real rows + 1 pad
    yield (13, 6), ShardInfo((13, 6), 0, num_shards=2, padded_size=16), 2
    yield (3, 10, 5), ShardInfo((3, 10, 5), 1, num_shards=2), 2
    yield (40,), ShardInfo((40,), 0, num_shards=4), 4


def _pieces(full, chunk, pulled=None):
    flat = full.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        if pulled is not None:
            pulled.append(i)
        yield flat[i:i + chunk]


def test_take_cuts_what_shard_tensor_cuts_for_every_layout_and_piece_size():
    for shape, info, size in _layouts():
        full = torch.randn(shape, dtype=torch.float64)
        for rank in range(size):
            want = shard_tensor(full, info, rank, size)
            meta = torch.empty(want.shape, device="meta")
            kept = Kept.of(meta, shape, info, rank, size)
            for chunk in (1, 3, 7, 16, 50, full.numel()):
                got = kept.take(_pieces(full, chunk), torch.float64)
                assert torch.equal(got, want), (shape, info, rank, chunk)


def test_take_of_a_flat_range_writes_exactly_that_range_of_the_shard():
    for shape, info, size in _layouts():
        full = torch.randn(shape)
        for rank in range(size):
            want = shard_tensor(full, info, rank, size).reshape(-1)
            n = want.numel()
            kept = Kept.of(torch.empty(n, device="meta").view(shard_tensor(full, info, rank, size).shape),
                           shape, info, rank, size)
            for parts in (1, 2, 3, 4):  # DeepSpeed's partitions: ceil(n / parts) each
                step = -(-n // parts)
                for p in range(parts):
                    start = min(p * step, n)
                    stop = min(start + step, n)
                    for chunk in (1, 5, 16):
                        got = kept.partition(start, stop).take(_pieces(full, chunk), torch.float32).reshape(-1)
                        assert torch.equal(got[start:stop], want[start:stop]), (shape, info, rank, parts, p, chunk)


def test_take_stops_drawing_once_its_part_is_complete():
    full = torch.randn(64, 16)
    kept = Kept.of(torch.empty(32, 16, device="meta"), (64, 16), ShardInfo((64, 16), 0, num_shards=2), 0, 2)
    pulled = []
    kept.take(_pieces(full, 16 * 8, pulled), torch.float32)
    assert len(pulled) == 4  # the first half of the rows: 4 of the 8 pieces
    pulled = []
    whole = Kept.of(torch.empty(64, 16, device="meta"), (64, 16))
    whole.partition(0, 100).take(_pieces(full, 16 * 8, pulled), torch.float32)
    assert len(pulled) == 1


def test_take_casts_to_the_parameter_dtype_as_a_full_cast_does():
    full = torch.randn(10, 6, dtype=torch.float64)
    info = ShardInfo((10, 6), 1, num_shards=2)
    kept = Kept.of(torch.empty(10, 3, device="meta"), (10, 6), info, 1, 2)
    got = kept.take(_pieces(full, 7), torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, shard_tensor(full, info, 1, 2).to(torch.bfloat16))


def test_a_model_drawn_in_small_pieces_equals_the_full_build(monkeypatch):
    """Through GPT.materialize with every parameter 'kept' whole and pieces of 48 elements (so every
    tensor is streamed across many pieces): every init_variant equals GPT(cfg) exactly."""
    import forge_dist.model.init as init
    from forge_dist.model.deferred import logical_shape
    from forge_dist.model.gpt import GPT

    monkeypatch.setattr(init, "CHUNK", 48)
    for variant in ("gaussian", "angle_hypersphere"):
        cfg = replace(_config(variant), n_embd=24, n_head=2, vocab_size=37, n_layer=2)
        torch.manual_seed(4)
        ref = GPT(cfg)
        torch.manual_seed(4)
        model = GPT(cfg, defer_init=True)
        kept = {}
        model.materialize(keep=lambda name, p: kept.setdefault(name, Kept.of(p, logical_shape(p))))
        assert kept and all(math.prod(k.shape) == math.prod(k.full_shape) for k in kept.values())
        a, b = ref.state_dict(), model.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a), variant
