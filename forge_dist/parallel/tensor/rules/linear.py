"""Linear variants (forge_dist.model.linear) under tensor parallelism: the LINEAR_TP entries the
Column and Row styles use (nn.Linear's is in plan.py).

  quantized_linear, bitlinear_1p58, bitlinear, bitlinear_optimized
      split in place, statistics all-reduced, partial products summed before the bias and the
      output rescale (parallel/tensor/quantized.py). ``per_slice`` says whether a per-token
      statistic runs over features that are split on this rank: bitlinear_1p58 quantizes its
      *input* per token (whole in a column layer, split in a row layer); bitlinear rescales its
      *output* per token (split in a column layer, summed and whole in a row layer).
  kan
      no row or column split exists: the whole KAN network runs on every rank (whole.py).

A weight quantized with stochastic_quant is refused under tensor parallelism: stochastic rounding
draws one random number per element of the whole weight, which a shard cannot reproduce; a whole
linear kept on every rank inside an attention region (MLA's shared projections, summed-head
output projections: ``refuse_stochastic``) would draw in the region's sharded RNG stream when the
model has dropout, so each rank would round the same weight differently.
"""
from __future__ import annotations

from functools import partial

from forge_dist.model.kan import KANetwork
from forge_dist.model.linear import BitLinear, BitLinear1p58, BitLinearOptimized, QuantizedLinear
from forge_dist.parallel.tensor.plan import LINEAR_TP, LinearTP, NoShardingRuleError, ShardContext
from forge_dist.parallel.tensor.quantized import quantized_column, quantized_row
from forge_dist.parallel.tensor.whole import whole_column, whole_row

QUANTIZED_ROW_MODES = ("exit", "sharded")  # the bias is added inside their forward: no deferred sum


def refuse_stochastic(module, ctx: ShardContext) -> None:
    """Refuse a linear that quantizes its weight with stochastic rounding (see the module docstring)."""
    if ctx.tp.size > 1 and getattr(module, "quant_method", None) == "stochastic_quant":
        raise NoShardingRuleError(
            f"{ctx.path} ({type(module).__qualname__}) quantizes its weight with stochastic_quant, which draws one "
            f"random number per element of the whole weight; under tensor parallelism no rank can reproduce the "
            f"single-device draws: use affine_quant, symmetric_quant or ternary_quant for quantize_linear_method")


def _quantized(column_per_slice: bool, row_per_slice: bool) -> LinearTP:
    return LinearTP(partial(quantized_column, per_slice=column_per_slice),
                    partial(quantized_row, per_slice=row_per_slice), QUANTIZED_ROW_MODES, refuse_stochastic)


LINEAR_TP[QuantizedLinear] = _quantized(True, True)  # per-tensor statistics of W only
LINEAR_TP[BitLinear1p58] = _quantized(False, True)
LINEAR_TP[BitLinear] = LINEAR_TP[BitLinearOptimized] = _quantized(True, False)
LINEAR_TP[KANetwork] = LinearTP(whole_column, whole_row, ("exit",))
