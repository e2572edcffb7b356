"""The variant registries, one per family. Implementations register themselves on import
(``forge_dist.model`` imports every implementation module)."""
from forge_dist.registry import Registry

ATTENTION = Registry("attention variant", "attention_variant")
SOFTMAX = Registry("softmax variant", "softmax_variant_attn")
NORM = Registry("norm variant", "norm_variant_attn")
ACTIVATION = Registry("activation variant", "activation_variant")
MLP = Registry("MLP variant", "mlp_variant")
LINEAR = Registry("linear variant", "linear_variant_attn")
QUANTIZER = Registry("quantization method", "quantize_linear_method")
ROUTER = Registry("MoE router scheme", "moe_router_scheme")
LSV = Registry("learned steering vector variant", "lsv_variant")
EMBED_INIT = Registry("embedding init variant", "init_variant")
MOD_FN = Registry("co4 modulation function", "mod_fn")
