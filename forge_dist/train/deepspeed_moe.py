"""Expert parallelism under DeepSpeed: our placed experts declared the way DeepSpeed-MoE declares its own.

DeepSpeed learns three things about a mixture-of-experts model, and each is given here from our
ProcessGroups, so ZeRO-1/2 reduce and partition expert gradients over the expert-data-parallel
group (the replicas holding the same experts) and dense gradients over the whole data-parallel group:

  * which parameters are experts: ``allreduce = False`` and ``group_name = "ep_size_{ep}"`` on each
    (forge_dist.parallel.expert.declare_expert_params already sets them);
  * which ranks form the expert-parallel and expert-data-parallel groups of that name: DeepSpeed
    keeps them in ``deepspeed.utils.groups`` and would otherwise create its own (rank order
    ``use_data_before_expert_parallel``); ``register_expert_groups`` puts our Topology's ``ep`` and
    ``expert_dp`` groups there, so both agree by construction;
  * that the model has MoE layers at all: ``deepspeed.initialize`` looks for instances of its
    ``deepspeed.moe.layer.MoE``; ``declared_moe`` attaches one parameter-free stand-in for the
    duration of ``initialize`` only (our MoE layers stay ours);

and the optimizer's parameter groups are split with DeepSpeed's
``split_params_into_different_moe_groups_for_optimizer`` (``moe_param_groups``): expert groups carry
``moe = True`` and the group name, which ZeRO reads to partition them over ``expert_dp``.

DeepSpeed divides every gradient by the data-parallel size and sums expert gradients over
``expert_dp`` (its ``_reduce_expert_gradients`` / ZeRO's ``average_tensor``): the same rule as the
native engine (forge_dist.parallel.expert.grads).

Checkpoints: DeepSpeed's own MoE checkpoint files assume its MoE module layout (per-expert files
named from ``deepspeed_moe.experts``), so an expert-parallel run writes forge-train's sharded
checkpoint (train/deepspeed_sharded.py: each rank its ZeRO partitions, experts under their global
index) or, in the gathered format, the logical copy only (fp32 masters and Adam moments by
one-process name, every expert gathered); either resumes at any layout (exact in fp32).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch

from forge_dist.parallel.expert.placement import EXPERT_GROUP_PREFIX, is_expert_param
from forge_dist.parallel.groups import ProcessGroups

MARKER = "_deepspeed_moe_declaration"  # the stand-in's attribute name during deepspeed.initialize


def expert_group_name(groups: ProcessGroups) -> str:
    return f"{EXPERT_GROUP_PREFIX}{groups.ep.size}"


def has_placed_experts(model: torch.nn.Module) -> bool:
    return any(is_expert_param(p) for p in model.parameters())


def register_expert_groups(groups: ProcessGroups, handles: Dict[str, object]) -> str:
    """Our ``ep`` and ``expert_dp`` groups as DeepSpeed's expert groups of this run's name
    (``handles``: torch group handles by kind, a one-rank group included, from DeepSpeedMPU);
    returns the name. Replaces any earlier registration of that name in this process."""
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = handles["ep"]
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep.ranks)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = handles["expert_dp"]
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.expert_dp.ranks)
    return name


def moe_param_groups(param_groups: List[dict]) -> List[dict]:
    """Our optimizer groups (named here) split by DeepSpeed into dense and expert groups; empty
    groups dropped (ZeRO flattens every group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [dict(g, name=g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]
    split = split_params_into_different_moe_groups_for_optimizer(named)
    return [g for g in split if g["params"]]


def _stand_in(num_experts: int, ep_size: int, group_name: str) -> torch.nn.Module:
    from deepspeed.moe.layer import MoE

    class DeclaredExperts(MoE):
        """Parameter-free: tells DeepSpeed the model has expert-parallel MoE layers."""

        def __init__(self):
            torch.nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own experts
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = num_experts // ep_size

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are ours (register_expert_groups)

        def forward(self, *args, **kwargs):
            raise RuntimeError("a declaration for deepspeed.initialize, not a layer")

    return DeclaredExperts()


@contextlib.contextmanager
def declared_moe(model: torch.nn.Module, groups: ProcessGroups, num_experts: int):
    """Around ``deepspeed.initialize``: the model carries the MoE stand-in, removed on exit."""
    model.add_module(MARKER, _stand_in(num_experts, groups.ep.size, expert_group_name(groups)))
    try:
        yield
    finally:
        delattr(model, MARKER)
