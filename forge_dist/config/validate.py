"""Validation of ModelConfig: types, choices, and small named compatibility rules.

Each rule is a function that raises ConfigError with a message saying what to change; RULES lists
them in order. Variant names are checked against the variant registries (forge_dist.variants, the
single source of the valid values), so adding a variant never touches this file.
"""
from __future__ import annotations

import functools
import math
import typing
from typing import Callable, List

from forge_dist import variants as registries
from forge_dist.errors import ConfigError

# Enumerations that are not variant registries.
CHOICES = {
    "rope_variant": ("rope", "soap"),
    "krmsnorm_quantize_type": ("none", "int8", "int16"),
    "krmsnorm_selection_type": ("first", "last", "random"),
    "pfla_softmax_density": ("linear", "quad", "exp"),
    "pfla_softmax_mode": ("linear", "quadratic"),
    "quant_scheduler": (None, "static", "linear"),
}

# option -> (registry attribute in forge_dist.variants); list-valued options check each item.
REGISTRY_OPTIONS = {
    "attention_variant": "ATTENTION",
    "attention_list": "ATTENTION",
    "attention_variant_layerlist": "ATTENTION",
    "softmax_variant_attn": "SOFTMAX",
    "softmax_variant_output": "SOFTMAX",
    "norm_variant_attn": "NORM",
    "norm_variant_output": "NORM",
    "activation_variant": "ACTIVATION",
    "dact_activation": "ACTIVATION",
    "kan_base_activation": "ACTIVATION",
    "pfla_softmax_init_activation": "ACTIVATION",
    "mlp_variant": "MLP",
    "init_variant": "EMBED_INIT",
    "mod_fn": "MOD_FN",
    "linear_variant_attn": "LINEAR",
    "linear_variant_mlp": "LINEAR",
    "linear_variant_q": "LINEAR",
    "linear_variant_k": "LINEAR",
    "linear_variant_v": "LINEAR",
    "linear_variant_attn_proj": "LINEAR",
    "linear_variant_mlp_up": "LINEAR",
    "linear_variant_mlp_down": "LINEAR",
    "moe_router_scheme": "ROUTER",
    "lsv_variant": "LSV",
    "quantize_wte_method": "QUANTIZER",
    "quantize_wpe_method": "QUANTIZER",
    "activations_quant_method": "QUANTIZER",
    "quantize_linear_method": "QUANTIZER",
    "quantize_linear_attn_q_method": "QUANTIZER",
    "quantize_linear_attn_k_method": "QUANTIZER",
    "quantize_linear_attn_v_method": "QUANTIZER",
    "quantize_linear_attn_proj_method": "QUANTIZER",
    "quantize_linear_mlp_up_method": "QUANTIZER",
    "quantize_linear_mlp_down_method": "QUANTIZER",
}


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict:
    """The resolved field types of a config dataclass (ModelConfig)."""
    return typing.get_type_hints(cls)


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, List):
        (item,) = typing.get_args(tp) or (object,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_types(cfg) -> None:
    for name, tp in field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if not _type_ok(value, tp):
            raise ConfigError(f"{name}={value!r} has the wrong type; expected {type_name(tp)}")


def check_choices(cfg) -> None:
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            shown = ", ".join("None" if c is None else c for c in choices)
            raise ConfigError(f"{name}={value!r} is not valid; valid values: {shown}")
    for name, reg_name in REGISTRY_OPTIONS.items():
        value = getattr(cfg, name)
        registry = getattr(registries, reg_name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                registry.check(item, option=name)


# --- compatibility rules ---------------------------------------------------------------------
def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{n}={v} must be positive")


def rule_sizes(cfg):
    _positive(cfg, "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_group",
              "mlp_expansion_factor", "mlp_size", "n_embd_wte", "mlp_down_projs", "window_size",
              "n_qk_head_dim", "n_v_head_dim", "n_cproj", "mla_latent_dim", "n_latent",
              "triadic_loops", "n_experts", "moe_top_k", "moe_layer_freq", "sym_rot_num_angles")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")


def rule_heads(cfg):
    infinite = cfg.attention_variant == "infinite" and cfg.n_qk_head_dim is not None
    if not infinite and cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}; choose n_head among the "
            f"divisors of n_embd ({', '.join(str(d) for d in _divisors(cfg.n_embd) if d <= 64)}...)"
        )
    if cfg.n_head % cfg.kv_groups:
        raise ConfigError(
            f"n_head={cfg.n_head} is not divisible by n_kv_group={cfg.n_kv_group}; use one of "
            f"{', '.join(str(d) for d in _divisors(cfg.n_head))}"
        )


def rule_positions(cfg):
    if cfg.use_rotary_embeddings and cfg.rope_length is not None and cfg.attention_variant != "mla":
        head_dim = cfg.n_qk_head_dim or cfg.head_dim
        if cfg.rope_length % 2:
            raise ConfigError(f"rope_length={cfg.rope_length} must be even (RoPE rotates pairs)")
        if cfg.rope_length > head_dim:
            raise ConfigError(f"rope_length={cfg.rope_length} exceeds the head dim {head_dim}")
    if cfg.shared_fire_embeddings and not cfg.use_fire_embeddings:
        raise ConfigError("shared_fire_embeddings=True needs use_fire_embeddings=True")


def rule_softcap(cfg):
    for n in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = getattr(cfg, n)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{n}={v} must be a positive finite cap (or None to disable)")


def rule_moe(cfg):
    if cfg.use_moe and cfg.moe_top_k > cfg.n_experts:
        raise ConfigError(f"moe_top_k={cfg.moe_top_k} exceeds n_experts={cfg.n_experts}")
    if cfg.moe_capacity_factor is not None and cfg.moe_capacity_factor <= 0:
        raise ConfigError(f"moe_capacity_factor={cfg.moe_capacity_factor} must be positive or None")


def rule_sharing(cfg):
    _positive(cfg, "shared_mlp_size", "shared_mlp_seq", "shared_attn_size", "shared_attn_seq")


def rule_layers(cfg):
    """Every layer's effective config must be valid on its own."""
    lists = [n for n in cfg.field_names() if n.endswith("_layerlist") or n == "attention_list"]
    if any(getattr(cfg, n) for n in lists):
        for i in range(cfg.n_layer):
            try:
                cfg.for_layer(i)
            except ConfigError as e:
                raise ConfigError(f"layer {i} (after the *_layerlist overrides): {e}") from None


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


RULES: List[Callable] = [rule_sizes, rule_heads, rule_positions, rule_softcap, rule_moe,
                         rule_sharing, rule_layers]


def register_rule(rule: Callable) -> Callable:
    """Variant modules add their own compatibility rule here instead of editing this file."""
    RULES.append(rule)
    return rule


def validate_model_config(cfg) -> None:
    check_types(cfg)
    check_choices(cfg)
    for rule in RULES:
        rule(cfg)
