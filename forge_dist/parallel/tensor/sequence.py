"""Sequence parallelism (Korthikanti et al. 2022) applied to a plain model through forward hooks.

Between TP regions the residual stream is split along the sequence over the TP group, so norms,
dropout and residual adds each touch T/tp tokens, and each activation outside the regions is
stored once instead of tp times:

    embedding (replicated) -> scatter -> [norm -> all-gather -> TP region -> reduce-scatter -> +]*
    -> final norm -> all-gather -> LM head

The all-gather / reduce-scatter pair replaces each region's all-reduce (same bytes on the wire).
Replicated parameters used on sequence shards (norm gains, row-parallel biases) receive partial
gradients; their ShardInfo says so and tp_grad_sync sums them.

The hooks here rewrite the first positional argument (pre-hooks) or the output (post-hooks) of a
module, so the model's own code is untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.parallel.groups import RankGroup
from forge_dist.parallel.tensor import mappings


def _replace_first(args: tuple, fn) -> tuple:
    return (fn(args[0]),) + tuple(args[1:])


def check_sequence_length(x: torch.Tensor, group: RankGroup, dim: int = mappings.SEQ_DIM) -> None:
    if x.shape[dim] % group.size:
        raise ValueError(
            f"sequence parallelism splits the {x.shape[dim]} tokens of a sequence over "
            f"tensor_parallel_size={group.size} ranks: use a sequence length divisible by {group.size} "
            f"(for KV-cached decoding, parallelize with sequence_parallel=False)")


def scatter_input(module: nn.Module, group: RankGroup) -> None:
    """``module`` receives sequence shards of its (replicated) first argument."""

    def hook(m, args):
        check_sequence_length(args[0], group)
        return _replace_first(args, lambda x: mappings.scatter_to_sequence_region(x, group))

    module.register_forward_pre_hook(hook)


def gather_output(module: nn.Module, group: RankGroup, grad_is_partial: bool = False) -> None:
    """``module``'s output (sequence shards) is all-gathered into the full sequence. The backward
    splits the gradient when the consumer is replicated, reduce-scatters it when it is TP-sharded."""
    module.register_forward_hook(
        lambda m, args, out: mappings.gather_from_sequence_region(out, group, grad_is_partial=grad_is_partial))


def replace_input(module: nn.Module, fn) -> None:
    """``module`` receives ``fn`` of its first argument (a forward pre-hook)."""
    module.register_forward_pre_hook(lambda m, args: _replace_first(args, fn))


def gather_input(module: nn.Module, group: RankGroup, grad_is_partial: bool = False) -> None:
    """``module`` receives the whole sequence of its (sequence-shard) first argument; the backward
    splits its gradient (reduce-scatters it when ``grad_is_partial``)."""

    def hook(m, args):
        return _replace_first(args, lambda x: mappings.gather_from_sequence_region(x, group,
                                                                                   grad_is_partial=grad_is_partial))

    module.register_forward_pre_hook(hook)


def scatter_output(module: nn.Module, group: RankGroup) -> None:
    """``module``'s (whole-sequence, replicated) output is split into this rank's sequence shard."""
    module.register_forward_hook(lambda m, args, out: mappings.scatter_to_sequence_region(out, group))


def enter_region(module: nn.Module, group: RankGroup, sequence_parallel: bool) -> None:
    """``module`` is a TP region whose column-parallel layers all read its first argument: enter
    once for all of them (copy, or all-gather of sequence shards), e.g. q, k and v projections."""
    module.register_forward_pre_hook(
        lambda m, args: _replace_first(args, lambda x: mappings.enter_tp_region(x, group, sequence_parallel)))
