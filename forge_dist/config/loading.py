"""ModelConfig from files and dicts, and to/from ReaLLM-Forge's ``model_args``.

- ``load_model_config(path)`` / ``model_config_from_dict(d)``: our own YAML/JSON configs. Strict:
  an unknown key is an error that names it and suggests the closest valid names.
- ``model_config_from_model_args(d)``: a ReaLLM-Forge checkpoint's ``model_args``. Lenient the way
  ``GPTConfig(**model_args)`` is: missing keys take upstream's *dataclass* defaults, inert keys are
  dropped, and an unsupported feature is refused only when it is switched on (``upstream.py``).
- ``model_args_from_config(cfg)``: the reverse, a dict upstream's ``GPTConfig(**model_args)`` of
  the reference snapshot accepts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from typing import Mapping

from forge_dist.config import upstream
from forge_dist.config.model_config import ModelConfig
from forge_dist.config.validate import field_types
from forge_dist.errors import ConfigError


# --- our YAML / JSON configs ------------------------------------------------------------------
def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from a .yaml/.yml or .json file holding a flat mapping of options."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(f)
            elif path.endswith(".json"):
                data = json.load(f)
            else:
                raise ConfigError(f"{path}: unknown config format; use a .yaml, .yml or .json file")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    return model_config_from_dict(data or {}, source=path)


def model_config_from_dict(data: Mapping, source: str = "config") -> ModelConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of option: value, got {type(data).__name__}")
    names = set(ModelConfig.field_names())
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: {_unknown_key_message(str(key), names)}")
    return ModelConfig(**{k: coerce_value(k, v) for k, v in data.items()})


def _unknown_key_message(key: str, names) -> str:
    msg = f"unknown model option {key!r}"
    if key in upstream.INERT:
        return msg + " (a ReaLLM-Forge logging/training option, not a model option; remove it)"
    if key in upstream.FEATURE_OF:
        return msg + f" (part of ReaLLM-Forge's {upstream.FEATURE_OF[key].name}, which forge_dist does not support)"
    close = difflib.get_close_matches(key, sorted(names), n=3, cutoff=0.6)
    return msg + (f"; did you mean {', '.join(close)}?" if close else "; see docs/options/ for the valid options")


def _is_float_field(name: str) -> bool:
    tp = field_types(ModelConfig).get(name)
    return tp is float or float in typing.get_args(tp)


def _is_int_field(name: str) -> bool:
    tp = field_types(ModelConfig).get(name)
    return tp is int or (int in typing.get_args(tp) and float not in typing.get_args(tp))


def coerce_value(name: str, value):
    """The few conversions text formats need: "inf"/"1e-5" strings for floats (JSON has no inf;
    YAML 1.1 reads 1e-5 as a string). Everything else is checked by the validator as given."""
    if isinstance(value, str) and _is_float_field(name):
        try:
            return float(value)
        except ValueError:
            return value  # the validator reports the type error with the option's name
    return value


# --- ReaLLM-Forge model_args ------------------------------------------------------------------
def model_config_from_model_args(model_args: Mapping) -> ModelConfig:
    """ModelConfig for a ReaLLM-Forge ``model_args`` dict (``ckpt.pt['model_args']``)."""
    if not isinstance(model_args, Mapping):
        raise ConfigError(f"model_args must be a dict, got {type(model_args).__name__}")
    ours = set(ModelConfig.field_names())
    for key, value in model_args.items():
        kind = upstream.classify(key, ours)
        if kind == "unknown" and not upstream.is_inert_value(value):
            raise ConfigError(
                f"model_args: {key}={value!r} is not a ReaLLM-Forge option forge_dist knows (newer "
                f"upstream?); it can only be ignored while it is None, False, 0 or empty")
    _refuse_switched_on_features(model_args)

    kwargs = {}
    for name in ours:
        if name in model_args:
            value = model_args[name]
        elif name in upstream.DATACLASS_DEFAULTS:
            value = upstream.dataclass_default(name)  # what GPTConfig(**model_args) would hold
        else:
            continue  # forge_dist-only option: ours
        kwargs[name] = _from_upstream_value(name, value)
    return ModelConfig(**_upstream_mla_dims(kwargs))


def _uses_mla(options: Mapping) -> bool:
    lists = list(options.get("attention_list") or []) + list(options.get("attention_variant_layerlist") or [])
    return options.get("attention_variant") == "mla" or "mla" in lists


def _upstream_mla_dims(options: dict) -> dict:
    """Upstream's MLA reads neither mla_latent_dim nor mla_rotary_dim: it always builds a latent of
    4 d_h and rotary width d_h / 2 (reference 2.5). An imported MLA model gets exactly those."""
    if not _uses_mla(options):
        return options
    if options.get("n_head_layerlist"):
        raise ConfigError("model_args: MLA with n_head_layerlist cannot be imported: upstream's MLA sizes "
                          "depend on each layer's head dim, which forge_dist's single mla_rotary_dim cannot follow")
    d_head = options["n_embd"] // options["n_head"]
    return {**options, "mla_latent_dim": 4 * d_head, "mla_rotary_dim": d_head // 2}


def _refuse_switched_on_features(model_args: Mapping) -> None:
    for feature in upstream.FEATURES:
        for name in feature.switches:
            if name in model_args and not upstream.at_a_default(name, model_args[name]):
                default = upstream.dataclass_default(name)
                hint = f"; {feature.hint}" if feature.hint else ""
                raise ConfigError(
                    f"model_args: {name}={model_args[name]!r} switches on ReaLLM-Forge's "
                    f"{feature.name}, which forge_dist does not support; the model can only be "
                    f"loaded with {name}={default!r}{hint}")


def _from_upstream_value(name: str, value):
    if name in upstream.DATACLASS_UNSET and value == upstream.DATACLASS_UNSET[name]:
        return upstream.cli_default(name)
    if value is None and isinstance(upstream.DATACLASS_DEFAULTS.get(name), list):
        return []  # the CLI's "no list" is None
    if name in ("attn_logit_softcapping", "final_logit_softcapping") and isinstance(value, bool):
        # upstream's CLI flags are BooleanOptionalAction: True is used as the cap c = 1.0
        return 1.0 if value else None
    if isinstance(value, float) and value.is_integer() and _is_int_field(name):
        return int(value)  # e.g. krmsnorm_num is annotated float upstream
    return coerce_value(name, value)


def model_args_from_config(cfg: ModelConfig) -> dict:
    """A ``model_args`` dict for upstream's ``GPTConfig(**model_args)``.

    Every snapshot field is present: ours where supported, the dataclass default otherwise;
    ``n_kv_group`` is filled in. Options added to upstream after the snapshot are included only
    when set away from their default (they then need that newer upstream). A forge_dist-only option
    away from its default is refused unless it only shapes training.
    """
    ours = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(ModelConfig())
    out = {}
    for name in upstream.SNAPSHOT_DEFAULTS:
        out[name] = ours[name] if name in ours else upstream.dataclass_default(name)
    for name, default in upstream.NEWER_DEFAULTS.items():
        if name in ours and ours[name] != default:  # exact: use_pre_ln_mlp=False is not None
            out[name] = ours[name]
    for name, value in ours.items():
        if name in upstream.DATACLASS_DEFAULTS or name in upstream.FORGE_TRAINING_ONLY:
            continue
        if value != defaults[name]:
            raise ConfigError(
                f"{name}={value!r} is a forge_dist option with no ReaLLM-Forge equivalent; set it to "
                f"{defaults[name]!r} to export the model in ReaLLM-Forge's format")
    if _uses_mla(ours):
        expected = _upstream_mla_dims({**ours, "n_head_layerlist": []})
        if (cfg.mla_latent_dim or 4 * cfg.head_dim, cfg.mla_rotary_dim) != (expected["mla_latent_dim"],
                                                                             expected["mla_rotary_dim"]):
            raise ConfigError(
                f"ReaLLM-Forge's MLA ignores mla_latent_dim and mla_rotary_dim and always builds "
                f"{expected['mla_latent_dim']} and {expected['mla_rotary_dim']} here; set "
                f"mla_latent_dim={expected['mla_latent_dim']} (or None) and "
                f"mla_rotary_dim={expected['mla_rotary_dim']} to export this model")
    out["n_kv_group"] = cfg.kv_groups
    return out


def configs_equal(a: ModelConfig, b: ModelConfig) -> bool:
    """Same model: equal options once n_kv_group=None is spelled as n_head."""
    return a.replace(n_kv_group=a.kv_groups).to_dict() == b.replace(n_kv_group=b.kv_groups).to_dict()
