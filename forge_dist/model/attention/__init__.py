"""Attention variants; importing this package registers them all."""
from forge_dist.model.attention import causal  # noqa: F401
from forge_dist.model.registries import ATTENTION


def build_attention(config, layer_idx: int = 0, shared=None):
    return ATTENTION.build(config.attention_variant, config, layer_idx, shared, option="attention_variant")
