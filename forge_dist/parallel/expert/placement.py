"""Expert placement: which rank holds which experts, which gradients reduce over which group.

``apply_expert_parallel(model, groups, parallel_config)`` runs on the plain model (every rank
built it from the same seed, or loaded the same logical checkpoint) before tensor parallelism:

  * each MoE layer's ExpertList is replaced by ExpertParallelExperts holding only this rank's
    experts (rank r of the ``ep`` group: experts [r E/ep, (r+1) E/ep)), the others are freed;
  * expert parameters are declared (declare_expert_params; again after tensor parallelism has
    split them) the way DeepSpeed-MoE declares them: ``allreduce = False``
    and ``group_name = "ep_size_{ep}"``. Their gradient is summed over ``expert_dp`` (the
    replicas holding the same experts) and divided by the whole data-parallel size, since the
    all-to-all backward has already summed the contributions of the ep ranks of the group;
    dense parameters keep the plain average over ``dp`` (grads.py);
  * under data parallelism (dp > 1) every MoE layer's load-balancing statistics count the whole
    data-parallel batch (MoELayer.batch_counts: one all-reduce of E numbers over ``dp``).

Where capacity is counted (moe_capacity_factor): per micro-batch per data-parallel rank, on the
tokens this rank routes, before the exchange (as Megatron-Core and DeepSpeed-MoE do). A one-process
run of the same global batch reproduces it with ``MoELayer.capacity_groups = dp``.
"""
from __future__ import annotations

from typing import Iterable, List

import torch.nn as nn

from forge_dist.config.parallel import check_expert_parallel  # noqa: F401 (re-exported)
from forge_dist.errors import ConfigError
from forge_dist.model.moe import ExpertList, MoELayer
from forge_dist.parallel.expert.dispatch import ExpertParallelExperts
from forge_dist.parallel.groups import ProcessGroups

EXPERT_GROUP_PREFIX = "ep_size_"  # DeepSpeed's group name for expert parameters


def is_expert_param(p) -> bool:
    """An expert parameter (DeepSpeed's convention: ``allreduce`` False)."""
    return getattr(p, "allreduce", True) is False


def split_expert_params(params: Iterable) -> tuple:
    """(dense, expert) lists, order kept."""
    dense: List = []
    expert: List = []
    for p in params:
        (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def moe_layers(model: nn.Module) -> List[MoELayer]:
    """Every MoE layer once (a layer shared by several blocks appears once)."""
    return list({id(m): m for m in model.modules() if isinstance(m, MoELayer)}.values())


def expert_tensor_parallel(parallel_config) -> bool:
    """Whether experts are TP-sharded inside (expert_tensor_parallel_size = TP) or whole."""
    etp = getattr(parallel_config, "expert_tensor_parallel_size", None)
    return parallel_config.tensor_parallel_size > 1 and (etp is None or etp == parallel_config.tensor_parallel_size)


def needs_expert_parallel(model: nn.Module, parallel_config) -> bool:
    return bool(moe_layers(model)) and (parallel_config.expert_parallel_size > 1 or
                                        (parallel_config.tensor_parallel_size > 1
                                         and not expert_tensor_parallel(parallel_config)))


def declare_expert_params(model: nn.Module) -> int:
    """Mark the parameters of every placed expert (DeepSpeed's ``allreduce = False`` and
    ``group_name``). apply_expert_parallel calls it; call it again after tensor parallelism,
    whose column/row splits replace the expert parameters by new tensors. Returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts) and m.group.size > 1:
            for p in m.parameters():
                p.allreduce = False
                p.group_name = f"{EXPERT_GROUP_PREFIX}{m.group.size}"
                n += 1
            for b in m.buffers():  # never broadcast from another replica's experts
                b.allreduce = False
    return n


def set_batch_statistics(model: nn.Module, groups: ProcessGroups) -> None:
    """Load-balancing statistics over the whole data-parallel batch (no-op for dp = 1)."""
    dp = groups.dp
    if dp.size == 1:
        return
    for layer in moe_layers(model):
        layer.batch_counts = lambda counts, dp=dp: dp.all_reduce(counts, phase="forward")


def apply_expert_parallel(model: nn.Module, groups: ProcessGroups, parallel_config) -> nn.Module:
    """Place experts over ``groups.ep`` in place (see the module docstring); returns ``model``."""
    config = getattr(model, "config", None)
    if config is not None:
        check_expert_parallel(config, parallel_config)
    ep = groups.ep.size
    if ep != parallel_config.expert_parallel_size:
        raise ValueError(f"groups have an EP group of {ep} ranks but expert_parallel_size="
                         f"{parallel_config.expert_parallel_size}")
    set_batch_statistics(model, groups)
    if not needs_expert_parallel(model, parallel_config):
        return model
    tp_experts = expert_tensor_parallel(parallel_config)
    for layer in moe_layers(model):
        if not isinstance(layer.experts, ExpertList):
            raise ValueError(f"{layer} already has its experts placed ({type(layer.experts).__name__})")
        if layer.n_experts % ep:
            raise ConfigError(f"n_experts={layer.n_experts} is not divisible by expert_parallel_size={ep}")
        layer.experts = ExpertParallelExperts(layer.experts, groups.ep, tp_experts)
    declare_expert_params(model)
    return model
