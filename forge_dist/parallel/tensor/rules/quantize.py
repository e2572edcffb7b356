"""Activation fake-quant points (forge_dist.model.act_points: ``act_quant.<point>`` of every
attention and MLP variant) under tensor parallelism.

A point's per-tensor statistics (max, min, mean |x|) must cover the tensor the single-device model
quantizes. What a point sees on one rank depends on where it sits:

  inside a TP region (q, k, v, scores, probabilities, pv output; the MLP's activation input and
  output): heads or hidden features split over the TP group -> statistics all-reduced
  ``input`` of a region: the entered input, whole on every rank -> local statistics
  ``output``, and every point of a module that is no region (identity, KAN MLP): the residual
  stream -> whole without sequence parallelism, sequence shards with it (all-reduced)

Every attention and MLP rule claims its points through ``act_quant_styles``; a point no rule
claims is refused (QuantizedModule requires a rule), never left with single-device statistics.
Stochastic rounding is refused under tensor parallelism: it draws one random number per element
of the whole tensor, which a shard cannot reproduce, and a point on a whole tensor runs inside its
module's forward, which with dropout is a sharded RNG region (each rank would round its copy of
the same tensor differently).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch.nn as nn

from forge_dist.model.quantize import ActQuant, QuantizedModule
from forge_dist.parallel.tensor.plan import ModuleStyle, NoShardingRuleError, ShardContext
from forge_dist.parallel.tensor.quantized import StatReducer
from forge_dist.parallel.tensor.rules.registry import TP_RULES

TP_RULES.require_rule(QuantizedModule)

IO_POINTS = ("input", "output")


@dataclass(frozen=True)
class ActStats(ModuleStyle):
    """An ActQuant point whose tensor is split over the TP group (``sharded``: statistics
    all-reduced) or whole on every rank (local statistics)."""

    sharded: bool

    def check(self, module, ctx):
        if not isinstance(module, ActQuant):
            raise NoShardingRuleError(f"{ctx.path} is a {type(module).__qualname__}, not an activation quant point")

    def apply(self, module, ctx, owner, entered):
        module.reduce_stats = StatReducer(ctx.tp) if self.sharded and ctx.tp.size > 1 else None
        return module


def act_quant_styles(module: nn.Module, ctx: ShardContext, region: bool) -> Dict[str, ModuleStyle]:
    """Styles of ``module``'s enabled activation-quant points; ``region``: the module is a TP
    region (it enters once and splits heads or hidden features), else it runs on the residual
    stream as it is (replicated, or sequence shards)."""
    styles: Dict[str, ModuleStyle] = {}
    for point, quant in getattr(module, "act_quant", {}).items():
        if region:
            sharded = point not in IO_POINTS or (point == "output" and ctx.sequence_parallel)
        else:
            sharded = ctx.sequence_parallel
        if ctx.tp.size > 1 and quant.quant_method == "stochastic_quant":
            where = ("a tensor split over the TP group: a shard cannot reproduce the single-device draws" if sharded
                     else "a whole tensor inside the module's forward, which with dropout runs in a sharded RNG "
                          "region: each rank would round its copy differently")
            raise NoShardingRuleError(
                f"{ctx.name('act_quant.' + point)} uses stochastic_quant (one random number per element) on "
                f"{where}; use affine_quant, symmetric_quant or ternary_quant for activations_quant_method "
                f"under tensor parallelism")
        styles[f"act_quant.{point}"] = ActStats(sharded)
    return styles
