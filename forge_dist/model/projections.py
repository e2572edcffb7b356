"""The six linear projections of a block and the options that configure each: read by the linear
variants (linear.py) and by the quantization rule (quantize.py), so neither imports the other."""

# projection -> (per-projection option, group default option, quant method option, quant bits option)
PROJECTIONS = {
    "q": ("linear_variant_q", "linear_variant_attn", "quantize_linear_attn_q_method", "quantize_linear_attn_q_bits"),
    "k": ("linear_variant_k", "linear_variant_attn", "quantize_linear_attn_k_method", "quantize_linear_attn_k_bits"),
    "v": ("linear_variant_v", "linear_variant_attn", "quantize_linear_attn_v_method", "quantize_linear_attn_v_bits"),
    "attn_proj": ("linear_variant_attn_proj", "linear_variant_attn", "quantize_linear_attn_proj_method", "quantize_linear_attn_proj_bits"),
    "mlp_up": ("linear_variant_mlp_up", "linear_variant_mlp", "quantize_linear_mlp_up_method", "quantize_linear_mlp_up_bits"),
    "mlp_down": ("linear_variant_mlp_down", "linear_variant_mlp", "quantize_linear_mlp_down_method", "quantize_linear_mlp_down_bits"),
}
