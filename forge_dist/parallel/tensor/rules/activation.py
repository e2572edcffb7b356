"""Rules of the activations with parameters (forge_dist.model.activation). They act elementwise on
an MLP's hidden shard (or on the residual stream inside a norm such as dact), so their
parameters are whole on every rank, with partial gradients where the data is split. glu (no
parameters) is handled by the MLP rules: its [a | b] halves are split separately."""
from __future__ import annotations

from forge_dist.model.activation import (LearnedSplineActivation, PiecewiseFullyLearnableActivation,
                                         PiecewiseLearnableActivation, PiecewiseLearnedEndsActivation, PReLU,
                                         ShiftedGELU)
from forge_dist.parallel.tensor.rules.registry import TP_RULES, replicated, replicated_tree

TP_RULES.register(ShiftedGELU, PiecewiseLearnableActivation, PiecewiseFullyLearnableActivation,
                  PiecewiseLearnedEndsActivation, LearnedSplineActivation)(replicated)
TP_RULES.register(PReLU)(replicated_tree)  # the slope lives in torch's nn.PReLU inside the wrapper
