"""Tensor-parallel rules, one file per family; importing this package registers them all.

Adding a variant: write ``rule(module, ctx) -> Plan`` in its family's file and register it with
``@TP_RULES.register(VariantClass)`` (see plan.py for the styles). A model holding a module with
parameters and no rule is refused by parallelize, naming the module.
"""
from forge_dist.parallel.tensor.rules.registry import TP_RULES, RuleRegistry, replicated  # noqa: F401
from forge_dist.parallel.tensor.rules import (  # noqa: F401,E402
    activation, attention, linear, mixers, mlp, model, moe, norm, quantize, softmax, steering)
