"""ReaLLM-Forge's GPTConfig as data: every field, its defaults, and what forge_dist does with it.

Upstream has two sets of defaults: the ``GPTConfig`` dataclass (``gpt_conf.py``) and the argparse
CLI (``train_args.py``); train.py builds GPTConfig from the CLI, so the CLI defaults are what users
run and what ModelConfig uses. A checkpoint's ``model_args`` is fed to ``GPTConfig(**model_args)``,
so a key missing from it takes the *dataclass* default; ``loading.model_config_from_model_args``
does the same.

Every upstream field is exactly one of:
  supported    a ModelConfig field of the same name and meaning;
  inert        logging, schedule or unused flags that do not change the model: dropped;
  unsupported  part of a feature forge_dist does not implement (``FEATURES``). Loading refuses a
               feature only when it is switched on: a switch set away from both its dataclass and
               its CLI default. Companion fields of a switched-off feature are ignored.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, Tuple

_ACT_POINTS = ("input", "qk_mult_q_input", "qk_mult_k_input", "softmax_input", "pv_mult_p_input",
               "pv_mult_v_input", "pv_mult_output", "output")
_MLP_POINTS = ("input", "activation_input", "activation_output", "output")
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_proj", "mlp_up", "mlp_down")

# --- GPTConfig at the reference snapshot (42dfe7f, 2025-08-20): 303 fields, dataclass defaults ---
SNAPSHOT_DEFAULTS: Dict[str, object] = {
    # core sizes
    "block_size": 1024, "vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_kv_group": 12,
    "n_embd": 768, "dropout": 0.0, "bias": False, "mlp_down_projs": 1, "eval_interval": 250,
    "attention_list": [], "n_head_layerlist": [], "n_qk_head_dim_layerlist": [],
    "n_v_head_dim_layerlist": [], "mlp_size_layerlist": [],
    # multi-dataset / multi-context
    "multicontext": False, "multidataset_wte": False, "vocab_sizes": [], "lsv_dataset_num": None,
    # MLP
    "mlp_variant": "mlp", "mlp_expansion_factor": 4, "mlp_size": None, "mlp_up_bias": None,
    "mlp_down_bias": None, "mlp_x_offset": 0.0, "mlp_y_offset": 0.0, "learn_mlp_x_offset": False,
    "learn_mlp_y_offset": False, "use_parallel_mlp": False, "kan_poly_order": 3,
    "kan_base_activation": "silu", "kan_middle_layers": [],
    # attention
    "attention_variant": "causal", "window_size": None, "use_flex_attn": None, "gate": False,
    "disable_flash_attention": False, "use_qk_norm": False, "use_qk_norm_scale": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "use_flash_lobo": False,
    "use_flash_lobo_per_head": False, "use_flash_obo_const": False, "flash_lobo_log_const": 0.0,
    "n_qk_head_dim": None, "n_v_head_dim": None, "n_cproj": None, "use_concat_heads": False,
    "mla_latent_dim": None, "mla_rotary_dim": 32, "use_mla_lobo": False, "mla_lobo_init": 0.0,
    "n_latent": None, "triadic_loops": None, "mod_fn": "causal",
    "ssm_mamba_expand": 2, "ssm_conv_kernel_size": 3, "ssm_dt_rank": 8, "ssm_d_state": 16,
    "ssm_io_bias": True,
    # block structure / residual
    "use_pre_ln": True, "use_post_ln": False, "use_peri_ln": False, "norm_variant_attn": "rmsnorm",
    "norm_variant_output": "rmsnorm", "use_attn_resid_scaling": False,
    "use_mlp_resid_scaling": False, "attn_confidence_variant": "zeros",
    "mlp_confidence_variant": "zeros", "use_attn_resid_const": False, "attn_resid_const": 0.0,
    "learn_attn_resid_const": False, "use_mlp_resid_const": False, "mlp_resid_const": 0.0,
    "learn_mlp_resid_const": False, "resid_gaussian_mean_init": 0.0,
    "resid_gaussian_std_init": 0.02, "use_ln_f_input_mixer": False,
    "ln_f_input_mixer_variant": "linear", "ln_f_mixer_top_k": 2,
    "use_gradient_checkpointing": False, "recompute_backward_pass": False,
    # norms
    "prmsnorm_pct": 0.0625, "krmsnorm_num": 10, "krmsnorm_quantize_type": "int8",
    "krmsnorm_enable_gain": True, "krmsnorm_selection_type": "last",
    "krmsnorm_recompute_percentage": 0.05, "hsnorm_gain": False, "hsnorm_radius": 1.0,
    "hsnorm_radius_learning": False, "dact_alpha_init": 1.0, "dact_activation": "tanh",
    "dact_use_gamma": True, "dact_use_beta": True, "dact_use_alpha": True,
    "use_embedding_scale": False,
    # activations
    "activation_variant": "gelu", "shifted_gelu_learnable_shift": True,
    "shifted_gelu_initial_shift": 0.0, "pla_num_points": 7, "pla_left_bound": -2.0,
    "pla_right_bound": 2.0, "pfla_num_points": 200, "pfla_left_bound": -100.0,
    "pfla_right_bound": 100.0, "lsa_num_knots": 30,
    # softmax variants
    "softmax_variant_attn": "softmax", "softmax_variant_output": "softmax", "div_by_seq_len": False,
    "consmax_initial_beta": 2.0, "consmax_initial_gamma": 100.0, "consmax_base": 2.0,
    "consmax_use_euler_base": True, "consmax_per_head": True, "consmax_v2_clamping": True,
    "consmax_v2_clamp_value": 80.0, "consmax_saturation": 11.0, "consmax_learnable_beta": True,
    "consmax_learnable_gamma": True, "softermax_use_xmax": True, "polymax_x_intercept": -100.0,
    "polymax_y_intercept": 1.0, "polymax_power": 2.0, "polymax_divisor": 1000.0,
    "sigsoftmax_use_euler_base": True, "sigsoftmax_base": 2.0, "strongermax_strength": math.e,
    "strongermax_div_by_sum_of_terms": True, "strongermax_divisor": 1.0,
    "strongermax_use_xmax": True, "strongermax_xmax_guess": 1.0,
    "strongermax_overflow_recompute": False, "strongermax_overflow_recompute_value": 88.0,
    "strongermax_clamping": False, "strongermax_clamp_value": 88.0, "strongermax_obo": 0.0,
    "strongermax_use_learned_obo": False, "strongermax_use_learned_obo_per_head": False,
    "strongermax_temperature_factor": 1.0, "strongermax_use_learned_temperature_factor": False,
    "exppolymax_use_euler_base": True, "exppolymax_base": math.e, "exppolymax_y_intercept": 1.0,
    "exppolymax_power": 2.0, "exppolymax_divisor": 1.0, "softplus_divisor": 256.0,
    "relumax_divisor": 256.0, "relu2max_divisor": 256.0, "sigmoidmax_divisor": 256.0,
    "squareplus_divisor": 256.0, "pfla_softmax_num_points": 30, "pfla_softmax_left_bound": -10.0,
    "pfla_softmax_right_bound": 10.0, "pfla_softmax_learn_x": False, "pfla_softmax_learn_y": True,
    "pfla_softmax_init_activation": "gelu", "pfla_softmax_density": "linear",
    "pfla_softmax_use_learned_divisor": False, "pfla_softmax_gamma_init": 1.0,
    "pfla_softmax_use_obo": False, "pfla_softmax_use_learned_obo": False, "pfla_softmax_obo": 0.0,
    "pfla_softmax_mode": "linear", "softmax_io_logging": False, "softmax_io_log_interval": 1,
    "consmax_beta_gamma_logging": False, "plot_statistics": False,
    # positions
    "use_abs_pos_embeddings": True, "use_rotary_embeddings": False, "rope_variant": "rope",
    "rope_length": 8, "sym_rot_num_angles": 512, "use_fire_embeddings": False,
    "shared_fire_embeddings": False, "fire_log_bias": 1.0, "fire_num_hidden_layers": 1,
    "fire_mlp_width": 32, "fire_init_c": 0.1, "fire_init_L": 512.0, "fire_outermost_sigma": False,
    "embedding_mean_init": 0.0, "embedding_std_init": 0.02,
    # learned position embeddings
    "n_lpe": 0, "lpe_block_size": 1024, "lpe_n_layer": 12, "lpe_n_head": 12, "lpe_n_kv_group": 12,
    "lpe_n_qk_head_dim": None, "lpe_n_v_head_dim": None, "lpe_use_abs_pos_embeddings": True,
    "lpe_use_rotary_embeddings": True, "lpe_attention_variant": "causal", "lpe_mlp_variant": "mlp",
    "lpe_mlp_size": None, "target_layer_in_lpe": 0, "target_layer_out_lpe": 0,
    "lpe_shared_mlp_size": 1, "lpe_shared_mlp_sym": False, "lpe_shared_attn_size": 1,
    "lpe_shared_attn_sym": False,
    # parameter sharing
    "shared_mlp_size": 1, "shared_mlp_sym": False, "shared_mlp_seq": 1, "shared_attn_size": 1,
    "shared_attn_sym": False, "shared_attn_seq": 1,
    # MoE
    "use_moe": False, "moe_layer_freq": 2, "n_experts": 8, "moe_top_k": 2,
    "moe_router_scheme": "softmax",
    # steering vectors
    "apply_vector_at_layer_idx": None, "obtain_vector_at_layer_idx": None,
    "apply_vector_file": None, "apply_vector_scaling_factor": 1.0, "obtain_vector_file": None,
    "use_lsv": False, "lsv_index": None, "lsv_variant": "one_hot", "apply_lsv_at_layer_idx": None,
    # embeddings
    "n_embd_wte": None, "n_embd_wte_scale_tying": True, "wte_weight_tying": True,
    "import_wte_freeze": False, "import_wte_npy": None, "export_wte_npy": None,
    "export_wte_each_eval": False, "import_scale_matrices_freeze": False,
    "import_scale_matrices_npz": None, "export_scale_matrices_npz": None,
    "export_scale_matrices_each_eval": False, "init_variant": "gaussian", "init_scale": 0.01,
    "init_wte_npy": "wte.npy", "init_radius": 1.0, "gaussian_min_norm": 0.0,
    "gaussian_max_norm": math.inf, "linear_mean_init": 0.0, "linear_std_init": 0.02,
    # linear variants
    "linear_variant_attn": "linear", "linear_variant_mlp": "linear", "linear_variant_q": None,
    "linear_variant_k": None, "linear_variant_v": None, "linear_variant_attn_proj": None,
    "linear_variant_mlp_up": None, "linear_variant_mlp_down": None,
    # quantization
    "start_quant_level": 0, "quant_scheduler": None, "full_quant_iteration": None,
    "quantization_warmup_iters": 100, "store_activations": False,
    "quantize_wte": False, "quantize_wte_method": "affine_quant", "quantize_wte_bits": 8,
    "quantize_wpe": False, "quantize_wpe_method": "affine_quant", "quantize_wpe_bits": 8,
    "activations_quant_method": "affine_quant",
    "quantize_attn_act": False, "quantize_attn_act_bits": 8,
    **{f"quantize_attn_act_{p}{s}": d for p in _ACT_POINTS for s, d in (("", False), ("_bits", None))},
    "quantize_mlp_act": False, "quantize_mlp_act_bits": 8,
    **{f"quantize_mlp_act_{p}{s}": d for p in _MLP_POINTS for s, d in (("", False), ("_bits", None))},
    "quantize_linear_method": "affine_quant", "quantize_linear_bits": 8,
    **{f"quantize_linear_{n}_{s}": None for n in _LINEARS for s in ("method", "bits")},
}

# --- fields added after the snapshot (gpt_conf.py of later upstream), dataclass defaults ---------
NEWER_DEFAULTS: Dict[str, object] = {
    "numerical_multicontext": False, "numerical_mlp_hidden_dim": 64,
    "n_cproj_layerlist": [], "n_kv_group_layerlist": [], "attention_variant_layerlist": [],
    "l2_norm_mlp_up": False, "l2_norm_mlp_down": False, "l2_norm_mlp_up_dim": "embed",
    "l2_norm_mlp_down_dim": "hidden", "mlp_cproj_scale": 1.0, "mlp_post_act_l2_norm": False,
    "use_v_norm": False,
    "use_edgellm_asic": False, "use_flash_norm": False, "use_offchip_peri_ln": False,
    "use_gradual_activation": False, "activation_start": "gelu", "activation_end": "relu",
    "activation_transition_start_iter": 0, "activation_transition_end_iter": None,
    "softshrink_attn_lambda": 0.5, "softshrink_attn_divisor": 64.0, "softshrink_lambda": 0.5,
    **{f"use_{p}_ln_{b}": None for p in ("pre", "peri", "post") for b in ("attn", "mlp")},
    "attn_residual_combination": "add", "mlp_residual_combination": "add",
    "residual_slerp_eps": 0.0, "attn_residual_alpha": 0.05, "mlp_residual_alpha": 0.05,
    "attn_residual_alpha_type": "fixed", "mlp_residual_alpha_type": "fixed",
    **{f"norm_{w}_{a}": None for w in ("wte", "abs") for a in ("radius", "scale", "gain")},
    "norm_variant_wte": None, "norm_variant_abs": None, "hsnorm_scale": 1.0,
    "embedding_scale_init": None,
    "quantize_asic_prenorm": False, "quantize_asic_offchip_residual": False,
    "quantize_asic_bits": None, "quantize_asic_attn_softmax_denom": False,
    "quantize_asic_attn_softmax_denom_bits": None, "quantize_asic_attn_softmax_numerator": False,
    "quantize_asic_attn_softmax_numerator_bits": None,
}

# --- CLI (train_args.py) defaults, only where they differ from the dataclass ----------------------
CLI_DEFAULTS: Dict[str, object] = {
    "block_size": 256, "n_layer": 6, "n_head": 6, "n_kv_group": None, "n_embd": 384,
    "attention_list": None, "n_head_layerlist": None, "n_qk_head_dim_layerlist": None,
    "n_v_head_dim_layerlist": None, "mlp_size_layerlist": None,
    "n_latent": 4, "triadic_loops": 1, "mod_fn": "cooperation", "ssm_io_bias": False,
    "krmsnorm_quantize_type": "none", "krmsnorm_recompute_percentage": None, "hsnorm_radius": None,
    "pfla_num_points": 50, "pfla_left_bound": -10.0, "pfla_right_bound": 10.0,
    "consmax_initial_beta": 2.5, "consmax_v2_clamping": False, "strongermax_xmax_guess": None,
    "exppolymax_base": 4.0, "exppolymax_divisor": 1000.0, "softplus_divisor": 100.0,
    "squareplus_divisor": 100.0, "rope_length": None, "lpe_block_size": 256, "lpe_n_layer": 3,
    "lpe_n_head": 6, "lpe_n_kv_group": None, "quantize_wte": None, "quantize_wpe": None,
}

DATACLASS_DEFAULTS: Dict[str, object] = {**SNAPSHOT_DEFAULTS, **NEWER_DEFAULTS}

# Logging, schedule and unused flags: accepted in model_args and dropped.
INERT = frozenset({
    "eval_interval", "softmax_io_logging", "softmax_io_log_interval", "consmax_beta_gamma_logging",
    "plot_statistics", "recompute_backward_pass", "consmax_per_head",
})

# Dataclass values that mean "not set" for a field ModelConfig cannot leave unset: they become
# ModelConfig's (CLI) default. Upstream itself only reads them when the variant is selected.
DATACLASS_UNSET = {"n_latent": None, "triadic_loops": None, "mod_fn": "causal"}

# forge_dist options with no upstream field that only shape training: dropped on export.
FORGE_TRAINING_ONLY = frozenset({"moe_aux_loss_coef", "moe_z_loss_coef", "moe_noise_std"})


@dataclass(frozen=True)
class UnsupportedFeature:
    """An upstream feature forge_dist does not implement. It is on when any ``switches`` field is
    set away from both its defaults; ``companions`` only matter when it is on."""

    name: str
    switches: Tuple[str, ...]
    companions: Tuple[str, ...] = ()
    hint: str = ""


def _lpe_fields():
    return tuple(n for n in SNAPSHOT_DEFAULTS if n.startswith("lpe_")) + (
        "target_layer_in_lpe", "target_layer_out_lpe")


FEATURES: Tuple[UnsupportedFeature, ...] = (
    UnsupportedFeature("learned position embeddings (LPE)", ("n_lpe",), _lpe_fields()),
    UnsupportedFeature("multi-context / multi-dataset embeddings",
                       ("multicontext", "multidataset_wte", "numerical_multicontext"),
                       ("vocab_sizes", "numerical_mlp_hidden_dim"),
                       "train one token stream with a single wte/lm_head"),
    UnsupportedFeature("ln_f input mixer", ("use_ln_f_input_mixer",),
                       ("ln_f_input_mixer_variant", "ln_f_mixer_top_k")),
    UnsupportedFeature("learned-confidence residual scaling",
                       ("use_attn_resid_scaling", "use_mlp_resid_scaling"),
                       ("attn_confidence_variant", "mlp_confidence_variant",
                        "resid_gaussian_mean_init", "resid_gaussian_std_init")),
    UnsupportedFeature("residual constants", ("use_attn_resid_const", "use_mlp_resid_const"),
                       ("attn_resid_const", "learn_attn_resid_const", "mlp_resid_const",
                        "learn_mlp_resid_const")),
    UnsupportedFeature("residual combination (lerp/slerp, learned alpha)",
                       ("attn_residual_combination", "mlp_residual_combination",
                        "attn_residual_alpha_type", "mlp_residual_alpha_type"),
                       ("residual_slerp_eps", "attn_residual_alpha", "mlp_residual_alpha")),
    UnsupportedFeature("EdgeLLM ASIC block", ("use_edgellm_asic", "use_flash_norm",
                                              "use_offchip_peri_ln")),
    UnsupportedFeature("ASIC activation quantization",
                       ("quantize_asic_prenorm", "quantize_asic_offchip_residual",
                        "quantize_asic_attn_softmax_denom", "quantize_asic_attn_softmax_numerator"),
                       ("quantize_asic_bits", "quantize_asic_attn_softmax_denom_bits",
                        "quantize_asic_attn_softmax_numerator_bits")),
    UnsupportedFeature("gradual activation transition", ("use_gradual_activation",),
                       ("activation_start", "activation_end", "activation_transition_start_iter",
                        "activation_transition_end_iter")),
    UnsupportedFeature("L2-normalised MLP projections",
                       ("l2_norm_mlp_up", "l2_norm_mlp_down", "mlp_post_act_l2_norm"),
                       ("l2_norm_mlp_up_dim", "l2_norm_mlp_down_dim")),
    UnsupportedFeature("MLP c_proj scale", ("mlp_cproj_scale",)),
    UnsupportedFeature("value norm", ("use_v_norm",)),
    UnsupportedFeature("attention gate", ("gate",),
                       hint="upstream builds untrained gates inside forward, see docs/divergences.md"),
    UnsupportedFeature("flex attention", ("use_flex_attn",), hint="use window_size instead"),
    # switched on by softmax_variant_attn / activation_variant = "softshrink", which the variant
    # registries refuse by name; the parameters alone change nothing.
    UnsupportedFeature("softshrink", (), ("softshrink_attn_lambda", "softshrink_attn_divisor",
                                          "softshrink_lambda")),
    UnsupportedFeature("wte / scale-matrix .npy import and export",
                       ("import_wte_npy", "export_wte_npy", "import_scale_matrices_npz",
                        "export_scale_matrices_npz"),
                       ("import_wte_freeze", "export_wte_each_eval", "import_scale_matrices_freeze",
                        "export_scale_matrices_each_eval"),
                       "use init_variant=numpy_import with init_wte_npy to start from a .npy table"),
    UnsupportedFeature("post-embedding norms", ("norm_variant_wte", "norm_variant_abs"),
                       tuple(f"norm_{w}_{a}" for w in ("wte", "abs") for a in ("radius", "scale", "gain"))),
    UnsupportedFeature("hypersphere-norm scale", ("hsnorm_scale",)),
)

FEATURE_OF: Dict[str, UnsupportedFeature] = {
    name: f for f in FEATURES for name in f.switches + f.companions
}


def dataclass_default(name: str):
    """Upstream's dataclass default for ``name`` (a fresh copy for lists)."""
    return copy.deepcopy(DATACLASS_DEFAULTS[name])


def cli_default(name: str):
    return copy.deepcopy(CLI_DEFAULTS.get(name, DATACLASS_DEFAULTS[name]))


def is_inert_value(value) -> bool:
    """None / False / 0 / empty: what an unknown (newer upstream) key may hold and still be ignored."""
    if isinstance(value, (list, tuple, dict, str)):
        return len(value) == 0
    return value is None or value is False or (isinstance(value, (int, float)) and value == 0)


def at_a_default(name: str, value) -> bool:
    """True when ``value`` equals upstream's dataclass or CLI default for ``name`` (None == [])."""
    for default in (DATACLASS_DEFAULTS[name], CLI_DEFAULTS.get(name, DATACLASS_DEFAULTS[name])):
        if value == default or (is_inert_value(value) and is_inert_value(default)):
            return True
    return False


def classify(name: str, supported_fields) -> str:
    """"supported" | "inert" | "unsupported" | "unknown" for one upstream model_args key."""
    if name in supported_fields:
        return "supported"
    if name in INERT:
        return "inert"
    if name in FEATURE_OF:
        return "unsupported"
    return "unknown"
