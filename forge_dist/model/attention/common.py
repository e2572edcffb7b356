"""Pieces shared by the attention variants (head split/merge, QK-norm, flash-LOBO sink, FIRE)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D); H is whatever this rank holds."""
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def qk_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / (||x|| + 1e-6) per head vector, parameter-free (upstream QK-norm)."""
    return x / (x.norm(dim=-1, keepdim=True) + 1e-6)


def uses_plain_softmax(config) -> bool:
    return config.softmax_variant_attn == "softmax"


def init_lobo(module: nn.Module, config, n_head: int) -> None:
    """flash-LOBO sink logit log C: fixed (use_flash_obo_const), per head, or one per layer.

    Stored as ``flash_lobo_log_const`` on the attention module, as upstream names it.
    """
    if not config.use_flash_lobo:
        module.flash_lobo_log_const = None
    elif config.use_flash_obo_const:
        module.flash_lobo_log_const = float(config.flash_lobo_log_const)
    elif config.use_flash_lobo_per_head:
        module.flash_lobo_log_const = nn.Parameter(torch.full((n_head,), float(config.flash_lobo_log_const)))
    else:
        module.flash_lobo_log_const = nn.Parameter(torch.tensor(float(config.flash_lobo_log_const)))


def lobo_logit(module: nn.Module) -> Optional[torch.Tensor]:
    c = module.flash_lobo_log_const
    if c is None:
        return None
    return torch.as_tensor(c).reshape(-1, 1, 1)  # (H or 1, 1, 1)


def build_fire(config, n_head: int, shared) -> Optional[nn.Module]:
    """The FIRE bias module for one layer: the model-wide one when shared_fire_embeddings."""
    if not config.use_fire_embeddings:
        return None
    if config.shared_fire_embeddings and shared is not None and shared.get("fire") is not None:
        return shared["fire"]
    from forge_dist.model.position import FIRE

    fire = FIRE(config, n_head)
    if config.shared_fire_embeddings and shared is not None:
        shared["fire"] = fire
    return fire
