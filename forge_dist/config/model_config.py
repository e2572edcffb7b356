"""ModelConfig: every model option of ReaLLM-Forge we support, under upstream's GPTConfig names.

Defaults are ReaLLM-Forge's *command-line* defaults (what its users actually run: train.py builds
GPTConfig from the argparse namespace), not its dataclass defaults; see ``upstream.py`` for those.
Options that exist upstream but that we do not implement are not fields here: ``from_model_args``
accepts them when they are inert and refuses them by name otherwise.

Construction validates everything (``validate.py``): a wrong value fails here, with a message that
names the option and says what to change, long before a process group or a GPU is touched.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from forge_dist.config.layerwise import config_for_layer, normalize_layerlists
from forge_dist.config.validate import validate_model_config


def _list():
    return field(default_factory=list)


@dataclass
class ModelConfig:
    # --- core sizes -------------------------------------------------------------------------
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 6
    n_kv_group: Optional[int] = None  # None -> n_head (plain multi-head attention)
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    mlp_down_projs: int = 1

    # --- per-layer overrides (layer i uses list[i % len]; "none" -> None) ---------------------
    attention_list: List[str] = _list()
    n_head_layerlist: List[Optional[int]] = _list()
    n_qk_head_dim_layerlist: List[Optional[int]] = _list()
    n_v_head_dim_layerlist: List[Optional[int]] = _list()
    mlp_size_layerlist: List[Optional[int]] = _list()
    n_cproj_layerlist: List[Optional[int]] = _list()
    n_kv_group_layerlist: List[Optional[int]] = _list()
    attention_variant_layerlist: List[str] = _list()

    # --- token embeddings ---------------------------------------------------------------------
    n_embd_wte: Optional[int] = None
    n_embd_wte_scale_tying: bool = True
    wte_weight_tying: bool = True
    use_embedding_scale: bool = False
    embedding_scale_init: Optional[float] = None  # None -> sqrt(n_embd)
    init_variant: str = "gaussian"
    init_scale: float = 0.01
    init_wte_npy: str = "wte.npy"
    init_radius: float = 1.0
    gaussian_min_norm: float = 0.0
    gaussian_max_norm: float = math.inf
    embedding_mean_init: float = 0.0
    embedding_std_init: float = 0.02
    linear_mean_init: float = 0.0
    linear_std_init: float = 0.02

    # --- positions ------------------------------------------------------------------------------
    use_abs_pos_embeddings: bool = True
    use_rotary_embeddings: bool = False
    rope_variant: str = "rope"
    rope_length: Optional[int] = None  # None -> the full head dim
    sym_rot_num_angles: int = 512
    use_fire_embeddings: bool = False
    shared_fire_embeddings: bool = False
    fire_log_bias: float = 1.0
    fire_num_hidden_layers: int = 1
    fire_mlp_width: int = 32
    fire_init_c: float = 0.1
    fire_init_L: float = 512.0
    fire_outermost_sigma: bool = False

    # --- attention ------------------------------------------------------------------------------
    attention_variant: str = "causal"
    disable_flash_attention: bool = False
    window_size: Optional[int] = None
    use_qk_norm: bool = False
    use_qk_norm_scale: bool = False
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    use_flash_lobo: bool = False
    use_flash_lobo_per_head: bool = False
    use_flash_obo_const: bool = False
    flash_lobo_log_const: float = 0.0
    # infinite-head attention
    n_qk_head_dim: Optional[int] = None
    n_v_head_dim: Optional[int] = None
    n_cproj: Optional[int] = None
    use_concat_heads: bool = False
    # multi-head latent attention
    mla_latent_dim: Optional[int] = None
    mla_rotary_dim: int = 32
    use_mla_lobo: bool = False
    mla_lobo_init: float = 0.0
    # co4 (triadic modulation)
    n_latent: int = 4
    triadic_loops: int = 1
    mod_fn: str = "cooperation"
    # ssm (selective state space mixer)
    ssm_mamba_expand: int = 2
    ssm_conv_kernel_size: int = 3
    ssm_dt_rank: int = 8
    ssm_d_state: int = 16
    ssm_io_bias: bool = False

    # --- block structure ------------------------------------------------------------------------
    use_pre_ln: bool = True
    use_post_ln: bool = False
    use_peri_ln: bool = False
    use_pre_ln_attn: Optional[bool] = None  # None -> use_pre_ln (per-branch overrides)
    use_pre_ln_mlp: Optional[bool] = None
    use_peri_ln_attn: Optional[bool] = None
    use_peri_ln_mlp: Optional[bool] = None
    use_post_ln_attn: Optional[bool] = None
    use_post_ln_mlp: Optional[bool] = None
    use_parallel_mlp: bool = False
    use_gradient_checkpointing: bool = False

    # --- norms ----------------------------------------------------------------------------------
    norm_variant_attn: str = "rmsnorm"
    norm_variant_output: str = "rmsnorm"
    rmsnorm_eps: Optional[float] = None  # forge_dist extra; None = upstream's eps-free RMSNorm
    prmsnorm_pct: float = 0.0625
    krmsnorm_num: int = 10
    krmsnorm_quantize_type: str = "none"
    krmsnorm_enable_gain: bool = True
    krmsnorm_selection_type: str = "last"
    krmsnorm_recompute_percentage: Optional[float] = None
    hsnorm_gain: bool = False
    hsnorm_radius: Optional[float] = None  # None -> sqrt(n_embd)
    hsnorm_radius_learning: bool = False
    dact_alpha_init: float = 1.0
    dact_activation: str = "tanh"
    dact_use_gamma: bool = True
    dact_use_beta: bool = True
    dact_use_alpha: bool = True

    # --- MLP ------------------------------------------------------------------------------------
    mlp_variant: str = "mlp"
    mlp_expansion_factor: int = 4
    mlp_size: Optional[int] = None
    mlp_up_bias: Optional[bool] = None  # None -> bias
    mlp_down_bias: Optional[bool] = None
    mlp_x_offset: float = 0.0
    mlp_y_offset: float = 0.0
    learn_mlp_x_offset: bool = False
    learn_mlp_y_offset: bool = False
    kan_poly_order: int = 3
    kan_base_activation: str = "silu"
    kan_middle_layers: List[int] = _list()

    # --- activations ----------------------------------------------------------------------------
    activation_variant: str = "gelu"
    shifted_gelu_learnable_shift: bool = True
    shifted_gelu_initial_shift: float = 0.0
    pla_num_points: int = 7
    pla_left_bound: float = -2.0
    pla_right_bound: float = 2.0
    pfla_num_points: int = 50
    pfla_left_bound: float = -10.0
    pfla_right_bound: float = 10.0
    lsa_num_knots: int = 30

    # --- softmax variants -----------------------------------------------------------------------
    softmax_variant_attn: str = "softmax"
    softmax_variant_output: str = "softmax"
    div_by_seq_len: bool = False
    consmax_initial_beta: float = 2.5
    consmax_initial_gamma: float = 100.0
    consmax_base: float = 2.0
    consmax_use_euler_base: bool = True
    consmax_v2_clamping: bool = False
    consmax_v2_clamp_value: float = 80.0
    consmax_saturation: float = 11.0
    consmax_learnable_beta: bool = True
    consmax_learnable_gamma: bool = True
    softermax_use_xmax: bool = True
    polymax_x_intercept: float = -100.0
    polymax_y_intercept: float = 1.0
    polymax_power: float = 2.0
    polymax_divisor: float = 1000.0
    sigsoftmax_use_euler_base: bool = True
    sigsoftmax_base: float = 2.0
    strongermax_strength: float = math.e
    strongermax_div_by_sum_of_terms: bool = True
    strongermax_divisor: float = 1.0
    strongermax_use_xmax: bool = True
    strongermax_xmax_guess: Optional[float] = None
    strongermax_overflow_recompute: bool = False
    strongermax_overflow_recompute_value: float = 88.0
    strongermax_clamping: bool = False
    strongermax_clamp_value: float = 88.0
    strongermax_obo: float = 0.0
    strongermax_use_learned_obo: bool = False
    strongermax_use_learned_obo_per_head: bool = False
    strongermax_temperature_factor: float = 1.0
    strongermax_use_learned_temperature_factor: bool = False
    exppolymax_use_euler_base: bool = True
    exppolymax_base: float = 4.0
    exppolymax_y_intercept: float = 1.0
    exppolymax_power: float = 2.0
    exppolymax_divisor: float = 1000.0
    softplus_divisor: float = 100.0
    relumax_divisor: float = 256.0
    relu2max_divisor: float = 256.0
    sigmoidmax_divisor: float = 256.0
    squareplus_divisor: float = 100.0
    pfla_softmax_num_points: int = 30
    pfla_softmax_left_bound: float = -10.0
    pfla_softmax_right_bound: float = 10.0
    pfla_softmax_learn_x: bool = False
    pfla_softmax_learn_y: bool = True
    pfla_softmax_init_activation: str = "gelu"
    pfla_softmax_density: str = "linear"
    pfla_softmax_use_learned_divisor: bool = False
    pfla_softmax_gamma_init: float = 1.0
    pfla_softmax_use_obo: bool = False
    pfla_softmax_use_learned_obo: bool = False
    pfla_softmax_obo: float = 0.0
    pfla_softmax_mode: str = "linear"

    # --- linear variants ------------------------------------------------------------------------
    linear_variant_attn: str = "linear"
    linear_variant_mlp: str = "linear"
    linear_variant_q: Optional[str] = None  # None -> linear_variant_attn
    linear_variant_k: Optional[str] = None
    linear_variant_v: Optional[str] = None
    linear_variant_attn_proj: Optional[str] = None
    linear_variant_mlp_up: Optional[str] = None  # None -> linear_variant_mlp
    linear_variant_mlp_down: Optional[str] = None

    # --- quantization (quantization-aware training) ---------------------------------------------
    start_quant_level: float = 0.0
    quant_scheduler: Optional[str] = None
    full_quant_iteration: Optional[int] = None
    quantization_warmup_iters: int = 100
    store_activations: bool = False
    quantize_wte: Optional[bool] = None
    quantize_wte_method: str = "affine_quant"
    quantize_wte_bits: int = 8
    quantize_wpe: Optional[bool] = None
    quantize_wpe_method: str = "affine_quant"
    quantize_wpe_bits: int = 8
    activations_quant_method: str = "affine_quant"
    quantize_attn_act: bool = False
    quantize_attn_act_bits: int = 8
    quantize_attn_act_input: bool = False
    quantize_attn_act_input_bits: Optional[int] = None
    quantize_attn_act_qk_mult_q_input: bool = False
    quantize_attn_act_qk_mult_q_input_bits: Optional[int] = None
    quantize_attn_act_qk_mult_k_input: bool = False
    quantize_attn_act_qk_mult_k_input_bits: Optional[int] = None
    quantize_attn_act_softmax_input: bool = False
    quantize_attn_act_softmax_input_bits: Optional[int] = None
    quantize_attn_act_pv_mult_p_input: bool = False
    quantize_attn_act_pv_mult_p_input_bits: Optional[int] = None
    quantize_attn_act_pv_mult_v_input: bool = False
    quantize_attn_act_pv_mult_v_input_bits: Optional[int] = None
    quantize_attn_act_pv_mult_output: bool = False
    quantize_attn_act_pv_mult_output_bits: Optional[int] = None
    quantize_attn_act_output: bool = False
    quantize_attn_act_output_bits: Optional[int] = None
    quantize_mlp_act: bool = False
    quantize_mlp_act_bits: int = 8
    quantize_mlp_act_input: bool = False
    quantize_mlp_act_input_bits: Optional[int] = None
    quantize_mlp_act_activation_input: bool = False
    quantize_mlp_act_activation_input_bits: Optional[int] = None
    quantize_mlp_act_activation_output: bool = False
    quantize_mlp_act_activation_output_bits: Optional[int] = None
    quantize_mlp_act_output: bool = False
    quantize_mlp_act_output_bits: Optional[int] = None
    quantize_linear_method: str = "affine_quant"
    quantize_linear_bits: int = 8
    quantize_linear_attn_q_method: Optional[str] = None
    quantize_linear_attn_q_bits: Optional[int] = None
    quantize_linear_attn_k_method: Optional[str] = None
    quantize_linear_attn_k_bits: Optional[int] = None
    quantize_linear_attn_v_method: Optional[str] = None
    quantize_linear_attn_v_bits: Optional[int] = None
    quantize_linear_attn_proj_method: Optional[str] = None
    quantize_linear_attn_proj_bits: Optional[int] = None
    quantize_linear_mlp_up_method: Optional[str] = None
    quantize_linear_mlp_up_bits: Optional[int] = None
    quantize_linear_mlp_down_method: Optional[str] = None
    quantize_linear_mlp_down_bits: Optional[int] = None

    # --- mixture of experts ---------------------------------------------------------------------
    use_moe: bool = False
    moe_layer_freq: int = 2
    n_experts: int = 8
    moe_top_k: int = 2
    moe_router_scheme: str = "softmax"
    # forge_dist extras (upstream has none of these)
    moe_aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss weight
    moe_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight
    moe_capacity_factor: Optional[float] = None  # None -> dropless
    moe_noise_std: float = 1.0  # noisy_top_k: std multiplier of the learned noise

    # --- steering vectors -----------------------------------------------------------------------
    apply_vector_at_layer_idx: Optional[int] = None
    apply_vector_file: Optional[str] = None
    apply_vector_scaling_factor: float = 1.0
    obtain_vector_at_layer_idx: Optional[int] = None
    obtain_vector_file: Optional[str] = None
    use_lsv: bool = False
    lsv_index: Optional[int] = None
    lsv_dataset_num: Optional[int] = None
    lsv_variant: str = "one_hot"
    apply_lsv_at_layer_idx: Optional[int] = None

    # --- cross-layer sharing --------------------------------------------------------------------
    shared_mlp_size: int = 1
    shared_mlp_sym: bool = False
    shared_mlp_seq: int = 1
    shared_attn_size: int = 1
    shared_attn_sym: bool = False
    shared_attn_seq: int = 1

    def __post_init__(self):
        normalize_layerlists(self)
        validate_model_config(self)

    # --- derived values (read these, never recompute them elsewhere) ----------------------------
    @property
    def kv_groups(self) -> int:
        return self.n_head if self.n_kv_group is None else self.n_kv_group

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_size if self.mlp_size is not None else self.mlp_expansion_factor * self.n_embd

    @property
    def mlp_up_bias_resolved(self) -> bool:
        return self.bias if self.mlp_up_bias is None else self.mlp_up_bias

    @property
    def mlp_down_bias_resolved(self) -> bool:
        return self.bias if self.mlp_down_bias is None else self.mlp_down_bias

    @property
    def wte_dim(self) -> int:
        """Width of the token table and the LM head (n_embd unless factorised)."""
        return self.n_embd_wte if self.n_embd_wte is not None else self.n_embd

    def for_layer(self, layer_idx: int) -> "ModelConfig":
        """The config as layer ``layer_idx`` sees it, after ``*_layerlist`` and ``attention_list``.

        Returns ``self`` when no per-layer override applies, so a uniform model shares one object.
        """
        return config_for_layer(self, layer_idx)

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for k, v in out.items():  # JSON has no inf
            if isinstance(v, float) and math.isinf(v):
                out[k] = "inf" if v > 0 else "-inf"
        return out

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
