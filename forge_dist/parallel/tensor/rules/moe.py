"""Rules of the mixture-of-experts layer (forge_dist.model.moe.MoELayer) and of its experts once
expert parallelism placed them (forge_dist.parallel.expert: ExpertParallelExperts).

The router, the top-k choice, the capacity cut and the auxiliary losses must be exactly the
single-device ones, so the layer sees every token of the batch: under sequence parallelism its
input is all-gathered once (the backward splits the gradient, whole on every rank) and its
output split back into sequence shards. The router is whole on every rank and runs on the same
tokens, so its gradients are whole (never partial) and noisy_top_k's noise, drawn from the
global generator that is equal on a TP group, is the same on every rank; the aux and z losses
are computed identically on every rank and added to each rank's loss.

Each expert is an MLP sharded inside (its own rule: column up, row down, one region entered
with a copy and left with an all-reduce), planned without sequence parallelism because its
tokens are grouped by expert, not by position: one all-reduce forward and one backward per
expert.

With expert_tensor_parallel_size=1 the placed experts stay whole on every TP rank, and the TP
ranks split the tokens instead of all running all of them (as Megatron-Core does): each routes,
dispatches over its own expert-parallel group and combines 1/TP of the tokens (contiguous blocks
of the flattened batch; under sequence parallelism its sequence shard, so no gather at all), and
the output is all-gathered (the backward keeps this rank's block). The router and expert
gradients are then partial sums over TP; the load-balancing counts are summed over the split,
and each rank's aux and z losses enter as 1/TP of the split's mean (MoELayer.split_sum), so the
losses and gradients are the one-process ones. Capacity is counted per rank's block.
"""
from __future__ import annotations

from forge_dist.model.moe import MoELayer
from forge_dist.parallel.expert.dispatch import ExpertParallelExperts
from forge_dist.parallel.tensor import mappings, sequence
from forge_dist.parallel.tensor.plan import Plan, Replicate, ShardContext
from forge_dist.parallel.tensor.rules.registry import TP_RULES


def _whole_sequence(m: MoELayer, ctx: ShardContext) -> None:
    if ctx.sequence_parallel and ctx.tp.size > 1:
        sequence.gather_input(m, ctx.tp, grad_is_partial=False)
        sequence.scatter_output(m, ctx.tp)


def splits_tokens(m: MoELayer, ctx: ShardContext) -> bool:
    """Whole experts on every TP rank (expert_tensor_parallel_size=1): the TP ranks split the tokens."""
    return ctx.tp.size > 1 and isinstance(m.experts, ExpertParallelExperts) and not m.experts.tensor_parallel_experts


def _split_tokens(m: MoELayer, ctx: ShardContext) -> None:
    tp = ctx.tp
    m.split_sum, m.token_splits = (lambda t: mappings.reduce_from_tp_region(t, tp)), tp.size
    if ctx.sequence_parallel:
        return  # the input is this rank's sequence shard already, and the output stays one
    shapes = []

    def take_block(module, args):
        x = args[0]
        if x.numel() // x.shape[-1] % tp.size:
            raise ValueError(f"{x.numel() // x.shape[-1]} tokens do not split over tensor_parallel_size={tp.size} "
                             f"(expert_tensor_parallel_size=1 splits each MoE layer's tokens over the TP ranks)")
        shapes.append(x.shape)
        return (mappings.scatter_to_sequence_region(x.reshape(-1, x.shape[-1]), tp, dim=0),) + tuple(args[1:])

    def gather_blocks(module, args, out):
        return mappings.gather_from_sequence_region(out, tp, dim=0, grad_is_partial=False).view(shapes.pop())

    m.register_forward_pre_hook(take_block)
    m.register_forward_hook(gather_blocks)


@TP_RULES.register(MoELayer)
def moe(m: MoELayer, ctx: ShardContext) -> Plan:
    split = splits_tokens(m, ctx)
    return Plan(children={"router": Replicate(partial=split)}, inner_sharded=False, inner_sequence_parallel=False,
                finalize=_split_tokens if split else _whole_sequence)


@TP_RULES.register(ExpertParallelExperts)
def placed_experts(m: ExpertParallelExperts, ctx: ShardContext) -> Plan:
    if m.tensor_parallel_experts:
        return Plan()  # each expert MLP is planned by its own rule
    return Plan(children={name: Replicate(partial=True) for name in m._modules})  # on this rank's tokens
