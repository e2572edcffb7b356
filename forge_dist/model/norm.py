"""Normalisation variants (norm_variant_attn for every norm inside blocks, norm_variant_output
for ln_f). All normalise over the last dim; parameter names follow ReaLLM-Forge (``gain`` for the
RMS family, ``weight``/``bias`` for LayerNorm) so checkpoints convert by name."""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist import ops
from forge_dist.model.registries import NORM


@NORM.register("rmsnorm")
class RMSNorm(nn.Module):
    """y = x / (||x||_2 / sqrt(d)) * gain (no epsilon, as upstream, unless ``rmsnorm_eps``)."""

    def __init__(self, config, dim: int):
        super().__init__()
        self.eps = config.rmsnorm_eps
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., d) -> (..., d)
        return ops.rms_norm(x, self.gain, self.eps)


@NORM.register("layernorm")
class LayerNorm(nn.Module):
    """F.layer_norm with weight and optional bias (``bias``), eps 1e-5."""

    def __init__(self, config, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if config.bias else None

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, 1e-5)


@NORM.register("identity")
class IdentityNorm(nn.Module):
    def __init__(self, config, dim: int):
        super().__init__()

    def forward(self, x):
        return x


def build_norm(name: str, config, dim: int | None = None, option: str = "norm_variant_attn") -> nn.Module:
    return NORM.build(name, config, dim if dim is not None else config.n_embd, option=option)
