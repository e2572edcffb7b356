"""MLP variants (mlp_variant). Hidden size F = mlp_size or mlp_expansion_factor * n_embd.

Activations are applied as act(h - x_offset) - y_offset (ReaLLM-Forge's MLP offsets; 0-d buffers,
or parameters when learn_mlp_*_offset). Up-projections are column-splittable and down-projections
row-splittable nn.Linear-like layers, named as upstream (c_fc / c_proj; swiglu c_fc_in1/2, c_fc_out).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.model.activation import build_activation
from forge_dist.model.linear import build_linear
from forge_dist.model.registries import MLP


def _offset(module: nn.Module, name: str, value: float, learn: bool) -> None:
    t = torch.tensor(float(value))
    if learn:
        module.register_parameter(name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


class OffsetActivationMixin:
    """Adds activation_x_offset / activation_y_offset and ``activate(h)`` to an MLP module."""

    def _init_activation(self, config):
        self.activation_variant = build_activation(config.activation_variant, config)
        _offset(self, "activation_x_offset", config.mlp_x_offset, config.learn_mlp_x_offset)
        _offset(self, "activation_y_offset", config.mlp_y_offset, config.learn_mlp_y_offset)

    def activate(self, h):
        return self.activation_variant(h - self.activation_x_offset) - self.activation_y_offset


@MLP.register("mlp")
class OriginalMLP(OffsetActivationMixin, nn.Module):
    """y = W_down(act(W_up x - x_off) - y_off); mlp_down_projs=m sums m down-projections."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.n_embd = config.n_embd
        self.down_projs = config.mlp_down_projs
        self.c_fc = build_linear("mlp_up", config.n_embd, config.mlp_hidden, config, config.mlp_up_bias_resolved)
        self._init_activation(config)
        self.c_proj = build_linear("mlp_down", config.mlp_hidden, config.n_embd * self.down_projs, config,
                                   config.mlp_down_bias_resolved)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        y = self.c_proj(self.activate(self.c_fc(x)))  # (B, T, m*C)
        if self.down_projs > 1:
            y = y.view(*y.shape[:-1], self.down_projs, self.n_embd).sum(-2)
        return self.dropout(y)


def build_mlp(config, layer_idx: int = 0) -> nn.Module:
    return MLP.build(config.mlp_variant, config, layer_idx)
