"""parallelize(model, groups, parallel_config): tensor (and sequence) parallelism applied to a
plain forge_dist GPT from outside, torchtitan style; the model code never imports distributed.

1. plan: walk the module tree; each module whose class has a rule (parallel/tensor/rules) gets a
   Plan; modules without a rule are containers and must hold no parameters themselves. Any gap
   raises NoShardingRuleError naming the module path and class, before the model changes.
2. apply: the plans replace linears and embeddings by their parallel versions (sliced from the
   full initialised weights), annotate parameters with ShardInfo, and add the forward hooks of
   TP regions, sequence parallelism and RNG regions.
3. verify: every parameter carries a ShardInfo.

After backward, call ``tp_grad_sync(model, groups)`` (metadata.py) before clipping and stepping.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor.metadata import shard_info
from forge_dist.parallel.tensor.plan import NoShardingRuleError, Plan, ShardContext
from forge_dist.parallel.tensor.random import RNGTracker
from forge_dist.parallel.tensor.rules import TP_RULES

Planned = Tuple[nn.Module, Plan, ShardContext]
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _owner_description(path: str, module: nn.Module) -> str:
    return f"{path or '(the model)'} ({type(module).__module__}.{type(module).__qualname__})"


def plan_model(model: nn.Module, ctx: ShardContext) -> List[Planned]:
    """Plans for every ruled module, parents first. Changes nothing; raises on any gap."""
    planned: List[Planned] = []
    seen = set()
    claimed = set()  # full paths of submodules a parent's plan took over

    def visit(module: nn.Module, path: str, sharded: bool, parent: Tuple[str, Optional[nn.Module]],
              sp: bool) -> None:
        if path in claimed or id(module) in seen:  # a module shared between layers is planned once
            return
        seen.add(id(module))
        here = ctx.at(path, sharded, sp)
        rule = TP_RULES.get(type(module))
        if rule is not None:
            plan = rule(module, here)
            plan.check(module, here, rule.__qualname__)
            planned.append((module, plan, here))
            claimed.update(here.name(c) for c in plan.children)
            sharded = sharded if plan.inner_sharded is None else plan.inner_sharded
            sp = sp if plan.inner_sequence_parallel is None else plan.inner_sequence_parallel
        else:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            required = TP_RULES.required_base(module)
            if required is not None:
                raise NoShardingRuleError(
                    f"{_owner_description(path, module)} is a {required.__qualname__}, whose numerics depend on "
                    f"the whole tensor, and has no tensor-parallel rule: add one in "
                    f"forge_dist/parallel/tensor/rules/")
            if own:
                inside = ""
                if type(module).__module__.startswith("torch.") and parent[1] is not None:
                    inside = f" (it is part of {_owner_description(*parent)}, which has no rule either)"
                raise NoShardingRuleError(
                    f"{_owner_description(path, module)} holds parameters {own} but has no tensor-parallel "
                    f"rule{inside}: add one in forge_dist/parallel/tensor/rules/ (TP_RULES.register) instead "
                    f"of letting it be silently replicated")
        unruled = (path, module) if rule is None and not isinstance(module, CONTAINERS) else (None, None)
        for name, child in module.named_children():
            visit(child, here.name(name), sharded, unruled, sp)

    visit(model, "", ctx.sharded_data, (None, None), ctx.sequence_parallel)
    return planned


def _has_randomness(model: nn.Module) -> bool:
    """Dropout (config.dropout) or a randomised activation: RNG regions are needed."""
    if getattr(getattr(model, "config", None), "dropout", 0.0) > 0:
        return True
    return any(isinstance(m, nn.RReLU) or (isinstance(m, nn.Dropout) and m.p > 0) for m in model.modules())


def shard_context(groups: ProcessGroups, parallel_config, model: Optional[nn.Module] = None) -> ShardContext:
    tp = groups.tp.size
    tracker = RNGTracker(groups.tp.rank) if tp > 1 and model is not None and _has_randomness(model) else None
    return ShardContext(groups=groups, sequence_parallel=bool(parallel_config.sequence_parallel) and tp > 1,
                        vocab_divisible_by=parallel_config.make_vocab_size_divisible_by, tracker=tracker)


def parallelize(model: nn.Module, groups: ProcessGroups, parallel_config) -> nn.Module:
    """Shard ``model`` in place over ``groups.tp`` following the registered rules; returns it."""
    tp = groups.tp.size
    if tp != parallel_config.tensor_parallel_size:
        raise ValueError(f"groups have a TP group of {tp} ranks but tensor_parallel_size="
                         f"{parallel_config.tensor_parallel_size}")
    if any(shard_info(p) is not None for p in model.parameters()):
        raise ValueError("the model is already parallelized (its parameters carry shard metadata); "
                         "parallelize a freshly built plain model")
    if hasattr(model, "config"):
        parallel_config.validate(model.config, groups.topology.world_size)
    ctx = shard_context(groups, parallel_config, model)
    planned = plan_model(model, ctx)
    with torch.no_grad():
        for module, plan, here in planned:
            plan.apply(module, here)
    missing = [n for n, p in model.named_parameters() if shard_info(p) is None]
    if missing:
        raise NoShardingRuleError(f"parameters left without shard metadata by their rules: {missing}")
    return model


def check_parallelizable(model_config, parallel_config) -> None:
    """Refuse, without any process group, a model whose modules lack rules or whose shapes do not
    split: builds the model on the meta device and plans it for TP rank 0 (and the pipeline's
    stage split when pipeline_parallel_size > 1)."""
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.topology import Topology

    if parallel_config.pipeline_parallel_size > 1:
        from forge_dist.parallel.pipeline.split import pipeline_plan

        pipeline_plan(parallel_config, model_config)
    tp = parallel_config.tensor_parallel_size
    if tp == 1:
        return
    with torch.device("meta"):
        model = GPT(model_config)
    groups = ProcessGroups.layout(Topology(tp, tp=tp), rank=0)
    plan_model(model, shard_context(groups, parallel_config))
