"""The building blocks of the per-variant rules against full modules, at TP=2 and 4 in a world of 4:
row outputs summed later (deferred) or feeding sharded consumers, a column layer gathering
feature shards, per-tensor statistics reduced over ranks (with gradients, and from ranks holding
only padding), whole KAN networks in column and row positions, quantized linears split in place,
and the quantized vocab-parallel embedding. Tolerance: 1e-6 relative (norm of the difference over
the norm of the full module's tensor; fp32 sums over 2-4 ranks), 1e-5 through quantizers and KANs."""
import copy

import pytest
import torch
import torch.nn as nn

from forge_dist import ModelConfig
from forge_dist.model.kan import KANetwork
from forge_dist.model.linear import BitLinear, BitLinear1p58, QuantizedLinear
from forge_dist.model.quantize import QuantizedEmbedding
from forge_dist.ops.reference.quantize import tensor_stat
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor import mappings
from forge_dist.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from forge_dist.parallel.tensor.metadata import full_tensor, shard_info, tp_grad_sync
from forge_dist.parallel.tensor.quantized import (QuantizedVocabParallelEmbedding, StatReducer, quantized_column,
                                                  quantized_row)
from forge_dist.parallel.tensor.whole import whole_column, whole_row
from forge_dist.parallel.topology import Topology
from forge_dist.testing.parity import rel_error
from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _close(name, got, expected, failures, tol=1e-6):
    err = rel_error(got, expected)
    if err > tol:
        failures.append(f"{name}: relative error {err:.3g} > {tol:g}")


def _grads_equal(name, tp_module, full_module, groups, failures, tol=1e-6):
    tp_grad_sync(tp_module, groups)
    full = dict(full_module.named_parameters())
    for n, p in tp_module.named_parameters():
        _close(f"{name} grad {n}", full_tensor(p.grad, shard_info(p), groups), full[n].grad, failures, tol)


