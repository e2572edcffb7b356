"""Column- and row-parallel linear layers, built by slicing a full initialised linear.

Y = X A^T + b with A (out, in):

  ColumnParallelLinear  A split by rows (output features): rank t computes Y_t = X A_t^T + b_t,
                        a feature shard of Y; the input must be replicated (entry mapping).
  RowParallelLinear     A split by columns (input features): rank t computes X_t A_t^T, a partial
                        sum; the exit mapping sums the partials (all-reduce, or reduce-scatter
                        into sequence shards) and the replicated bias is added once, after it.

A column layer followed by a row layer (attention's q/k/v -> c_proj, the MLP's c_fc -> c_proj)
needs one collective forward and one backward (Megatron's pairing). Parameters are cut from the
full layer with ``shard_tensor``, so TP=1 and TP=n start from identical weights, and every
parameter gets its ShardInfo.

``enter_column`` and ``reduce_row`` are the two ends as functions, so layers that keep their own
class (quantized linears, whole KAN networks: parallel/tensor/quantized.py, whole.py) use the
same mappings.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.parallel.groups import RankGroup
from forge_dist.parallel.tensor import mappings
from forge_dist.parallel.tensor.metadata import ShardInfo, set_shard_info, shard_tensor

INPUT_MODES = ("copy", "sequence", "features", "none")
OUTPUT_MODES = ("exit", "sharded", "deferred")


def enter_column(x: torch.Tensor, group: RankGroup, input_mode: str) -> torch.Tensor:
    """The input mapping of a column-parallel layer: "copy" (replicated input, gradient
    all-reduced), "sequence" (sequence shards all-gathered, gradient reduce-scattered), "features"
    (feature shards all-gathered for a layer whose outputs are sharded again, gradient
    reduce-scattered: co4's q projection), "none" (the caller entered the TP region already)."""
    if input_mode == "copy":
        return mappings.copy_to_tp_region(x, group)
    if input_mode == "sequence":
        return mappings.gather_from_sequence_region(x, group)
    if input_mode == "features":
        return mappings.gather_to_sharded_consumer(x, group)
    return x


def reduce_row(y: torch.Tensor, group: RankGroup, output_mode: str, sequence_parallel: bool) -> torch.Tensor:
    """Sum a row-parallel layer's partial products: "exit" leaves the TP region (all-reduce, or
    reduce-scatter into sequence shards); "sharded" all-reduces for consumers that are sharded
    again (each one's gradient is partial, so the backward all-reduces it too: ssm's x_proj);
    "deferred" leaves the sum to a later exit (two projections summed first: dual_path)."""
    if output_mode == "exit":
        return mappings.exit_tp_region(y, group, sequence_parallel)
    if output_mode == "sharded":
        return mappings.copy_to_tp_region(mappings.reduce_from_tp_region(y, group), group)
    return y


def sharded_parameter(full: torch.Tensor, info: ShardInfo, group: RankGroup) -> nn.Parameter:
    """A new Parameter holding this rank's shard of ``full``, tagged with ``info``."""
    p = nn.Parameter(shard_tensor(full, info, group.rank, group.size), requires_grad=full.requires_grad)
    return set_shard_info(p, info)


class ColumnParallelLinear(nn.Module):
    """Output features split over ``group``.

    input_mode: see ``enter_column``; "none" when the caller already entered the TP region, e.g.
    once for q, k and v reading the same input.
    num_shards < group size: fewer distinct shards than ranks (KV heads when n_kv_group < TP);
    adjacent ranks hold the same shard, each uses it for its own part of the computation (its own
    query heads), so each gradient is partial and tp_grad_sync sums them.
    segments: the output is that many equal blocks, each split separately (gated [a | b] layouts).
    gather_output: all-gather the output features (only with one shard per rank).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], group: RankGroup, *,
                 input_mode: str = "copy", gather_output: bool = False,
                 num_shards: Optional[int] = None, segments: int = 1):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode={input_mode!r}; choose one of {INPUT_MODES}")
        num_shards = group.size if num_shards is None else num_shards
        out_features, in_features = weight.shape
        if out_features % (num_shards * segments):
            raise ValueError(f"{out_features} output features cannot be split into {segments} block(s) "
                             f"of {num_shards} shards")
        if gather_output and (num_shards != group.size or segments != 1):
            raise ValueError("gather_output needs one distinct shard per rank and a single segment")
        self.group, self.input_mode, self.gather_output = group, input_mode, gather_output
        replicas = num_shards < group.size
        w_info = ShardInfo(tuple(weight.shape), 0, num_shards, segments, partial_grad=replicas)
        self.weight = sharded_parameter(weight, w_info, group)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            b_info = ShardInfo(tuple(bias.shape), 0, num_shards, segments, partial_grad=replicas)
            self.bias = sharded_parameter(bias, b_info, group)
        self.in_features, self.out_features = in_features, self.weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Module, group: RankGroup, **kwargs) -> "ColumnParallelLinear":
        return cls(linear.weight, linear.bias, group, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (.., in) -> (.., out_local)
        y = F.linear(enter_column(x, self.group, self.input_mode), self.weight, self.bias)
        return mappings.gather_from_tp_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local), "
                f"tp={self.group.size}, input_mode={self.input_mode}, bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """Input features split over ``group``; output summed over it, bias added once after the sum.

    input_is_parallel: the input already holds this rank's features (output of a column layer);
    otherwise it is replicated and split here. sequence_parallel: reduce-scatter the output into
    sequence shards instead of all-reducing it; the bias then meets only local tokens, so its
    gradient is partial. output_mode (``reduce_row``): "exit" (default), "sharded" (the sum feeds
    sharded consumers: the bias gradient is partial) or "deferred" (no sum here: the caller sums
    two projections first and reduces once; the bias is then added by TP rank 0 only, so the later
    sum counts it once, and its gradient, whole on rank 0 and zero elsewhere, is summed by
    tp_grad_sync).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], group: RankGroup, *,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, output_mode: str = "exit"):
        super().__init__()
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r}; choose one of {OUTPUT_MODES}")
        out_features, in_features = weight.shape
        if in_features % group.size:
            raise ValueError(f"{in_features} input features cannot be split over {group.size} ranks")
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        self.output_mode = output_mode
        self.weight = sharded_parameter(weight, ShardInfo(tuple(weight.shape), 1, group.size), group)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            partial = group.size > 1 and (sequence_parallel or output_mode != "exit")
            self.bias = sharded_parameter(bias, ShardInfo.replicated(bias, partial_grad=partial), group)
        self.bias_gate = 1.0 if output_mode != "deferred" or group.rank == 0 else 0.0
        self.in_features, self.out_features = self.weight.shape[1], out_features

    @classmethod
    def from_linear(cls, linear: nn.Module, group: RankGroup, **kwargs) -> "RowParallelLinear":
        return cls(linear.weight, linear.bias, group, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (.., in_local) -> (.., out)
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x, self.group)
        y = reduce_row(F.linear(x, self.weight), self.group, self.output_mode, self.sequence_parallel)
        if self.bias is None:
            return y
        return y + (self.bias if self.bias_gate == 1.0 else self.bias * self.bias_gate)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local), out_features={self.out_features}, "
                f"tp={self.group.size}, sequence_parallel={self.sequence_parallel}, "
                f"output_mode={self.output_mode}, bias={self.bias is not None}")
