"""Layers that cannot be split by rows or columns, used where a linear would be column- or
row-parallel: the ``kan`` linear variant (a KAN network normalises each token over its input
features and LayerNorms its outputs, so no output or input feature can be computed from a shard).

The whole module runs on every rank of the TP region on the full tensor, and each rank keeps
what a split layer would have given it:

  whole_column  the input enters like a column layer's (copy, sequence gather, feature gather or
                nothing), the full output is computed, and this rank's output features are kept
                (a differentiable slice: the other features send no gradient back, so the
                parameters' and the input's gradients are partial sums, as for a column layer)
  whole_row     the input's feature shards are all-gathered (backward: split), the full output is
                computed identically on every rank (whole parameter gradients), and under
                sequence parallelism split into this rank's sequence shard

The module keeps its class and names; the work is repeated on every rank (exact, not faster).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from forge_dist.parallel.groups import RankGroup
from forge_dist.parallel.tensor import mappings
from forge_dist.parallel.tensor.layers import enter_column
from forge_dist.parallel.tensor.metadata import mark_replicated


def keep_shard(y: torch.Tensor, group: RankGroup, num_shards: int, segments: int = 1) -> torch.Tensor:
    """This rank's piece of the last dim of ``y`` in the ShardInfo layout (``segments`` blocks,
    each cut into ``num_shards``; rank t holds shard t // (tp / num_shards)), keeping autograd."""
    index = group.rank // (group.size // num_shards)
    return torch.cat([b.chunk(num_shards, dim=-1)[index] for b in y.chunk(segments, dim=-1)], dim=-1)


def _first_arg(fn):
    return lambda m, args: (fn(args[0]),) + tuple(args[1:])


def whole_column(module: nn.Module, group: RankGroup, *, input_mode: str = "copy",
                 num_shards: Optional[int] = None, segments: int = 1) -> nn.Module:
    n = group.size if num_shards is None else num_shards
    mark_replicated(module, partial_grad=group.size > 1)
    if group.size > 1:
        if input_mode != "none":
            module.register_forward_pre_hook(_first_arg(lambda x: enter_column(x, group, input_mode)))
        module.register_forward_hook(lambda m, args, out: keep_shard(out, group, n, segments))
    return module


def whole_row(module: nn.Module, group: RankGroup, *, input_is_parallel: bool = True,
              sequence_parallel: bool = False, output_mode: str = "exit") -> nn.Module:
    if output_mode != "exit":
        raise ValueError(f"a whole {type(module).__qualname__} computes its full output on every rank; "
                         f"output_mode={output_mode!r} is not available for it")
    mark_replicated(module, partial_grad=False)
    if group.size > 1:
        if input_is_parallel:
            module.register_forward_pre_hook(_first_arg(lambda x: mappings.gather_from_tp_region(x, group)))
        if sequence_parallel:
            module.register_forward_hook(lambda m, args, out: mappings.scatter_to_sequence_region(out, group))
    return module