def _blocks(rank, world_size):
    failures = []
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=16, block_size=8, vocab_size=20, kan_poly_order=2,
                      quantization_warmup_iters=0)
    for tp in (2, 4):
        groups = ProcessGroups.build(Topology(world_size, tp=tp))
        g = groups.tp
        x = torch.randn(2, 5, 16)
        up = torch.randn(2, 5, 12)
        mine = lambda t: g.split(t, -1)  # noqa: E731  (this rank's feature shard)

        # two row layers summed first, one reduction after: each bias counted once
        fulls = [nn.Linear(16, 12), nn.Linear(16, 12)]
        rows = [RowParallelLinear.from_linear(f, g, output_mode="deferred") for f in fulls]
        (sum(f(x) for f in fulls) * up).sum().backward()
        y = mappings.reduce_from_tp_region(sum(r(mine(x)) for r in rows), g)
        (y * up).sum().backward()
        _close(f"tp={tp} deferred rows", y, sum(f(x) for f in fulls), failures)
        for i, (r, f) in enumerate(zip(rows, fulls)):
            _grads_equal(f"tp={tp} deferred row {i}", r, f, groups, failures)

        # a row sum feeding sharded consumers: each rank uses the sum for its own features only
        full, consumer = nn.Linear(16, 6), torch.randn(6, 12)
        row = RowParallelLinear.from_linear(full, g, output_mode="sharded")
        xa, xs = x.clone().requires_grad_(), mine(x).clone().requires_grad_()
        (full(xa) @ consumer * up).sum().backward()
        (row(xs) @ mine(consumer) * mine(up)).sum().backward()
        _grads_equal(f"tp={tp} sharded-output row", row, full, groups, failures)
        _close(f"tp={tp} sharded-output row input grad", xs.grad, mine(xa.grad), failures)

        # a column layer whose input arrives in feature shards (co4's q projection)
        full = nn.Linear(16, 12)
        col = ColumnParallelLinear.from_linear(full, g, input_mode="features")
        xa, xs = x.clone().requires_grad_(), mine(x).clone().requires_grad_()
        (full(xa) * up).sum().backward()
        (col(xs) * mine(up)).sum().backward()
        _close(f"tp={tp} feature-gather column", col(mine(x)), mine(full(x)), failures)
        _close(f"tp={tp} feature-gather column input grad", xs.grad, mine(xa.grad), failures)

        # statistics of a split tensor: max, min, mean |x|, a rank with nothing, a gradient through a max
        t = torch.randn(4, 12)
        red = StatReducer(g)
        for kind in ("max", "min", "absmax", "absmean"):
            _close(f"tp={tp} stat {kind}", tensor_stat(mine(t), kind, reduce_stats=red), tensor_stat(t, kind), failures)
        empty = StatReducer(g, empty=g.rank == g.size - 1)
        part = t[:, : 12 // g.size * (g.size - 1)]  # the last rank holds padding only
        got = tensor_stat(g.split(t, -1) if g.rank < g.size - 1 else torch.zeros(4, 1), "absmean", reduce_stats=empty)
        _close(f"tp={tp} stat with a padding-only rank", got, tensor_stat(part, "absmean"), failures)
        ta, ts = t.clone().requires_grad_(), mine(t).clone().requires_grad_()
        (ta / tensor_stat(ta, "absmax", dim=-1)).sum().backward()
        (ts / tensor_stat(ts, "absmax", dim=-1, reduce_stats=red)).sum().backward()
        _close(f"tp={tp} gradient through a reduced max", ts.grad, mine(ta.grad), failures)

        # whole KAN networks in a column and a row position
        kan_full = KANetwork(16, 12, cfg)
        kan_col = whole_column(copy.deepcopy(kan_full), g)
        (kan_full(x) * up).sum().backward()
        (kan_col(x) * mine(up)).sum().backward()
        _close(f"tp={tp} whole KAN column", kan_col(x), mine(kan_full(x)), failures)
        _grads_equal(f"tp={tp} whole KAN column", kan_col, kan_full, groups, failures, 1e-5)
        kan_full = KANetwork(16, 12, cfg)
        kan_row = whole_row(copy.deepcopy(kan_full), g)
        _close(f"tp={tp} whole KAN row", kan_row(mine(x)), kan_full(x), failures)

        # quantized linears split in place: column and row, statistics reduced
        for cls, col_slice, row_slice in ((QuantizedLinear, True, True), (BitLinear1p58, False, True),
                                          (BitLinear, True, False)):
            full = cls(16, 12, cfg, bias=True)
            col = quantized_column(copy.deepcopy(full), g, per_slice=col_slice)
            (full(x) * up).sum().backward()
            (col(x) * mine(up)).sum().backward()
            _close(f"tp={tp} {cls.__name__} column", col(x), mine(full(x)), failures, 1e-5)
            _grads_equal(f"tp={tp} {cls.__name__} column", col, full, groups, failures, 1e-5)
            full = cls(12, 16, cfg, bias=True)
            row = quantized_row(copy.deepcopy(full), g, per_slice=row_slice)
            _close(f"tp={tp} {cls.__name__} row", row(mine(up)), full(up), failures, 1e-5)

        # the quantized token table: 20 real rows padded to 32 (tp=4: the last rank holds padding only)
        emb = QuantizedEmbedding(20, 16, cfg, "affine_quant", 4)
        vemb = QuantizedVocabParallelEmbedding(emb, g, 8, cfg)
        ids = torch.randint(0, 20, (3, 7))
        emb(ids).square().sum().backward()
        vemb(ids).square().sum().backward()
        _close(f"tp={tp} quantized vocab embedding", vemb(ids), emb(ids), failures)
        _close(f"tp={tp} quantized vocab embedding grad",
               full_tensor(vemb.weight.grad, shard_info(vemb.weight), groups), emb.weight.grad, failures)
    return failures


@pytest.mark.timeout(180)
def test_variant_building_blocks_match_full_modules():
    per_rank = spawn(_blocks, 4, timeout=160, return_all=True)
    assert per_rank == [[]] * 4, "\n".join(f for fs in per_rank for f in fs)
