"""Rules of the MLP variants: hidden features split over the TP group (up projections
column-parallel, down projections row-parallel), one TP region per MLP."""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.mlp import OriginalMLP
from forge_dist.parallel.tensor.plan import Column, Plan, Replicate, Row, ShardContext
from forge_dist.parallel.tensor.rules.registry import TP_RULES

OFFSETS = ("activation_x_offset", "activation_y_offset")  # learned 0-d offsets act on hidden shards


def offset_params(m: nn.Module):
    return {n: Replicate(partial=True) for n in OFFSETS if isinstance(getattr(m, n, None), nn.Parameter)}


@TP_RULES.register(OriginalMLP)
def mlp(m: OriginalMLP, ctx: ShardContext) -> Plan:
    # an activation that halves the width (glu: [a | b] -> a * sigmoid(b)) needs a and b of the
    # same hidden units on one rank: split the up projection's blocks separately
    segments = m.activation_variant.width_divisor
    return Plan(children={"c_fc": Column(segments=segments), "c_proj": Row()}, params=offset_params(m),
                enter=True, rng="sharded", residual_dropout=("dropout",), inner_sharded=True)
