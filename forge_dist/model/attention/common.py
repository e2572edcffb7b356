"""Pieces shared by the attention variants (base class with the input/output activation-quant
points, head split/merge, KV-cache append, QK-norm, flash-LOBO sink, FIRE)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.errors import ConfigError
from forge_dist.model.act_points import ActQuantModule


class AttentionModule(ActQuantModule):
    """Base of every attention variant: ``transform(x (B, T, C), cache) -> (B, T, C)``, wrapped by
    the input/output activation-quant points. Variants with q.k scores also have the inner points
    (``act_points``) and pass ``self.act_quant`` to ``core.attend``."""

    act_group = "attn"

    def forward(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        return super().forward(x, cache)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D); H is whatever this rank holds."""
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def extend_cache(cache, **new: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Append each new tensor (..., T, D) to the layer cache's tensor of that name along the time
    dim (-2) and return the full tensors, in argument order. Without a cache, returns the inputs."""
    if cache is None:
        return tuple(new.values())
    out = []
    for name, t in new.items():
        prev = cache.state.get(name)
        full = t if prev is None else torch.cat([prev, t], dim=-2)
        cache.state[name] = full
        out.append(full)
    return tuple(out)


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
        fire = shared["fire"]
        if fire.n_head != n_head:
            raise ConfigError(
                f"shared_fire_embeddings=True shares one FIRE of {fire.n_head} heads, but layer has "
                f"n_head={n_head}; use equal n_head in every layer or shared_fire_embeddings=False")
        return fire
    from forge_dist.model.position import FIRE

    fire = FIRE(config, n_head)
    if config.shared_fire_embeddings and shared is not None:
        shared["fire"] = fire
    return fire
