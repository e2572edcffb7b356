"""Softmax variants: score normalisers for attention (softmax_variant_attn) and for sampling
(softmax_variant_output), one class per ReaLLM-Forge variant.

Construction: ``build_softmax(name, config, option=..., n_head=None)``, i.e. ``Variant(config,
n_head=None)``; n_head None means config.n_head, except for option="softmax_variant_output": the
output normaliser gets one "head", so its per-head parameters are (1, 1, 1) and broadcast over logits.
Forward: ``module(scores, mask: MaskSpec | None) -> probs`` of the same shape, scores (B, H, Tq, Tk)
for attention, or logits (B, V) / (B, T, V) without a mask.

The numerics live in ``forge_dist.ops.reference.softmax_variants`` (what a fused kernel must
reproduce) and are called through ``forge_dist.ops`` (the fused kernel, mask applied inside, or that
reference); a module here only holds the parameters, under ReaLLM-Forge's attribute names so
checkpoints convert by name, and resolves the mask. Hidden keys come out exactly 0 with finite
gradients, and sink columns (MaskSpec.n_sink) count as visible keys, in every variant.
Per-head parameters are (n_head, 1, 1), head first, so tensor parallelism can slice them;
per-layer scalars are 0-d (ReaLLM-Forge stores them as (1,); loading accepts either).

``div_by_seq_len`` divides by L = the number of real key columns, scores.shape[-1] minus the sink
columns. That is upstream's x.shape[-1]: the block length T for every query row in training
(hidden keys of a causal row count too), and the cached length at decode time, which is what
upstream's cache-free sampling divides the last row by. Only the variants that honour it upstream
read it (saturatingconsmax, polymax, vpolymax, exppolymax, strongermax, relumax, relu2max,
sigmoidmax, softplus, squareplus).

The variants live in softmax_rownorm.py (row-normalised) and softmax_elementwise.py (ConSmax family,
fixed curves, pfla_softmax), their shared base in score_normalizer.py; this module imports them in
that order, so every variant is registered in SOFTMAX, and re-exports their names.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.variants import SOFTMAX
from forge_dist.ops.reference import softmax_variants as ref
from forge_dist.model.score_normalizer import RowSpec, ScoreNormalizer, _log_base, _scalar  # noqa: F401
from forge_dist.model.softmax_rownorm import SigSoftmax, Softermax, Softmax, Strongermax  # noqa: F401
from forge_dist.model.softmax_elementwise import (  # noqa: F401
    ConSmax, ConSmaxQuan, ConSmaxV2, ExpPolymax, PFLASoftmax, Polymax, ReLU2Max, ReLUMax,
    SaturatingConSmax, SigmoidMax, Softplus, Squareplus, VPolymax, _divisor_variant,
)


# --- construction and option checks -----------------------------------------------------------
def build_softmax(name: str, config, option: str = "softmax_variant_attn",
                  n_head: Optional[int] = None) -> nn.Module:
    """The normaliser ``name``; n_head sizes per-head parameters. None means config.n_head for
    attention, and 1 for option="softmax_variant_output" (logits have no head axis)."""
    if n_head is None and option == "softmax_variant_output":
        n_head = 1
    return SOFTMAX.build(name, config, n_head=n_head, option=option)


def _positive(cfg, *names):
    for n in names:
        if not getattr(cfg, n) > 0:
            raise ConfigError(f"{n}={getattr(cfg, n)} must be positive")


def _nonzero(cfg, *names):
    for n in names:
        if getattr(cfg, n) == 0:
            raise ConfigError(f"{n}=0 would divide by zero; use a nonzero value")


@register_rule
def rule_softmax_options(cfg):
    """Companion options of the softmax variants in use (attention or output) must be usable."""
    used = {cfg.softmax_variant_attn, cfg.softmax_variant_output}
    if used & {"consmax", "consmax_v2", "saturatingconsmax"} and not cfg.consmax_use_euler_base:
        _positive(cfg, "consmax_base")
    if used & {"consmax", "consmax_v2", "consmax_quan", "saturatingconsmax"}:
        _nonzero(cfg, "consmax_initial_gamma")
    if used & {"polymax", "vpolymax"}:
        if not cfg.polymax_x_intercept < 0:
            raise ConfigError(f"polymax_x_intercept={cfg.polymax_x_intercept} must be negative "
                              "(the linear piece runs from x0 < 0 to 0)")
        _nonzero(cfg, "polymax_divisor")
    if "exppolymax" in used:
        if not cfg.exppolymax_use_euler_base:
            _positive(cfg, "exppolymax_base")
        _nonzero(cfg, "exppolymax_divisor")
        try:
            ref.exppolymax_shift(_log_base(cfg.exppolymax_use_euler_base, cfg.exppolymax_base),
                                 cfg.exppolymax_power)
        except ValueError as e:
            raise ConfigError(f"exppolymax_power={cfg.exppolymax_power} with exppolymax_base="
                              f"{cfg.exppolymax_base}: the slope-matching shift {e}") from None
    if "sigsoftmax" in used and not cfg.sigsoftmax_use_euler_base:
        _positive(cfg, "sigsoftmax_base")
    if "strongermax" in used:
        _positive(cfg, "strongermax_strength")
        _nonzero(cfg, "strongermax_temperature_factor", "strongermax_divisor")
        if cfg.strongermax_overflow_recompute and not cfg.strongermax_xmax_guess:
            raise ConfigError("strongermax_overflow_recompute=True needs strongermax_xmax_guess set "
                              "(the guess it falls back from)")
    for name in ("relumax", "relu2max", "sigmoidmax", "softplus", "squareplus"):
        if name in used:
            _nonzero(cfg, f"{name}_divisor")
    if "pfla_softmax" in used:
        if cfg.pfla_softmax_num_points < 2:
            raise ConfigError(f"pfla_softmax_num_points={cfg.pfla_softmax_num_points} must be at least 2")
        if not cfg.pfla_softmax_left_bound < cfg.pfla_softmax_right_bound:
            raise ConfigError("pfla_softmax_left_bound must be below pfla_softmax_right_bound")
        if cfg.pfla_softmax_use_learned_obo and not cfg.pfla_softmax_use_obo:
            raise ConfigError("pfla_softmax_use_learned_obo=True needs pfla_softmax_use_obo=True")
