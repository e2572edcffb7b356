"""Attention variants; importing this package registers them all (and the co4 mod_fn family)."""
from forge_dist.model.attention import causal, co4, identity, infinite, linear, mla, ssm, triadic  # noqa: F401
from forge_dist.variants import ATTENTION


def build_attention(config, layer_idx: int = 0, shared=None):
    """The attention module of one layer (``config`` = config.for_layer(layer_idx)); ``shared``
    holds model-wide modules such as the shared FIRE."""
    return ATTENTION.build(config.attention_variant, config, layer_idx, shared, option="attention_variant")
