"""The variant registries, one per family, below config and model: the config validator and the
CLI read the valid names here, the implementations register themselves on import.

The built-in implementations live in ``forge_dist.model`` (importing it registers every family);
a registry imports that package the first time its names are read, so validation never depends
on whether the model happened to be imported already. A plugin registers by importing the
registry it extends and decorating its builder, e.g. ``@SOFTMAX.register("mymax")``.
"""
from forge_dist.registry import Registry

BUILTIN = "forge_dist.model"  # the package whose import registers the built-in variants

ATTENTION = Registry("attention variant", "attention_variant", provider=BUILTIN)
SOFTMAX = Registry("softmax variant", "softmax_variant_attn", provider=BUILTIN)
NORM = Registry("norm variant", "norm_variant_attn", provider=BUILTIN)
ACTIVATION = Registry("activation variant", "activation_variant", provider=BUILTIN)
MLP = Registry("MLP variant", "mlp_variant", provider=BUILTIN)
LINEAR = Registry("linear variant", "linear_variant_attn", provider=BUILTIN)
QUANTIZER = Registry("quantization method", "quantize_linear_method", provider=BUILTIN)
ROUTER = Registry("MoE router scheme", "moe_router_scheme", provider=BUILTIN)
LSV = Registry("learned steering vector variant", "lsv_variant", provider=BUILTIN)
EMBED_INIT = Registry("embedding init variant", "init_variant", provider=BUILTIN)
MOD_FN = Registry("co4 modulation function", "mod_fn", provider=BUILTIN)
