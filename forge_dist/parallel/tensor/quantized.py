"""Quantizing modules under tensor parallelism: every per-tensor statistic reduced over the TP
group, so each rank quantizes exactly as the single-device model does.

The quantizers (forge_dist.ops.reference.quantize) pass every statistic through the module's
``reduce_stats(value, op)`` hook, op in {max, min, sum}; a mean is a sum divided by a summed
count. ``StatReducer`` is that hook for a module holding a shard.

  quantized_column / quantized_row  a quantized linear (quantized_linear, bitlinear*, ...) split by
                          rows or columns *in place*: it keeps its class, so its QAT schedule,
                          eval caches and export stay its own; an input mapping (forward pre-hook),
                          ``reduce_stats`` and, for rows, ``reduce_partial`` (the partial product
                          summed before the bias and any output scaling, forge_dist.model.linear)
                          are set on it
  QuantizedVocabParallelEmbedding   the token table split by vocabulary rows, rows fake-quantized
                          with the statistics of the whole (unpadded) table
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.model.quantize import QuantizedEmbedding, QuantizedModule, fake_quant
from forge_dist.parallel.groups import RankGroup
from forge_dist.parallel.tensor import mappings
from forge_dist.parallel.tensor.layers import enter_column, reduce_row, sharded_parameter
from forge_dist.parallel.tensor.metadata import ShardInfo
from forge_dist.parallel.tensor.vocab import VocabParallelEmbedding


_OPS = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}


class _ReduceStat(torch.autograd.Function):
    """A statistic that carries a gradient (bitlinear's output absmax): forward all-reduce with its
    op. Each rank's gradient of the global value is partial (from its own shard's use of it), so
    the backward sums them; a max or min passes the sum to the rank(s) holding the extreme value,
    split evenly over ranks that tie (torch.amax splits evenly over tied elements)."""

    @staticmethod
    def forward(ctx, value, group: RankGroup, op: str):
        out = group.all_reduce(value, op=_OPS[op])
        ctx.save_for_backward(value, out)
        ctx.group, ctx.op = group, op
        return out

    @staticmethod
    def backward(ctx, grad):
        value, out = ctx.saved_tensors
        total = ctx.group.all_reduce(grad.contiguous())
        if ctx.op == "sum":
            return total, None, None
        hit = (value == out).to(grad.dtype)
        return total * hit / ctx.group.all_reduce(hit).clamp(min=1), None, None


class StatReducer:
    """``reduce_stats`` of a module whose tensor is split over ``group``: each statistic is
    all-reduced with its op (max and min are idempotent; sums add the shards' parts).

    per_slice: statistics taken along a dim (per token over the features: tensor_stat with ``dim``
    keeps it, so they are not 0-d) are reduced too; False where those features are whole on this
    rank (a column-parallel layer's input, a row-parallel layer's summed output).
    empty: this rank's part holds no real entries (a vocabulary shard that is all padding): it
    contributes each reduction's identity instead of a value computed from a placeholder.
    """

    IDENTITY = {"max": -math.inf, "min": math.inf, "sum": 0.0}

    def __init__(self, group: RankGroup, per_slice: bool = True, empty: bool = False):
        self.group, self.per_slice, self.empty = group, per_slice, empty

    def __call__(self, value: torch.Tensor, op: str) -> torch.Tensor:
        if self.group.size == 1 or (not self.per_slice and value.dim() > 0):
            return value
        if self.empty:
            value = torch.full_like(value, self.IDENTITY[op])
        if value.requires_grad and torch.is_grad_enabled():
            return _ReduceStat.apply(value, self.group, op)
        return self.group.all_reduce(value, op=_OPS[op])

    def __repr__(self) -> str:
        return f"StatReducer({self.group.name}, size={self.group.size}, per_slice={self.per_slice})"


def _reshard(module: nn.Module, name: str, info: ShardInfo, group: RankGroup) -> None:
    setattr(module, name, sharded_parameter(getattr(module, name), info, group))


def quantized_column(linear: nn.Linear, group: RankGroup, *, input_mode: str = "copy",
                     num_shards: Optional[int] = None, segments: int = 1, per_slice: bool = True) -> nn.Linear:
    """Output features of ``linear`` split over ``group`` in place (layout as ColumnParallelLinear).
    per_slice: whether its per-token statistics run over its (split) outputs, as bitlinear's output
    rescale does, rather than over its (whole) input, as bitlinear_1p58's input quantizer does."""
    n = group.size if num_shards is None else num_shards
    for name in ("weight", "bias"):
        t = getattr(linear, name)
        if t is not None:
            _reshard(linear, name, ShardInfo(tuple(t.shape), 0, n, segments, partial_grad=n < group.size), group)
    linear.out_features = linear.weight.shape[0]
    linear.reduce_stats = StatReducer(group, per_slice=per_slice)
    if input_mode != "none" and group.size > 1:
        linear.register_forward_pre_hook(lambda m, args: (enter_column(args[0], group, input_mode),) + args[1:])
    return linear


def quantized_row(linear: nn.Linear, group: RankGroup, *, input_is_parallel: bool = True,
                  sequence_parallel: bool = False, output_mode: str = "exit", per_slice: bool = True) -> nn.Linear:
    """Input features of ``linear`` split over ``group`` in place (layout as RowParallelLinear); its
    partial product is summed through ``reduce_partial`` before the bias and any output scaling.
    per_slice: whether its per-token statistics run over its (split) input rather than over its
    (summed, whole) output."""
    if output_mode == "deferred":
        raise ValueError(f"{type(linear).__qualname__} adds its bias inside its own forward: its row-parallel "
                         f"output cannot be deferred to a later sum")
    _reshard(linear, "weight", ShardInfo(tuple(linear.weight.shape), 1, group.size), group)
    if linear.bias is not None:
        partial = group.size > 1 and (sequence_parallel or output_mode != "exit")
        _reshard(linear, "bias", ShardInfo.replicated(linear.bias, partial_grad=partial), group)
    linear.in_features = linear.weight.shape[1]
    linear.reduce_stats = StatReducer(group, per_slice=per_slice)
    if group.size > 1:
        linear.reduce_partial = lambda y: reduce_row(y, group, output_mode, sequence_parallel)
        if not input_is_parallel:
            linear.register_forward_pre_hook(
                lambda m, args: (mappings.scatter_to_tp_region(args[0], group),) + args[1:])
    return linear


class QuantizedVocabParallelEmbedding(QuantizedModule, VocabParallelEmbedding):
    """VocabParallelEmbedding whose looked-up rows are fake-quantized per tensor with the statistics
    of the whole table, as QuantizedEmbedding: each rank takes them over its real (unpadded) rows
    and StatReducer combines them; a rank holding only padding contributes nothing. Each rank
    quantizes the rows tensor (B, T, D) it looked up (zeros where another rank owns the id), so a
    stochastic quantizer draws the same numbers at the same positions as on one device; then the
    rows it does not own are zeroed and the ranks' rows are summed, as in the plain embedding."""

    def __init__(self, embedding: QuantizedEmbedding, group: RankGroup, divisible_by: int, config):
        VocabParallelEmbedding.__init__(self, embedding.weight, group, divisible_by)
        self._init_quant(config, embedding.quant_method, embedding.quant_bits)
        self.real_rows = max(0, min(self.num_embeddings, self.vocab_end) - self.vocab_start)
        self.reduce_stats = StatReducer(group, empty=self.real_rows == 0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        rows = F.embedding((idx - self.vocab_start).masked_fill(outside, 0), self.weight)
        table = self.weight.detach()[: max(self.real_rows, 1)]  # one placeholder row when all padding
        rows = fake_quant(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.quant_method, self.quant_bits,
                          self.current_level(), reduce_stats=self.reduce_stats, stats_from=table)
        return mappings.reduce_from_tp_region(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.quant_method}, bits={self.quant_bits}"
