"""Activation fake-quantization points of the attention and MLP variants (quantize_attn_act_*,
quantize_mlp_act_*).

Every attention and MLP variant derives from ``ActQuantModule``, which owns the module's
``act_quant`` (an ``ActQuantPoints``: one ``ActQuant`` per enabled point, a submodule with a stable
name, so tensor parallelism finds it to set ``reduce_stats``) and applies the ``input`` and
``output`` points around the variant's ``transform``. The inner points are applied where their
tensor exists: the dot-product points inside ``attention.core.attend``, the MLP activation points
in ``mlp.OffsetActivationMixin.activate`` and around KAN's activations.

A variant lists the points it has in ``act_points``. The group switch (quantize_attn_act /
quantize_mlp_act) enables exactly those; a per-point flag naming a tensor the variant does not
compute (softmax_input of linear attention, activation_input of the identity MLP) is refused by
``rule_act_points`` rather than silently ignored.
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.quantize import ACT_POINTS, ActQuantPoints
from forge_dist.variants import ATTENTION, MLP

IO_POINTS = ("input", "output")


class ActQuantModule(nn.Module):
    """Base of every attention and MLP variant: forward = output point . transform . input point.

    Subclasses set ``act_group`` ("attn" or "mlp") and ``act_points``, call
    ``super().__init__(config)`` and implement ``transform(x, *args)``.
    """

    act_group: str = ""
    act_points: tuple = IO_POINTS

    def __init__(self, config):
        super().__init__()
        self.act_quant = ActQuantPoints(config, self.act_group)
        for point in [p for p in self.act_quant if p not in self.act_points]:
            del self.act_quant[point]  # enabled by the group switch, but this variant has no such tensor

    def forward(self, x, *args, **kwargs):
        return self.act_quant("output", self.transform(self.act_quant("input", x), *args, **kwargs))


_GROUPS = {"attn": ("attention_variant", ATTENTION), "mlp": ("mlp_variant", MLP)}


@register_rule
def rule_act_points(cfg):
    from forge_dist.config.layerwise import layer_overrides

    for group, (option, registry) in _GROUPS.items():
        if any(option in layer_overrides(cfg, i) for i in range(cfg.n_layer)):
            continue  # per-layer variants: rule_layers checks every layer's own config
        variant = getattr(cfg, option)
        have = getattr(registry.get(variant, option=option), "act_points", ())
        for point in ACT_POINTS[group]:
            flag = f"quantize_{group}_act_{point}"
            if getattr(cfg, flag) and point not in have:
                raise ConfigError(
                    f"{flag}=True, but {option}={variant!r} has no {point} tensor; it supports "
                    f"{', '.join(have) or 'no activation points'}. Turn {flag} off (quantize_{group}_act "
                    f"enables only the points a variant has) or pick another {option}")
