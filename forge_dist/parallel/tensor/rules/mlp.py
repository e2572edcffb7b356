"""Rules of the MLP variants: hidden features split over the TP group (up projections
column-parallel, down projections row-parallel), one TP region per MLP. Activations act on the
hidden shard elementwise (rules/activation.py); glu pairs [a | b] halves, so an up projection
feeding it splits its two blocks separately (segments = the activation's width divisor).

  mlp        c_fc column, c_proj row (mlp_down_projs: one projection of m * C outputs, summed
             after the row sum, which is linear)
  swiglu     c_fc_in1 (gate, through the activation) and c_fc_in2 column over the same hidden
             units, their product per unit, c_fc_out row
  dual_path  c_fc column; both paths act on the same hidden shard; c_proj1 and c_proj2 row with
             their sum reduced once, at the dropout's input (deferred), when both are plain
             linears, else each reduced by itself
  kan        no split exists: the KAN network runs whole on the residual stream as it is (like a
             norm: replicated, or on sequence shards), so it is never reduced and its gradients
             are partial only under sequence parallelism
  identity   nothing to shard, no region
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.mlp import DualPathMLP, IdentityMLP, KanMLP, OriginalMLP, SwiGLU
from forge_dist.parallel.tensor.plan import Column, Plan, Replicate, Row, ShardContext, row_supports
from forge_dist.parallel.tensor.rules.quantize import act_quant_styles
from forge_dist.parallel.tensor.rules.registry import TP_RULES

OFFSETS = ("activation_x_offset", "activation_y_offset")  # learned 0-d offsets act on hidden shards


def offset_params(m: nn.Module):
    return {n: Replicate(partial=True) for n in OFFSETS if isinstance(getattr(m, n, None), nn.Parameter)}


def region(m: nn.Module, ctx: ShardContext, children, **kwargs) -> Plan:
    """The Plan of an MLP that is one TP region over its hidden features."""
    return Plan(children={**children, **act_quant_styles(m, ctx, region=True)}, params=offset_params(m),
                enter=True, rng="sharded", residual_dropout=("dropout",), inner_sharded=True, **kwargs)


def gated(m: nn.Module) -> Column:
    """The up projection that feeds the activation: [a | b] blocks split separately for glu."""
    return Column(segments=m.activation_variant.width_divisor)


@TP_RULES.register(OriginalMLP)
def mlp(m: OriginalMLP, ctx: ShardContext) -> Plan:
    return region(m, ctx, {"c_fc": gated(m), "c_proj": Row()})


@TP_RULES.register(SwiGLU)
def swiglu(m: SwiGLU, ctx: ShardContext) -> Plan:
    return region(m, ctx, {"c_fc_in1": gated(m), "c_fc_in2": Column(), "c_fc_out": Row()})


@TP_RULES.register(DualPathMLP)
def dual_path(m: DualPathMLP, ctx: ShardContext) -> Plan:
    defer = all(row_supports(getattr(m, n), "deferred") for n in ("c_proj1", "c_proj2"))
    row = Row(output="deferred" if defer else "exit")
    return region(m, ctx, {"c_fc": gated(m), "c_proj1": row, "c_proj2": row}, exit_at="dropout" if defer else None)


@TP_RULES.register(KanMLP)
def kan(m: KanMLP, ctx: ShardContext) -> Plan:
    children = {"kan": Replicate(partial=ctx.sharded_data), **act_quant_styles(m, ctx, region=False)}
    return Plan(children=children, residual_dropout=("dropout",))


@TP_RULES.register(IdentityMLP)
def identity(m: IdentityMLP, ctx: ShardContext) -> Plan:
    return Plan(children=act_quant_styles(m, ctx, region=False))
