"""Rules of the steering modules (forge_dist.model.steering), which act on the residual stream
between blocks: replicated, or on sequence shards under sequence parallelism.

  LSV variants      per token (x + steer(x)): every parameter whole on every rank, gradients
                    partial under sequence parallelism (each rank sees its own tokens)
  SteeringVectors   the static vector is a replicated buffer added elementwise; the mean it
                    records must cover the whole sequence, so under sequence parallelism the
                    recorded sum and count are summed over the TP group (its reduce_stats hook)
"""
from __future__ import annotations

from forge_dist.variants import LSV
from forge_dist.model.steering import SteeringVectors
from forge_dist.parallel.tensor.plan import Plan, ShardContext
from forge_dist.parallel.tensor.quantized import StatReducer
from forge_dist.parallel.tensor.rules.registry import TP_RULES, replicated_tree

for _name in LSV.names():  # every LSV variant is x + steer(x) per token (LSVBase)
    if LSV.get(_name) not in TP_RULES:
        TP_RULES.register(LSV.get(_name))(replicated_tree)


def _sum_records(m: SteeringVectors, ctx: ShardContext) -> None:
    m.reduce_stats = StatReducer(ctx.tp) if ctx.sequence_parallel and ctx.tp.size > 1 else None


@TP_RULES.register(SteeringVectors)
def steering_vectors(m: SteeringVectors, ctx: ShardContext) -> Plan:
    return Plan(finalize=_sum_records)
