"""The tensor-parallel parity cases: data, so a new variant is one entry (and one rule).

``core_cases()``: hand-written configurations of options that have a TP rule; each must match the
single-process model wherever its shapes divide. ``variant_cases()``: one configuration per
registered variant of each family, generated from the model registries, so a variant added to
the model shows up here by itself, plus OPTION_CASES for options outside the registries: each must
either match, or be refused by parallelize with a NoShardingRuleError naming its module and why.
Options a variant needs besides its name go in VARIANT_OVERRIDES (chosen so that every parameter
the variant can have exists and is trained), options a whole family needs in FAMILY_BASE.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

# tiny: 2 layers, 4 heads of 8, 16 tokens, vocab 64 (padded to 256 at TP=2)
BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)

# Attention activation-quant points in two sets that do not feed each other. With q and k both
# quantized the scores lie on a lattice, and quantizing them again (and the probabilities) meets
# exact rounding ties, which any other summation order breaks: with every point on at once the
# tiny single-device model's own fp64 gradients move by 2e-3 when its weights move by 1e-12. Each
# set alone moves them by 3e-12, so parity can be exact; together the two cover every point.
ATTN_POINTS_A = {f"quantize_attn_act_{p}": True for p in ("input", "qk_mult_q_input", "pv_mult_p_input",
                                                             "pv_mult_v_input", "output")}
ATTN_POINTS_B = {f"quantize_attn_act_{p}": True for p in ("qk_mult_k_input", "softmax_input", "pv_mult_output")}

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
    "fire": {"use_fire_embeddings": True, "fire_num_hidden_layers": 2, "fire_mlp_width": 8},
    "fire_shared": {"use_fire_embeddings": True, "shared_fire_embeddings": True, "fire_mlp_width": 8},
    "shared_attn_mlp": {"shared_attn_size": 2, "shared_mlp_sym": True},  # one module object in several blocks
    "steering_obtain": {"obtain_vector_at_layer_idx": 1},  # the recorded mean covers the whole sequence
    "infinite_concat_gqa": {"attention_variant": "infinite", "use_concat_heads": True, "n_kv_group": 2,
                            "n_qk_head_dim": 6, "n_v_head_dim": 10},
    "infinite_layerlist": {"attention_variant": "infinite", "n_head_layerlist": [4, 2], "n_cproj": 2,
                           "use_qk_norm": True, "use_qk_norm_scale": True, "use_flash_lobo": True,
                           "use_flash_lobo_per_head": True},
    "mla_fire_consmax_v2": {"attention_variant": "mla", "mla_rotary_dim": 4, "use_fire_embeddings": True,
                            "softmax_variant_attn": "consmax_v2"},
    "swiglu_glu_offsets": {"mlp_variant": "swiglu", "activation_variant": "glu", "learn_mlp_x_offset": True,
                           "bias": True},
    "dual_path_quantized": {"mlp_variant": "dual_path", "linear_variant_mlp": "quantized_linear",
                            "quantization_warmup_iters": 0, "mlp_down_bias": True},  # rows reduced one by one
    "kan_mlp_act_quant": {"mlp_variant": "kan", "quantize_mlp_act": True},  # points on the residual stream
    "identity_mlp_act_quant": {"mlp_variant": "identity", "attention_variant": "identity", "quantize_mlp_act": True,
                               "quantize_attn_act": True},
    "co4_act_quant": {"attention_variant": "co4", "n_latent": 2, **ATTN_POINTS_A},
    "krmsnorm_first_int8": {"norm_variant_attn": "krmsnorm", "krmsnorm_selection_type": "first",
                            "krmsnorm_quantize_type": "int8", "krmsnorm_recompute_percentage": 0.5},
    "dact_prelu": {"norm_variant_attn": "dact", "norm_variant_output": "dact", "dact_activation": "prelu"},
    "gqa_kv_quant": {"n_kv_group": 1, "quantize_attn_act": True,  # k, v stats over a replicated KV head
                     "linear_variant_attn": "quantized_linear", "quantization_warmup_iters": 0},
}

# options outside the registries (must match or be refused with a reason)
OPTION_CASES: Dict[str, dict] = {
    "quantize_wte": {"quantize_wte": True, "vocab_size": 200},  # real rows on 2 ranks, padding-only ranks at TP=4
    "quantize_wte_stochastic_uneven": {"quantize_wte": True, "quantize_wte_method": "stochastic_quant",
                                       "vocab_size": 61, "wte_weight_tying": False},
    "quantize_wte_ternary": {"quantize_wte": True, "quantize_wte_method": "ternary_quant", "vocab_size": 200},
    "quantize_attn_act_points_a": ATTN_POINTS_A,
    "quantize_attn_act_points_b": {**ATTN_POINTS_B, "n_kv_group": 1},  # k: statistics of a replicated KV head
    "quantize_mlp_act": {"quantize_mlp_act": True},
    "quantize_act_ternary": {"quantize_attn_act": True, "quantize_mlp_act": True,
                             "activations_quant_method": "ternary_quant"},
    "quantize_act_stochastic": {"quantize_attn_act": True, "activations_quant_method": "stochastic_quant"},
    "moe": {"use_moe": True, "n_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2},
    "moe_swiglu_capacity_losses": {"use_moe": True, "n_experts": 4, "moe_top_k": 2, "moe_layer_freq": 1,
                                   "mlp_variant": "swiglu", "moe_capacity_factor": 1.0, "moe_aux_loss_coef": 0.01,
                                   "moe_z_loss_coef": 0.001, "bias": True},
    "lsv_at_embedding": {"use_lsv": True, "lsv_dataset_num": 2, "apply_lsv_at_layer_idx": 0,
                         "lsv_variant": "ohmg"},
}

# family registry (forge_dist.variants) -> the ModelConfig options that select from it
REGISTRY_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "ATTENTION": ("attention_variant",),
    "SOFTMAX": ("softmax_variant_attn",),
    "NORM": ("norm_variant_attn", "norm_variant_output"),
    "ACTIVATION": ("activation_variant",),
    "MLP": ("mlp_variant",),
    "LINEAR": ("linear_variant_attn", "linear_variant_mlp"),
    "QUANTIZER": ("quantize_linear_method",),
    "ROUTER": ("moe_router_scheme",),
    "LSV": ("lsv_variant",),
    "MOD_FN": ("mod_fn",),
}

# options every variant of a family needs to be in the model at all
FAMILY_BASE: Dict[str, dict] = {
    "QUANTIZER": {"linear_variant_attn": "quantized_linear", "linear_variant_mlp": "quantized_linear",
                  "quantization_warmup_iters": 0},
    "ROUTER": {"use_moe": True, "n_experts": 4, "moe_top_k": 2, "moe_layer_freq": 1},
    "LSV": {"use_lsv": True, "lsv_dataset_num": 3, "apply_lsv_at_layer_idx": 1, "lsv_index": 1},
    "MOD_FN": {"attention_variant": "co4", "n_latent": 2, "triadic_loops": 2},
}

# (registry, variant) -> further options the variant needs in the tiny model
VARIANT_OVERRIDES: Dict[Tuple[str, str], dict] = {
    ("ATTENTION", "infinite"): {"n_qk_head_dim": 12, "n_v_head_dim": 6, "bias": True},  # summed heads
    ("ATTENTION", "iqa"): {"n_cproj": 2, "n_kv_group": 2, "bias": True},  # summed heads, two projections
    ("ATTENTION", "mla"): {"use_mla_lobo": True, "mla_rotary_dim": 4, "mla_latent_dim": 12, "bias": True},
    ("ATTENTION", "ssm"): {"ssm_io_bias": True, "ssm_d_state": 4, "ssm_dt_rank": 4},
    ("ATTENTION", "co4"): {"n_latent": 3, "triadic_loops": 2},
    ("SOFTMAX", "strongermax"): {"strongermax_use_learned_obo_per_head": True,
                                 "strongermax_use_learned_temperature_factor": True},
    ("SOFTMAX", "pfla_softmax"): {"pfla_softmax_learn_x": True, "pfla_softmax_use_obo": True,
                                  "pfla_softmax_use_learned_obo": True},
    ("NORM", "krmsnorm"): {"krmsnorm_selection_type": "random", "krmsnorm_num": 12},
    ("NORM", "hyperspherenorm"): {"hsnorm_radius_learning": True, "hsnorm_gain": True},
    ("ACTIVATION", "gelu_shifted"): {"shifted_gelu_initial_shift": 0.1},
    ("MLP", "swiglu"): {"bias": True},
    ("MLP", "dual_path"): {"mlp_up_bias": True, "mlp_down_bias": True},  # one deferred sum, bias once
    ("MLP", "kan"): {"kan_middle_layers": [16], "kan_poly_order": 2},
    ("LINEAR", "quantized_linear"): {"quantization_warmup_iters": 0, "bias": True},
    ("LINEAR", "bitlinear_1p58"): {"bias": True},
    ("LINEAR", "kan"): {"kan_poly_order": 2},
    ("ROUTER", "noisy_top_k"): {"moe_noise_std": 0.5},
}

# cases that draw random numbers in training that no two processes can match (rrelu's slope per
# element): compared in eval mode; tests/dist/test_rng.py covers their RNG regions in training
EVAL_MODE_CASES = {"activation=rrelu"}

# cases compared in float64 (same tolerances), each for a reason:
#  - quantization rounds to a grid: a value within one fp32 ulp of a rounding boundary (the sharded
#    sums run in another order) lands on the neighbouring code, a jump of a whole quantization step
#    that fp32 parity would report; in float64 that needs a value within ~1e-16 of a boundary
#  - ILL_CONDITIONED: the single-device fp32 model is itself noisy, its fp32 gradients differing
#    from its own fp64 ones (same seed and batch) by half the gradient tolerance or more, so fp32
#    parity would measure that noise, not the sharding
QUANTIZED_LINEARS = ("quantized_linear", "bitlinear_1p58", "bitlinear", "bitlinear_optimized")
ILL_CONDITIONED = {
    "linear=bitlinear": "3e-3: q and k rescaled to +-128 per token saturate the attention softmax",
    "linear=bitlinear_optimized": "3e-3, as bitlinear",
    "attention=co4": "5e-6: co4's default mod_fn (cooperation) saturates in relu6",
    "mod_fn=cooperation": "4e-6, as attention=co4",
    "norm=prmsnorm": "5e-6: the rms of the first 2 of 32 features scales each row",
}


def compare_in_float64(name: str, config: dict) -> bool:
    """Quantized linears, any quantize_* switch (embeddings, activation points) on, or ill-conditioned."""
    linears = {v for k, v in config.items() if k.startswith("linear_variant")}
    return (name in ILL_CONDITIONED or bool(linears & set(QUANTIZED_LINEARS))
            or any(k.startswith("quantize_") and v is True for k, v in config.items()))


# the CI parity test runs every case at TP=2 (world of 2) and these at TP=4 (world of 4: every case
# at TP=4 would take the 2-core CI about 3 minutes more; tools/gen_support_matrix.py runs them all):
# every attention and MLP variant, KV heads replicated over ranks, padding-only vocabulary ranks,
# shared modules, and each family's variants with parameters or statistics
TP4_CASES = (
    "default", "gqa_kv2", "mqa_kv1", "rope_partial_gqa", "qk_norm_scale", "flash_lobo_per_head",
    "lobo_per_head_manual_gqa", "bias", "untied", "vocab_uneven", "factorised", "parallel_mlp", "mlp_down_projs",
    "glu", "layerlist_heads", "gradient_checkpointing", "quantized_wpe", "fire", "fire_shared", "shared_attn_mlp",
    "steering_obtain", "infinite_concat_gqa", "infinite_layerlist", "mla_fire_consmax_v2", "swiglu_glu_offsets",
    "dual_path_quantized", "kan_mlp_act_quant", "identity_mlp_act_quant", "co4_act_quant", "krmsnorm_first_int8",
    "dact_prelu", "gqa_kv_quant",
    "attention=infinite", "attention=iqa", "attention=linear", "attention=mla", "attention=ssm", "attention=co4",
    "softmax=consmax", "softmax=strongermax", "softmax=pfla_softmax", "norm=krmsnorm", "norm=hyperspherenorm",
    "activation=prelu", "activation=gelu_shifted", "activation=learned_spline", "mlp=dual_path", "mlp=kan",
    "linear=quantized_linear", "linear=bitlinear_1p58", "linear=bitlinear", "linear=kan", "quantizer=ternary_quant",
    "quantizer=stochastic_quant", "router=noisy_top_k", "lsv=ohmt", "mod_fn=tm3", "option=quantize_wte",
    "option=quantize_wte_stochastic_uneven", "option=quantize_attn_act_points_a",
    "option=quantize_attn_act_points_b", "option=quantize_act_ternary",
    "option=moe_swiglu_capacity_losses", "option=lsv_at_embedding",
)
# at TP=2 inside the world of 4 (two TP groups side by side)
TP2_IN_WORLD4_CASES = ("default", "mqa_kv1", "flash_lobo_per_head", "untied", "option=quantize_wte", "attention=ssm")


def core_cases() -> Iterator[Tuple[str, dict]]:
    for name, overrides in CORE_CASES.items():
        yield name, {**BASE, **overrides}


def variant_cases() -> Iterator[Tuple[str, dict]]:
    from forge_dist import variants as registries

    for family, options in REGISTRY_OPTIONS.items():
        for variant in getattr(registries, family).names():
            case = {**BASE, **FAMILY_BASE.get(family, {}), **{o: variant for o in options},
                    **VARIANT_OVERRIDES.get((family, variant), {})}
            yield f"{family.lower()}={variant}", case
    for name, overrides in OPTION_CASES.items():
        yield f"option={name}", {**BASE, **overrides}


def all_cases() -> Iterator[Tuple[str, dict]]:
    yield from core_cases()
    yield from variant_cases()
