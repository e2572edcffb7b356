"""MLP variants (mlp_variant). Hidden size F = mlp_size or mlp_expansion_factor * n_embd.

Activations are applied as act(h - x_offset) - y_offset (ReaLLM-Forge's MLP offsets; 0-d buffers,
or parameters when learn_mlp_*_offset). Up-projections are column-splittable and down-projections
row-splittable nn.Linear-like layers from build_linear, named as upstream (c_fc / c_proj; swiglu
c_fc_in1/2, c_fc_out; dual_path c_fc, c_proj1/2). An activation that halves the width (glu) gets an
up projection of width_divisor * F outputs, so every variant keeps its hidden width F.

Activation fake-quantization points (quantize_mlp_act_*): ``input`` and ``output`` around every
variant (MLPModule), ``activation_input`` / ``activation_output`` around its activation
(``activate``; KAN: around each of its activations); the identity MLP has no activation.

Every variant acts on each position independently (no mixing over T), so all are causal.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.model.act_points import ActQuantModule
from forge_dist.model.activation import build_activation
from forge_dist.model.kan import KANetwork
from forge_dist.model.linear import build_linear
from forge_dist.model.quantize import MLP_ACT_POINTS
from forge_dist.variants import MLP


def _offset(module: nn.Module, name: str, value: float, learn: bool) -> None:
    t = torch.tensor(float(value))
    if learn:
        module.register_parameter(name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


class MLPModule(ActQuantModule):
    """Base of every MLP variant: ``transform(x (B, T, C)) -> (B, T, C)``, wrapped by the input and
    output activation-quant points (the output point after dropout, as upstream)."""

    act_group = "mlp"
    act_points = MLP_ACT_POINTS


class OffsetActivationMixin:
    """Adds activation_x_offset / activation_y_offset and ``activate(h)`` to an MLP module, and
    ``act_width``: how many up-projection outputs feed the F hidden units (2F for glu)."""

    def _init_activation(self, config):
        self.activation_variant = build_activation(config.activation_variant, config)
        self.act_width = config.mlp_hidden * self.activation_variant.width_divisor
        _offset(self, "activation_x_offset", config.mlp_x_offset, config.learn_mlp_x_offset)
        _offset(self, "activation_y_offset", config.mlp_y_offset, config.learn_mlp_y_offset)

    def activate(self, h):  # (..., act_width) -> (..., F)
        """The activation between the activation_input and activation_output quant points (the
        offsets inside them, as upstream)."""
        h = self.act_quant("activation_input", h)
        return self.act_quant("activation_output", self.offset_activation(h))

    def offset_activation(self, h):
        return self.activation_variant(h - self.activation_x_offset) - self.activation_y_offset


def sum_down_projs(y: torch.Tensor, m: int) -> torch.Tensor:  # (..., m*C) -> (..., C)
    """mlp_down_projs = m: the down projection outputs m slices of C that are summed (a
    re-parameterisation of one projection, as upstream)."""
    return y.view(*y.shape[:-1], m, -1).sum(-2) if m > 1 else y


@MLP.register("mlp")
class OriginalMLP(OffsetActivationMixin, MLPModule):
    """y = W_down(act(W_up x - x_off) - y_off); mlp_down_projs=m sums m down-projections."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config)
        self._init_activation(config)
        self.down_projs = config.mlp_down_projs
        self.c_fc = build_linear("mlp_up", config.n_embd, self.act_width, config, config.mlp_up_bias_resolved)
        self.c_proj = build_linear("mlp_down", config.mlp_hidden, config.n_embd * self.down_projs, config,
                                   config.mlp_down_bias_resolved)
        self.dropout = nn.Dropout(config.dropout)

    def transform(self, x):  # (B, T, C) -> (B, T, C)
        return self.dropout(sum_down_projs(self.c_proj(self.activate(self.c_fc(x))), self.down_projs))


@MLP.register("swiglu")
class SwiGLU(OffsetActivationMixin, MLPModule):
    """Gated MLP (Shazeer 2020, GLU variants): y = W_out((act(W_in1 x - x_off) - y_off) * W_in2 x).

    The gate is activation_variant, whose default gelu makes this GeGLU unless activation_variant
    is silu, exactly as upstream.
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config)
        self._init_activation(config)
        self.down_projs = config.mlp_down_projs
        up_bias = config.mlp_up_bias_resolved
        self.c_fc_in1 = build_linear("mlp_up", config.n_embd, self.act_width, config, up_bias)
        self.c_fc_in2 = build_linear("mlp_up", config.n_embd, config.mlp_hidden, config, up_bias)
        self.c_fc_out = build_linear("mlp_down", config.mlp_hidden, config.n_embd * self.down_projs, config,
                                     config.mlp_down_bias_resolved)
        self.dropout = nn.Dropout(config.dropout)

    def transform(self, x):  # (B, T, C) -> (B, T, C)
        h = self.activate(self.c_fc_in1(x)) * self.c_fc_in2(x)  # (B, T, F)
        return self.dropout(sum_down_projs(self.c_fc_out(h), self.down_projs))


@MLP.register("dual_path")
class DualPathMLP(OffsetActivationMixin, MLPModule):
    """h = W_up x;  y = W_p1(act(h - x_off) - y_off) + W_p2(-act(-(h + x_off)) - y_off).

    The second path mirrors the first through the origin, so a one-sided activation (relu, gelu)
    also passes the negative side. Biases read mlp_up_bias/mlp_down_bias directly (None -> no
    bias; ``bias`` is not consulted), as upstream. activation_input quantizes h once;
    activation_output quantizes both paths' activations with one shared scale.
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config)
        self._init_activation(config)
        up_bias, down_bias = bool(config.mlp_up_bias), bool(config.mlp_down_bias)
        self.c_fc = build_linear("mlp_up", config.n_embd, self.act_width, config, up_bias)
        self.c_proj1 = build_linear("mlp_down", config.mlp_hidden, config.n_embd, config, down_bias)
        self.c_proj2 = build_linear("mlp_down", config.mlp_hidden, config.n_embd, config, down_bias)
        self.dropout = nn.Dropout(config.dropout)

    def offset_activation(self, h):  # (..., act_width) -> (2, ..., F): both paths, one tensor to quantize
        y1 = super().offset_activation(h)
        y2 = -self.activation_variant(-(h + self.activation_x_offset)) - self.activation_y_offset
        return torch.stack([y1, y2])

    def transform(self, x):  # (B, T, C) -> (B, T, C)
        y1, y2 = self.activate(self.c_fc(x))
        return self.dropout(self.c_proj1(y1) + self.c_proj2(y2))


@MLP.register("kan")
class KanMLP(MLPModule):
    """A Kolmogorov-Arnold network n_embd -> kan_middle_layers -> n_embd (forge_dist.model.kan),
    applied per token; the activation points wrap each of its activations."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config)
        self.kan = KANetwork(config.n_embd, config.n_embd, config)
        self.dropout = nn.Dropout(config.dropout)

    def transform(self, x):  # (B, T, C) -> (B, T, C)
        return self.dropout(self.kan(x, act_quant=self.act_quant))


@MLP.register("identity")
class IdentityMLP(MLPModule):
    """Returns its input (upstream's MLP_Identity crashes in its constructor). No activation, so
    only the input and output quant points (both on the same tensor)."""

    act_points = ("input", "output")

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config)

    def transform(self, x):
        return x


def build_mlp(config, layer_idx: int = 0) -> nn.Module:
    return MLP.build(config.mlp_variant, config, layer_idx)
