"""Rules of the norm variants: replicated (they need the whole hidden vector), running on the
residual stream, which is replicated or, with sequence parallelism, split along the sequence;
then their gradients are partial sums over the TP group.

prmsnorm reads the first k features and krmsnorm k first, last or random ones, all of the whole
row on every rank; krmsnorm's random selection draws from the global generator, which is equal
on the ranks of a TP group outside RNG regions (seed_everything) and advances by one draw per
call on every rank, so every rank (and the single-device model with the same seed) picks the
same features. dact's activation is its own module with its own rule."""
from __future__ import annotations

from forge_dist.model.norm import (DynamicActivation, HyperSphereNorm, IdentityNorm, KRMSNorm, LayerNorm,
                                   PartialRMSNorm, RMSNorm)
from forge_dist.parallel.tensor.rules.registry import TP_RULES, replicated

TP_RULES.register(RMSNorm, LayerNorm, IdentityNorm, PartialRMSNorm, KRMSNorm, HyperSphereNorm,
                  DynamicActivation)(replicated)
