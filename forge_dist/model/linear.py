"""Linear variants (linear_variant_attn/_mlp and per-projection overrides).

Every variant is an ``nn.Linear`` subclass (or has ``weight`` of shape (out, in)), so tensor
parallelism can split it by rows or columns without knowing the variant.
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.registries import LINEAR

# projection -> (per-projection option, group default option, quant method option, quant bits option)
PROJECTIONS = {
    "q": ("linear_variant_q", "linear_variant_attn", "quantize_linear_attn_q_method", "quantize_linear_attn_q_bits"),
    "k": ("linear_variant_k", "linear_variant_attn", "quantize_linear_attn_k_method", "quantize_linear_attn_k_bits"),
    "v": ("linear_variant_v", "linear_variant_attn", "quantize_linear_attn_v_method", "quantize_linear_attn_v_bits"),
    "attn_proj": ("linear_variant_attn_proj", "linear_variant_attn", "quantize_linear_attn_proj_method", "quantize_linear_attn_proj_bits"),
    "mlp_up": ("linear_variant_mlp_up", "linear_variant_mlp", "quantize_linear_mlp_up_method", "quantize_linear_mlp_up_bits"),
    "mlp_down": ("linear_variant_mlp_down", "linear_variant_mlp", "quantize_linear_mlp_down_method", "quantize_linear_mlp_down_bits"),
}


@LINEAR.register("linear")
def _plain_linear(in_features, out_features, config, method, bits, bias):
    return nn.Linear(in_features, out_features, bias=bias)


def build_linear(projection: str, in_features: int, out_features: int, config, bias: bool) -> nn.Module:
    """Build the linear layer of one named projection (q, k, v, attn_proj, mlp_up, mlp_down).

    A falsy per-projection value falls back to the group default, as upstream's set_variant does.
    """
    own, group, method_opt, bits_opt = PROJECTIONS[projection]
    variant_option = own if getattr(config, own) else group
    variant = getattr(config, variant_option)
    method = getattr(config, method_opt) or config.quantize_linear_method
    bits = getattr(config, bits_opt) or config.quantize_linear_bits
    return LINEAR.build(variant, in_features, out_features, config, method, bits, bias, option=variant_option)
