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
expert. With expert_tensor_parallel_size=1 the placed experts stay whole on every TP rank
instead (Replicate: each TP rank of a replica runs them on the same tokens, gradients whole).
"""
from __future__ import annotations

from forge_dist.model.moe import MoELayer
from forge_dist.parallel.expert.dispatch import ExpertParallelExperts
from forge_dist.parallel.tensor import sequence
from forge_dist.parallel.tensor.plan import Plan, Replicate, ShardContext
from forge_dist.parallel.tensor.rules.registry import TP_RULES


def _whole_sequence(m: MoELayer, ctx: ShardContext) -> None:
    if ctx.sequence_parallel and ctx.tp.size > 1:
        sequence.gather_input(m, ctx.tp, grad_is_partial=False)
        sequence.scatter_output(m, ctx.tp)


@TP_RULES.register(MoELayer)
def moe(m: MoELayer, ctx: ShardContext) -> Plan:
    return Plan(children={"router": Replicate()}, inner_sharded=False, inner_sequence_parallel=False,
                finalize=_whole_sequence)


@TP_RULES.register(ExpertParallelExperts)
def placed_experts(m: ExpertParallelExperts, ctx: ShardContext) -> Plan:
    if m.tensor_parallel_experts:
        return Plan()  # each expert MLP is planned by its own rule
    return Plan(children={name: Replicate() for name in m._modules})
