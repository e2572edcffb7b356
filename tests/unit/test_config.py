"""ModelConfig loading: our YAML/JSON files, ReaLLM-Forge model_args, and the reverse."""
import dataclasses
import json
import math
import pathlib

import pytest

from forge_dist import ConfigError, ModelConfig
from forge_dist.config import upstream
from forge_dist.config.loading import (configs_equal, load_model_config, model_args_from_config,
                                       model_config_from_dict, model_config_from_model_args)

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)
TINY_ARGS = {**TINY, "n_kv_group": 4}  # a missing n_kv_group would be the dataclass 12, as upstream


# --- our YAML / JSON files ---------------------------------------------------------------------
def test_yaml_file_loads_with_inf_and_exponent_strings(tmp_path):
    path = tmp_path / "model.yaml"
    # YAML 1.1 reads 1e-1 as a string and has no plain "inf": both must still give floats
    path.write_text("n_layer: 2\nn_head: 4\nn_embd: 32\nblock_size: 16\ndropout: 1e-1\n"
                    "gaussian_max_norm: inf\nsoftmax_variant_attn: softmax\n")
    cfg = load_model_config(path)
    assert (cfg.n_layer, cfg.n_head, cfg.dropout) == (2, 4, 0.1)
    assert cfg.gaussian_max_norm == math.inf


def test_json_round_trip_of_to_dict(tmp_path):
    cfg = ModelConfig(**TINY, use_rotary_embeddings=True, rope_length=4, attention_list=["causal", "identity"])
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_model_config(path) == cfg


def test_unknown_key_names_it_and_suggests_close_names(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"n_layer": 2, "n_heads": 4}))
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    msg = str(e.value)
    assert "'n_heads'" in msg and "n_head" in msg and str(path) in msg


def test_upstream_only_keys_get_a_specific_message():
    with pytest.raises(ConfigError, match="eval_interval.*training option"):
        model_config_from_dict({"eval_interval": 250})
    with pytest.raises(ConfigError, match="n_lpe.*learned position embeddings"):
        model_config_from_dict({"n_lpe": 2})


def test_unknown_variant_name_lists_the_valid_values(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("softmax_variant_attn: softmaxx\n")
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    msg = str(e.value)
    assert "softmax_variant_attn" in msg and "'softmaxx'" in msg
    assert "polymax" in msg and "softmax" in msg  # the valid values are listed


def test_wrong_type_names_the_option():
    with pytest.raises(ConfigError, match="n_layer=.*wrong type.*int"):
        model_config_from_dict({"n_layer": "six"})


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(bad)
    other = tmp_path / "model.toml"
    other.write_text("")
    with pytest.raises(ConfigError, match="yaml.*json"):
        load_model_config(other)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_config(listing)


# --- construction-time compatibility rules ------------------------------------------------------
def test_n_head_not_divisible_by_n_kv_group_says_what_to_use():
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**TINY, "n_head": 6, "n_embd": 48}, n_kv_group=4)
    msg = str(e.value)
    assert "n_head=6" in msg and "n_kv_group=4" in msg and "1, 2, 3, 6" in msg


def test_odd_rope_length_fails_at_construction():
    with pytest.raises(ConfigError, match="rope_length=3 must be even"):
        ModelConfig(**TINY, use_rotary_embeddings=True, rope_length=3)


# --- the upstream field table ---------------------------------------------------------------------
def test_every_upstream_field_is_classified_exactly_once():
    ours = set(ModelConfig.field_names())
    assert len(upstream.SNAPSHOT_DEFAULTS) == 303  # reference 2.1
    for name in upstream.DATACLASS_DEFAULTS:
        kinds = [name in ours, name in upstream.INERT, name in upstream.FEATURE_OF]
        assert sum(kinds) == 1, name
    assert set(upstream.CLI_DEFAULTS) <= set(upstream.DATACLASS_DEFAULTS)
    assert set(upstream.FEATURE_OF) <= set(upstream.DATACLASS_DEFAULTS)


def test_core_options_doc_lists_every_unsupported_feature_and_switch():
    doc = (pathlib.Path(__file__).parents[2] / "docs" / "options" / "core.md").read_text()
    for feature in upstream.FEATURES:
        assert feature.name in doc, feature.name
        for switch in feature.switches:
            assert f"`{switch}`" in doc, switch


def test_model_config_defaults_are_upstream_cli_defaults():
    defaults = dataclasses.asdict(ModelConfig())
    for name in set(defaults) & set(upstream.DATACLASS_DEFAULTS):
        cli = upstream.cli_default(name)
        assert defaults[name] == cli or (defaults[name] == [] and cli is None), name


# --- model_args -> ModelConfig ----------------------------------------------------------------------
def test_model_args_with_every_field_at_its_dataclass_default_loads():
    cfg = model_config_from_model_args(dict(upstream.DATACLASS_DEFAULTS))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    assert cfg.consmax_initial_beta == 2.0 and cfg.krmsnorm_quantize_type == "int8"
    assert cfg.mod_fn == "cooperation" and cfg.n_latent == 4  # dataclass "unset" values


def test_model_args_with_every_field_at_its_cli_default_is_our_default_config():
    args = {name: upstream.cli_default(name) for name in upstream.DATACLASS_DEFAULTS}
    assert model_config_from_model_args(args) == ModelConfig()


