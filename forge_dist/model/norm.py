"""Normalisation variants (norm_variant_attn for every norm inside blocks, norm_variant_output
for ln_f). All normalise over the last dim; parameter names follow ReaLLM-Forge (``gain`` for the
RMS family and hyperspherenorm, ``weight``/``bias`` for LayerNorm, ``alpha``/``beta``/``gamma``
for dact) so checkpoints convert by name. The numerics live in forge_dist.ops (fusable).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from forge_dist import ops
from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.activation import build_activation, width_divisor
from forge_dist.variants import NORM

QUANT_BITS = {"none": None, "int8": 8, "int16": 16}  # krmsnorm_quantize_type -> bits


class GainNorm(nn.Module):
    """Base of the RMS family: an optional per-channel ``gain`` (ones)."""

    def __init__(self, dim: int, gain: bool = True):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim)) if gain else None


@NORM.register("rmsnorm")
class RMSNorm(GainNorm):
    """y = x / (||x||_2 / sqrt(d)) * gain (no epsilon, as upstream, unless ``rmsnorm_eps``)."""

    def __init__(self, config, dim: int):
        super().__init__(dim)
        self.eps = config.rmsnorm_eps

    def forward(self, x):  # (..., d) -> (..., d)
        return ops.rms_norm(x, self.gain, self.eps)


@NORM.register("prmsnorm")
class PartialRMSNorm(GainNorm):
    """pRMSNorm: the rms of the first k = ceil(d * prmsnorm_pct) entries scales the whole row."""

    def __init__(self, config, dim: int):
        super().__init__(dim)
        self.pct = config.prmsnorm_pct
        self.eps = config.rmsnorm_eps

    def forward(self, x):  # (..., d) -> (..., d)
        k = math.ceil(x.shape[-1] * self.pct)
        return ops.partial_rms_norm(x, self.gain, k, self.eps)


@NORM.register("krmsnorm")
class KRMSNorm(GainNorm):
    """kRMSNorm: the rms of k = min(d, krmsnorm_num) entries (first, last or a random set drawn
    each call) scales the row; optional per-row int8/int16 fake quantization of those entries, and
    optional fallback to the full rms for rows where the estimate is off by more than
    krmsnorm_recompute_percentage."""

    def __init__(self, config, dim: int):
        super().__init__(dim, gain=config.krmsnorm_enable_gain)
        self.k = config.krmsnorm_num
        self.selection = config.krmsnorm_selection_type
        self.bits = QUANT_BITS[config.krmsnorm_quantize_type]
        self.recompute_pct = config.krmsnorm_recompute_percentage
        self.eps = config.rmsnorm_eps

    def _index(self, d: int, device):
        k = min(d, self.k)
        if self.selection == "first":
            return slice(0, k)
        if self.selection == "last":
            return slice(d - k, d)
        return torch.randperm(d, device=device)[:k]  # "random": one draw per call, as upstream

    def forward(self, x):  # (..., d) -> (..., d)
        index = self._index(x.shape[-1], x.device)
        return ops.k_rms_norm(x, self.gain, index, self.bits, self.recompute_pct, self.eps)


@NORM.register("hyperspherenorm")
class HyperSphereNorm(nn.Module):
    """y = r * x / ||x||_2, r = hsnorm_radius (None -> sqrt(d)); ``radius`` is a parameter of
    shape (1,) with hsnorm_radius_learning, and hsnorm_gain adds a per-channel ``gain`` that is
    applied (upstream creates it but never uses it)."""

    def __init__(self, config, dim: int):
        super().__init__()
        r = config.hsnorm_radius if config.hsnorm_radius is not None else math.sqrt(dim)
        # a fixed radius is a plain float, as upstream: not part of the state dict
        self.radius = nn.Parameter(torch.tensor([float(r)])) if config.hsnorm_radius_learning else float(r)
        self.gain = nn.Parameter(torch.ones(dim)) if config.hsnorm_gain else None

    def forward(self, x):  # (..., d) -> (..., d)
        return ops.hypersphere_norm(x, self.radius, self.gain)


@NORM.register("dact")
class DynamicActivation(nn.Module):
    """DyT generalised (Zhu et al. 2025, arXiv 2503.10622): y = gamma * act(alpha * x) + beta with
    act = dact_activation (tanh in the paper), alpha a learnable scalar (shape (1,)), gamma and
    beta per channel. Each can be disabled (dact_use_*), leaving the constant 1, 0 or 1."""

    def __init__(self, config, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(config.dact_alpha_init))) if config.dact_use_alpha else 1.0
        self.beta = nn.Parameter(torch.zeros(dim)) if config.dact_use_beta else 0.0
        self.gamma = nn.Parameter(torch.ones(dim)) if config.dact_use_gamma else 1.0
        self.activation = build_activation(config.dact_activation, config, option="dact_activation")

    def forward(self, x):  # (..., d) -> (..., d)
        return self.gamma * self.activation(self.alpha * x) + self.beta


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


@register_rule
def rule_norms(cfg):
    if not 0.0 < cfg.prmsnorm_pct <= 1.0:
        raise ConfigError(f"prmsnorm_pct={cfg.prmsnorm_pct} must be in (0, 1] (fraction of entries)")
    if cfg.krmsnorm_num < 1:
        raise ConfigError(f"krmsnorm_num={cfg.krmsnorm_num} must be at least 1")
    pct = cfg.krmsnorm_recompute_percentage
    if pct is not None and not pct >= 0:
        raise ConfigError(f"krmsnorm_recompute_percentage={pct} must be >= 0 (or None to disable)")
    if cfg.hsnorm_radius is not None and not cfg.hsnorm_radius > 0:
        raise ConfigError(f"hsnorm_radius={cfg.hsnorm_radius} must be positive (or None for sqrt(n_embd))")
    if width_divisor(cfg.dact_activation, "dact_activation") != 1:
        raise ConfigError(f"dact_activation={cfg.dact_activation!r} changes the width (a norm must keep "
                          f"it); choose an elementwise activation, e.g. tanh")
