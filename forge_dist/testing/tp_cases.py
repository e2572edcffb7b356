"""The tensor-parallel parity cases: data, so a new variant is one entry (and one rule).

``core_cases()``: hand-written configurations of every option that has a TP rule; each must match
the single-process model wherever its shapes divide. ``variant_cases()``: one configuration per
registered variant of each family, generated from the model registries, so a variant added to
the model shows up here by itself, plus OPTION_CASES for options outside the registries: each must
either match, or be refused by parallelize with a NoShardingRuleError naming its module (until
its rule is written). Options a variant needs besides its name go in VARIANT_OVERRIDES.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

# tiny: 2 layers, 4 heads of 8, 16 tokens, vocab 64 (padded to 256 at TP=2)
BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)

CORE_CASES: Dict[str, dict] = {
    "default": {},
    "gqa_kv2": {"n_kv_group": 2},  # KV heads split at TP=2, replicated on 2 ranks each at TP=4
    "mqa_kv1": {"n_kv_group": 1},  # one KV head replicated on every rank
    "rope": {"use_rotary_embeddings": True, "use_abs_pos_embeddings": False},
    "rope_partial_gqa": {"use_rotary_embeddings": True, "rope_length": 4, "n_kv_group": 2},
    "qk_norm": {"use_qk_norm": True},
    "qk_norm_scale": {"use_qk_norm": True, "use_qk_norm_scale": True},
    "flash_lobo": {"use_flash_lobo": True, "flash_lobo_log_const": 0.5},
    "flash_lobo_per_head": {"use_flash_lobo": True, "use_flash_lobo_per_head": True, "flash_lobo_log_const": 0.3},
    "flash_lobo_const": {"use_flash_lobo": True, "use_flash_obo_const": True, "flash_lobo_log_const": 1.0},
    "lobo_per_head_manual_gqa": {"use_flash_lobo": True, "use_flash_lobo_per_head": True,
                                 "disable_flash_attention": True, "n_kv_group": 1},
    "window": {"window_size": 5},
    "softcap": {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "manual_attention": {"disable_flash_attention": True},
    "bias": {"bias": True},
    "layernorm": {"norm_variant_attn": "layernorm", "norm_variant_output": "layernorm"},
    "layernorm_bias": {"norm_variant_attn": "layernorm", "norm_variant_output": "layernorm", "bias": True},
    "untied": {"wte_weight_tying": False},
    "vocab_uneven": {"vocab_size": 61},
    "factorised": {"n_embd_wte": 16},
    "factorised_untied": {"n_embd_wte": 16, "n_embd_wte_scale_tying": False, "wte_weight_tying": False},
    "embedding_scale": {"use_embedding_scale": True},
    "post_ln": {"use_pre_ln": False, "use_post_ln": True},
    "peri_ln": {"use_peri_ln": True},
    "parallel_mlp": {"use_parallel_mlp": True},
    "mlp_size": {"mlp_size": 48},
    "mlp_down_projs": {"mlp_down_projs": 2, "bias": True},
    "learned_offsets": {"learn_mlp_x_offset": True, "learn_mlp_y_offset": True, "mlp_x_offset": 0.1},
    "glu": {"activation_variant": "glu"},
    "layerlist_heads": {"n_head_layerlist": [4, 2], "n_kv_group_layerlist": [2, 1]},
    "gradient_checkpointing": {"use_gradient_checkpointing": True},
    "quantized_wpe": {"quantize_wpe": True},  # replicated: its statistics see the whole table
}

# options outside the registries whose TP support may be pending (must match or be refused)
OPTION_CASES: Dict[str, dict] = {
    "quantize_wte": {"quantize_wte": True},
    "quantize_attn_act": {"quantize_attn_act": True},
    "quantize_mlp_act": {"quantize_mlp_act": True},
    "moe": {"use_moe": True, "n_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2},
}

# family registry (forge_dist.model.registries) -> the ModelConfig options that select from it
REGISTRY_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "ATTENTION": ("attention_variant",),
    "SOFTMAX": ("softmax_variant_attn",),
    "NORM": ("norm_variant_attn", "norm_variant_output"),
    "ACTIVATION": ("activation_variant",),
    "MLP": ("mlp_variant",),
    "LINEAR": ("linear_variant_attn", "linear_variant_mlp"),
}

# (registry, variant) -> further options the variant needs in the tiny model
VARIANT_OVERRIDES: Dict[Tuple[str, str], dict] = {}

# cases that draw random numbers in training (no two processes can match them): compared in eval
# mode; tests/dist/test_rng.py covers their RNG regions in training
EVAL_MODE_CASES = {"activation=rrelu"}


def core_cases() -> Iterator[Tuple[str, dict]]:
    for name, overrides in CORE_CASES.items():
        yield name, {**BASE, **overrides}


def variant_cases() -> Iterator[Tuple[str, dict]]:
    from forge_dist.model import registries

    for family, options in REGISTRY_OPTIONS.items():
        for variant in getattr(registries, family).names():
            case = {**BASE, **{o: variant for o in options}, **VARIANT_OVERRIDES.get((family, variant), {})}
            yield f"{family.lower()}={variant}", case
    for name, overrides in OPTION_CASES.items():
        yield f"option={name}", {**BASE, **overrides}
