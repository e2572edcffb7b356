"""The rule registry: module class -> rule(module, ctx) -> Plan, and the helpers rules share.

Lookup is by exact class: a subclass may add parameters or change the data flow, so it needs its
own (often one-line) registration, e.g. ``TP_RULES.register(MyNorm)(replicated)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn

from forge_dist.errors import ConfigError
from forge_dist.parallel.tensor.plan import Plan, Replicate, ShardContext, Shard

Rule = Callable[[nn.Module, ShardContext], Plan]


class RuleRegistry:
    def __init__(self):
        self._rules: Dict[type, Rule] = {}
        self._required: Tuple[type, ...] = ()  # bases whose instances need a rule even without parameters

    def require_rule(self, base: type) -> None:
        """Instances of ``base`` are refused without their own rule even when they hold no
        parameters: their numerics depend on the whole tensor (per-tensor quantization stats)."""
        self._required += (base,)

    def required_base(self, module: nn.Module) -> Optional[type]:
        return next((b for b in self._required if isinstance(module, b)), None)

    def register(self, *classes: type) -> Callable[[Rule], Rule]:
        def decorator(rule: Rule) -> Rule:
            for cls in classes:
                if cls in self._rules:
                    raise KeyError(f"a tensor-parallel rule for {cls.__qualname__} is registered twice")
                self._rules[cls] = rule
            return rule

        return decorator

    def get(self, cls: type) -> Optional[Rule]:
        return self._rules.get(cls)

    def __contains__(self, cls: type) -> bool:
        return cls in self._rules

    def classes(self):
        return tuple(self._rules)


TP_RULES = RuleRegistry()


def replicated(module: nn.Module, ctx: ShardContext) -> Plan:
    """Rule of modules that act on each position (norms, elementwise activations): parameters
    whole on every rank, gradients partial where the module sees sharded activations."""
    return Plan(params={n: Replicate(partial=ctx.sharded_data) for n, _ in module.named_parameters(recurse=False)})


def replicated_tree(module: nn.Module, ctx: ShardContext) -> Plan:
    """Rule of per-position modules with submodules (a learned steering MLP bank, torch's PReLU
    inside its wrapper): the module and everything under it whole on every rank, gradients partial
    where it sees sharded activations."""
    style = Replicate(partial=ctx.sharded_data)
    return Plan(children={n: style for n, c in module.named_children() if any(True for _ in c.parameters())},
                params={n: style for n, _ in module.named_parameters(recurse=False)})


def divisible(n: int, ctx: ShardContext, what: str, unit: str = "channels") -> None:
    """``n`` (named ``what``) splits evenly over the TP group, or a ConfigError says what to change."""
    tp = ctx.tp.size
    if n % tp:
        raise ConfigError(f"{ctx.path}: {what}={n} is not divisible by tensor_parallel_size={tp}; each rank must "
                          f"hold whole {unit}: use a tensor_parallel_size dividing {n}")


def heads_divisible(n_head: int, ctx: ShardContext, what: str = "n_head") -> None:
    divisible(n_head, ctx, what, "heads")


def kv_shards(n_head: int, n_kv: int, ctx: ShardContext) -> int:
    """Distinct KV-head shards: tp when n_kv divides over tp; n_kv when n_kv < tp (Megatron's KV
    replication: each rank holds the one KV head its query heads use)."""
    tp = ctx.tp.size
    heads_divisible(n_head, ctx)
    if n_kv % tp == 0:
        return tp
    if tp % n_kv == 0:
        return n_kv
    raise ConfigError(f"{ctx.path}: n_kv_group={n_kv} and tensor_parallel_size={tp}: one must divide the "
                      f"other (KV heads split over ranks, or each replicated on tp/n_kv_group ranks)")


def per_head_params(module: nn.Module, n_head: int, names) -> Dict[str, object]:
    """Styles for optional learned per-head or per-layer scalars of an attention module: a leading
    dim of n_head shards with the heads; a single value is replicated with a partial gradient
    (each rank's gradient comes from its local heads only)."""
    styles = {}
    for name in names:
        p = getattr(module, name, None)
        if not isinstance(p, nn.Parameter):
            continue
        if p.dim() >= 1 and p.shape[0] == n_head and p.numel() > 1:
            styles[name] = Shard(dim=0)
        elif p.numel() == 1:
            styles[name] = Replicate(partial=True)
        else:
            raise ConfigError(f"{type(module).__qualname__}.{name} has shape {tuple(p.shape)}: neither per "
                              f"head ({n_head}, ...) nor a scalar; give it its own tensor-parallel style")
    return styles
