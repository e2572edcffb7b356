"""Quantizing modules (forge_dist.model.quantize.QuantizedModule: quantized linears and embeddings,
activation fake-quant points). Their per-tensor statistics (max, min, mean |x|) must be reduced
over the TP group through the module's ``reduce_stats`` hook, or each rank would quantize its shard
differently from the single-device model. Until those rules are written here, a sharded model
containing one is refused, parameters or not.
"""
from forge_dist.model.quantize import QuantizedModule
from forge_dist.parallel.tensor.rules.registry import TP_RULES

TP_RULES.require_rule(QuantizedModule)
