"""Rules of the norm variants: replicated (they need the whole hidden vector), running on the
residual stream, which is replicated or, with sequence parallelism, split along the sequence;
then their gradients are partial sums over the TP group."""
from __future__ import annotations

from forge_dist.model.norm import IdentityNorm, LayerNorm, RMSNorm
from forge_dist.parallel.tensor.rules.registry import TP_RULES, replicated

TP_RULES.register(RMSNorm, LayerNorm, IdentityNorm)(replicated)
