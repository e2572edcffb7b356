"""The optimizer: AdamW with ReaLLM-Forge's defaults, and nanoGPT's optional decay split.

Upstream's train.py puts every parameter in one group, so norm gains, biases and embeddings are
decayed too (``adamw_weight_decay`` 0.01, betas (beta1, beta2) = (0.9, 0.99)). With
``weight_decay_split`` the tensors of two or more dims (matmul weights, embeddings) are decayed and
the rest (biases, norm gains, per-layer scalars) are not, as in nanoGPT's configure_optimizers.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, split: bool) -> List[Dict]:
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    if not split:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device_type: str, groups: Optional[List[Dict]] = None) -> torch.optim.Optimizer:
    """torch AdamW over ``groups`` (default: param_groups of the model)."""
    if groups is None:
        groups = param_groups(model, cfg.adamw_weight_decay, cfg.weight_decay_split)
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adamw_eps, **extra)
