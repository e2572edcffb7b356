"""Per-layer configs: ``attention_list`` and ``X_layerlist`` override field ``X`` for layer i.

Layer i takes ``list[i % len(list)]`` (upstream cycles the same way). The string "none" means
None, as upstream's string-typed sweeps write it. The per-layer config has its lists cleared, so
it describes exactly one layer.
"""
from __future__ import annotations

import dataclasses

LIST_SUFFIX = "_layerlist"


def _parse_item(value):
    """Upstream sweeps write list items as strings: "none" -> None, "12" -> 12."""
    if isinstance(value, str):
        if value.strip().lower() == "none":
            return None
        try:
            return int(value)
        except ValueError:
            return value
    return value


def normalize_layerlists(cfg) -> None:
    """Parse string items of the integer ``*_layerlist`` options in place (before validation)."""
    for name in cfg.field_names():
        values = getattr(cfg, name)
        if name.endswith(LIST_SUFFIX) and "attention" not in name and isinstance(values, list):
            setattr(cfg, name, [_parse_item(v) for v in values])


def layer_overrides(cfg, layer_idx: int) -> dict:
    changes = {}
    for name in cfg.field_names():
        values = getattr(cfg, name)
        if not values:
            continue
        if name == "attention_list":
            target = "attention_variant"
        elif name.endswith(LIST_SUFFIX):
            target = name[: -len(LIST_SUFFIX)]
        else:
            continue
        value = values[layer_idx % len(values)]
        changes[target] = None if isinstance(value, str) and value.lower() == "none" else value
    return changes


def config_for_layer(cfg, layer_idx: int):
    changes = layer_overrides(cfg, layer_idx)
    if not changes:
        return cfg
    cleared = {n: [] for n in cfg.field_names() if n.endswith(LIST_SUFFIX) or n == "attention_list"}
    return dataclasses.replace(cfg, **cleared, **changes)