def test_missing_model_args_keys_take_the_dataclass_default():
    cfg = model_config_from_model_args({"n_layer": 2, "n_head": 4, "n_embd": 32, "n_kv_group": 4})
    assert cfg.block_size == 1024 and cfg.rope_length == 8 and cfg.softplus_divisor == 256.0
    assert cfg.n_layer == 2


@pytest.mark.parametrize("field, value, feature", [
    ("n_lpe", 2, "learned position embeddings"),
    ("use_ln_f_input_mixer", True, "ln_f input mixer"),
    ("gate", True, "attention gate"),
    ("import_wte_npy", "wte.npy", "import and export"),
    ("use_attn_resid_scaling", True, "learned-confidence"),
    ("attn_residual_combination", "slerp", "residual combination"),
    ("norm_variant_wte", "rmsnorm", "post-embedding norms"),
    ("mlp_cproj_scale", 2.0, "c_proj scale"),
    ("multidataset_wte", True, "multi-dataset"),
    ("use_edgellm_asic", True, "EdgeLLM"),
])
def test_a_switched_on_unsupported_feature_is_refused_by_name(field, value, feature):
    with pytest.raises(ConfigError) as e:
        model_config_from_model_args({**TINY_ARGS, field: value})
    msg = str(e.value)
    assert field in msg and feature in msg and repr(upstream.dataclass_default(field)) in msg


def test_companions_of_a_switched_off_feature_are_ignored():
    args = {**TINY_ARGS, "n_lpe": 0, "lpe_n_layer": 7, "ln_f_input_mixer_variant": "router_top1",
            "softshrink_lambda": 0.9, "resid_gaussian_std_init": 0.5, "use_flex_attn": False}
    assert model_config_from_model_args(args).n_layer == 2


def test_unknown_newer_upstream_key_is_ignored_only_while_inert():
    assert model_config_from_model_args({**TINY_ARGS, "qkv_bias": None, "some_new_list": []}).n_head == 4
    with pytest.raises(ConfigError, match="qkv_bias=True"):
        model_config_from_model_args({**TINY_ARGS, "qkv_bias": True})


def test_cli_style_values_are_understood():
    args = {**TINY_ARGS, "attention_list": None, "n_head_layerlist": None, "final_logit_softcapping": True,
            "krmsnorm_num": 10.0}
    cfg = model_config_from_model_args(args)
    assert cfg.attention_list == [] and cfg.final_logit_softcapping == 1.0 and cfg.krmsnorm_num == 10


# --- ModelConfig -> model_args ----------------------------------------------------------------------
def test_model_args_from_config_holds_every_snapshot_field_and_fills_n_kv_group():
    cfg = ModelConfig(**TINY)
    args = model_args_from_config(cfg)
    assert set(upstream.SNAPSHOT_DEFAULTS) <= set(args) <= set(upstream.DATACLASS_DEFAULTS)
    assert args["n_kv_group"] == 4 and args["eval_interval"] == 250 and args["n_lpe"] == 0
    assert "use_pre_ln_attn" not in args  # newer-than-snapshot fields only when set


def test_newer_fields_are_exported_when_set():
    args = model_args_from_config(ModelConfig(**TINY, use_pre_ln_mlp=False, use_embedding_scale=True,
                                              embedding_scale_init=2.0))
    assert args["use_pre_ln_mlp"] is False and args["embedding_scale_init"] == 2.0


def test_forge_only_options_are_refused_or_dropped_on_export():
    with pytest.raises(ConfigError, match="rmsnorm_eps=1e-06.*no ReaLLM-Forge equivalent.*None"):
        model_args_from_config(ModelConfig(**TINY, rmsnorm_eps=1e-6))
    args = model_args_from_config(ModelConfig(**TINY, moe_aux_loss_coef=0.01))
    assert "moe_aux_loss_coef" not in args


@pytest.mark.parametrize("extra", [
    {}, {"n_kv_group": 2}, {"use_rotary_embeddings": True, "rope_length": 4, "use_abs_pos_embeddings": False},
    {"use_peri_ln": True, "use_post_ln": True}, {"use_parallel_mlp": True, "bias": True},
    {"attention_list": ["causal", "identity"], "gaussian_max_norm": 3.0}, {"n_embd_wte": 16},
])
def test_model_args_round_trip(extra):
    cfg = ModelConfig(**TINY, **extra)
    back = model_config_from_model_args(model_args_from_config(cfg))
    assert configs_equal(cfg, back)


def test_mla_dims_follow_what_upstream_builds():
    # upstream's MLA ignores mla_latent_dim / mla_rotary_dim: latent 4 d_h, rotary d_h / 2 (d_h = 8 here)
    from forge_dist.config.loading import model_args_from_config, model_config_from_model_args

    args = model_args_from_config(ModelConfig(n_layer=2, n_head=4, n_embd=32, attention_variant="mla",
                                               mla_latent_dim=32, mla_rotary_dim=4))
    args.update(mla_latent_dim=None, mla_rotary_dim=32)  # upstream's dataclass default: ignored there
    cfg = model_config_from_model_args(args)
    assert (cfg.mla_latent_dim, cfg.mla_rotary_dim) == (32, 4)
    with pytest.raises(ConfigError, match="mla_rotary_dim=4"):
        model_args_from_config(ModelConfig(n_layer=2, n_head=4, n_embd=32, attention_variant="mla",
                                           mla_rotary_dim=2))
