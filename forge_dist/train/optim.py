"""The optimizer: AdamW with ReaLLM-Forge's defaults, and nanoGPT's optional decay split.

Upstream's train.py puts every parameter in one group, so norm gains, biases and embeddings are
decayed too (``adamw_weight_decay`` 0.01, betas (beta1, beta2) = (0.9, 0.99)). With
``weight_decay_split`` the tensors of two or more dims (matmul weights, embeddings) are decayed and
the rest (biases, norm gains, per-layer scalars) are not, as in nanoGPT's configure_optimizers.
``--zero_stage 1`` shards the AdamW state over the data-parallel replicas (build_optimizer), an
expert's over the replicas holding that expert.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn


def _ndim(p: torch.Tensor) -> int:
    """The parameter's own rank, also for a ZeRO-3 partition (a flat slice; ds_shape is the shape)."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()


def param_groups(model: nn.Module, weight_decay: float, split: bool) -> List[Dict]:
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    if not split:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if _ndim(p) >= 2]
    no_decay = [p for p in params if _ndim(p) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device_type: str, groups: Optional[List[Dict]] = None,
                    zero_group=None, process_groups=None) -> torch.optim.Optimizer:
    """torch AdamW over ``groups`` (default: param_groups of the model); with ``zero_group`` (a
    RankGroup of more than one rank: the data-parallel replicas) its state sharded over them
    (ZeRO-1, forge_dist.parallel.zero), and with placed experts the experts' state over
    ``process_groups.expert_dp`` instead (forge_dist.parallel.expert.zero)."""
    from forge_dist.parallel.expert.placement import is_expert_param

    if groups is None:
        groups = param_groups(model, cfg.adamw_weight_decay, cfg.weight_decay_split)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adamw_eps)
    if device_type == "cuda":
        kwargs["fused"] = True
    if zero_group is not None and zero_group.size > 1:
        from forge_dist.parallel.zero import zero_optimizer

        if any(is_expert_param(p) for g in groups for p in g["params"]):
            if process_groups is None:
                raise ValueError("ZeRO-1 over placed experts needs the process groups (expert_dp)")
            from forge_dist.parallel.expert.zero import ExpertZeroOptimizer

            return ExpertZeroOptimizer(groups, process_groups, **kwargs)
        return zero_optimizer(groups, zero_group, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
