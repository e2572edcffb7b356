"""Kolmogorov-Arnold network with Legendre-polynomial edges (KAL-Net, after torchkan; KAN: Liu et
al. 2024, arXiv 2404.19756), as ReaLLM-Forge's ``KAL_Net``.

Used by the ``kan`` MLP and reusable as a linear variant: ``KANetwork(in_features, out_features,
config)`` maps (..., in) -> (..., out). Widths run in -> kan_middle_layers -> out; each layer is

    x_hat = per-token min-max of x to [-1, 1]
    y     = base_activation(LayerNorm(W_base base_activation(x) + W_poly [P_0(x_hat) .. P_p(x_hat)]))

Parameter names follow upstream (``base_weights.{i}``, ``poly_weights.{i}``,
``layer_norms.{i}.weight/bias``), and the polynomial features are laid out input-major
(feature j, order n at column j*(p+1) + n), as upstream flattens them.

Causality: upstream min-max-normalises over the *time* dimension, so every token sees the range of
the whole sequence, future tokens included. Here the range is taken per token over the features:
each position is transformed on its own (no position mixing at all, so it also works token by
token with a KV cache).

As the ``kan`` MLP, the activation_input / activation_output fake-quant points (``act_quant``)
wrap every base_activation call, each call with its own per-tensor statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.activation import build_activation, width_divisor


def legendre_basis(x: torch.Tensor, order: int) -> torch.Tensor:  # (...,) -> (..., order+1)
    """P_0..P_order at x by Bonnet's recursion: P_0 = 1, P_1 = x,
    (n+1) P_{n+1} = (2n+1) x P_n - n P_{n-1}."""
    polys = [torch.ones_like(x), x][: order + 1]
    for n in range(1, order):
        polys.append(((2 * n + 1) * x * polys[-1] - n * polys[-2]) / (n + 1))
    return torch.stack(polys, dim=-1)


def minmax_features(x: torch.Tensor, min_range: float = 1e-6) -> torch.Tensor:
    """Map each row (last dim) to [-1, 1]: 2 (x - min) / max(max - min, min_range) - 1."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    return 2 * (x - lo) / torch.clamp(hi - lo, min=min_range) - 1


class KANetwork(nn.Module):
    def __init__(self, in_features: int, out_features: int, config):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.poly_order = config.kan_poly_order
        widths = [in_features, *config.kan_middle_layers, out_features]
        self.base_activation = build_activation(config.kan_base_activation, config, option="kan_base_activation")
        self.base_weights = nn.ParameterList()
        self.poly_weights = nn.ParameterList()
        self.layer_norms = nn.ModuleList()
        for n_in, n_out in zip(widths, widths[1:]):
            self.base_weights.append(nn.Parameter(_kaiming_uniform(n_out, n_in)))
            self.poly_weights.append(nn.Parameter(_kaiming_uniform(n_out, n_in * (self.poly_order + 1))))
            self.layer_norms.append(nn.LayerNorm(n_out))

    def forward(self, x, act_quant=None):  # (..., in) -> (..., out)
        for base_w, poly_w, norm in zip(self.base_weights, self.poly_weights, self.layer_norms):
            base = F.linear(self.activate(x, act_quant), base_w)
            basis = legendre_basis(minmax_features(x), self.poly_order)  # (..., n_in, p+1)
            poly = F.linear(basis.flatten(-2), poly_w)
            x = self.activate(norm(base + poly), act_quant)
        return x

    def activate(self, x, act_quant=None):
        if act_quant is None:
            return self.base_activation(x)
        return act_quant("activation_output", self.base_activation(act_quant("activation_input", x)))


def _kaiming_uniform(n_out: int, n_in: int) -> torch.Tensor:
    """U(-sqrt(3 / n_in), sqrt(3 / n_in)): Kaiming uniform with gain 1 ('linear'), as upstream."""
    bound = math.sqrt(3.0 / n_in)
    return torch.empty(n_out, n_in).uniform_(-bound, bound)


@register_rule
def rule_kan(cfg):
    if cfg.kan_poly_order < 0:
        raise ConfigError(f"kan_poly_order={cfg.kan_poly_order} must be >= 0")
    bad = [w for w in cfg.kan_middle_layers if w < 1]
    if bad:
        raise ConfigError(f"kan_middle_layers={cfg.kan_middle_layers}: every width must be positive")
    if width_divisor(cfg.kan_base_activation, "kan_base_activation") != 1:
        raise ConfigError(f"kan_base_activation={cfg.kan_base_activation!r} changes the width; KAN layers "
                          f"apply it to their inputs and outputs elementwise; choose e.g. silu")
