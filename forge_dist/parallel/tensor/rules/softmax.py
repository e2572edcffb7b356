"""Rules of the softmax variants with parameters (forge_dist.model.softmax). They run inside an
attention region on local heads: per-head parameters (n_head, 1, 1) shard with their heads;
per-layer scalars and learned curves are whole on every rank with partial gradients (each rank's
gradient comes from its own heads only; tp_grad_sync sums them). Variants without parameters act
on each score row over the (unsplit) keys and need no rule."""
from __future__ import annotations

from forge_dist.model.softmax import ConSmax, ConSmaxQuan, ConSmaxV2, PFLASoftmax, SaturatingConSmax, Strongermax
from forge_dist.parallel.tensor.plan import Plan, ShardContext
from forge_dist.parallel.tensor.rules.registry import TP_RULES, per_head_params, replicated

# beta, gamma (consmax family), knots, learned divisor and off-by-one (pfla_softmax): per layer
TP_RULES.register(ConSmax, ConSmaxQuan, SaturatingConSmax, PFLASoftmax)(replicated)


@TP_RULES.register(ConSmaxV2)
def consmax_v2(m: ConSmaxV2, ctx: ShardContext) -> Plan:
    return Plan(params=per_head_params(m, m.n_head, ("beta_factor", "gamma_factor")))


@TP_RULES.register(Strongermax)
def strongermax(m: Strongermax, ctx: ShardContext) -> Plan:
    """obo_offset per head (learned obo per head) or per layer; temperature_factor per layer."""
    return Plan(params=per_head_params(m, m.n_head, ("obo_offset", "temperature_factor")))
