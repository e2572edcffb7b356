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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from forge_dist import ops
from forge_dist.ops import scores as ops_scores
from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import SOFTMAX
from forge_dist.ops.reference import softmax_variants as ref


@dataclass
class RowSpec:
    """A row-normalised variant as the blocked attention path computes it (mirrors the csrc rownorm
    kernel): w = transform(x), e = exp(log_scale (w - m)), y = e / (obo + sum_j e) (if divide),
    then / divisor (/ seq_len). m: the row max of w ("max"), 0 ("none"), the fixed guess ("guess"),
    or the max where it exceeds the guess by more than overflow ("guess_or_max")."""

    log_scale: Union[float, torch.Tensor] = 1.0
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    shift: str = "max"
    guess: float = 0.0
    overflow: float = 0.0
    obo: Union[float, torch.Tensor] = 0.0
    divide: bool = True
    divisor: Union[float, torch.Tensor] = 1.0
    seq_len: Optional[int] = None
    # the same transform as the fused kernels' (RowTransform code, its parameter) in
    # csrc/include/forge/scores.h; None with a transform: no kernel has it
    kernel_transform: Optional[tuple] = (ops_scores.IDENTITY, 0.0)


def _scalar(value: float, learnable: bool = True, shape=(1,)):
    """A per-layer scalar: a Parameter of upstream's shape ((1,) for beta, gamma, obo_offset and
    temperature_factor; 0-d for pfla's raw values), or a plain float kept out of the state dict."""
    return nn.Parameter(torch.full(shape, float(value))) if learnable else float(value)


def _log_base(use_euler: bool, base: float) -> float:
    """ln b for b^x = e^{x ln b}."""
    return 1.0 if use_euler else math.log(base)


class ScoreNormalizer(nn.Module):
    """What every variant shares: the keep matrix, L for div_by_seq_len, per-head views."""

    elementwise = False  # y_ij depends on s_ij alone: the blocked attention path normalises key blocks apart

    def __init__(self, config=None, n_head: Optional[int] = None):
        super().__init__()
        self.n_head = n_head if n_head is not None else getattr(config, "n_head", 1)
        self.div_by_seq_len = bool(getattr(config, "div_by_seq_len", False))
        self.total_keys: Optional[int] = None  # L while the blocked path feeds one key block at a time

    def row_spec(self, n_keys: int) -> Optional[RowSpec]:
        """How the blocked attention path computes a row-normalised variant over n_keys real keys
        (None: it cannot, the materialised path runs)."""
        return None

    def elem_spec(self, seq_len: Optional[int], scores: Optional[torch.Tensor] = None):
        """An elementwise variant's formula and parameters (forge_dist.ops.scores.ElemSpec) for L =
        seq_len (None: no division by L); per-head parameters shaped against ``scores`` if given,
        else (H, 1, 1). None for a variant that is not elementwise."""
        return None

    def forward_elementwise(self, scores, mask: Optional[MaskSpec]):
        return ops_scores.elementwise(scores, mask, self.elem_spec(self.seq_len(scores, mask), scores))

    @staticmethod
    def keep(scores: torch.Tensor, mask: Optional[MaskSpec]) -> Optional[torch.Tensor]:  # (Tq, Tk)
        return None if mask is None else mask.keep(scores.shape[-2], scores.shape[-1], scores.device)

    def seq_len(self, scores: torch.Tensor, mask: Optional[MaskSpec]) -> Optional[int]:
        if not self.div_by_seq_len:
            return None
        if self.total_keys is not None:
            return self.total_keys
        return scores.shape[-1] - (mask.n_sink if mask is not None else 0)

    @staticmethod
    def per_head(p: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(H, 1, 1) against (B, H, Tq, Tk) or (B, T, V); (H, 1) against logits (B, V)."""
        return p.reshape(p.shape[0], *([1] * (min(scores.dim(), 3) - 1)))


# --- row-normalised ---------------------------------------------------------------------------
@SOFTMAX.register("softmax")
class Softmax(ScoreNormalizer):
    """e^{x - max} / sum e^{x - max} over visible keys; a fully hidden row gives zeros."""

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        return ops.softmax(scores, mask)

    def row_spec(self, n_keys: int) -> RowSpec:
        return RowSpec()


@SOFTMAX.register("softermax")
class Softermax(ScoreNormalizer):
    """Base-2 softmax; ``softermax_use_xmax=False`` drops the max subtraction."""

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.subtract_max = config.softermax_use_xmax

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        return ops.softermax(scores, mask, self.subtract_max)

    def row_spec(self, n_keys: int) -> RowSpec:
        return RowSpec(log_scale=math.log(2.0), shift="max" if self.subtract_max else "none")


@SOFTMAX.register("strongermax")
class Strongermax(ScoreNormalizer):
    """Softmax with base S, temperature, max guess, clamp and off-by-one; with the command-line
    defaults (S = e, real max, sum to 1, D = 1) it is softmax.

    ``obo_offset`` is a float, a learned 0-d scalar (strongermax_use_learned_obo) or learned per
    head (n_head, 1, 1) (strongermax_use_learned_obo_per_head, which wins, as upstream);
    ``temperature_factor`` is a float or a learned 0-d scalar.
    """

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.log_strength = math.log(config.strongermax_strength)
        self.subtract_max = config.strongermax_use_xmax
        self.xmax_guess = config.strongermax_xmax_guess
        self.overflow_recompute = config.strongermax_overflow_recompute
        self.overflow_recompute_value = config.strongermax_overflow_recompute_value
        self.clamp_value = config.strongermax_clamp_value if config.strongermax_clamping else None
        self.div_by_sum_of_terms = config.strongermax_div_by_sum_of_terms
        self.divisor = config.strongermax_divisor
        self.temperature_factor = _scalar(config.strongermax_temperature_factor,
                                          config.strongermax_use_learned_temperature_factor)
        if config.strongermax_use_learned_obo_per_head:
            self.obo_offset = nn.Parameter(torch.full((self.n_head, 1, 1), float(config.strongermax_obo)))
        else:
            self.obo_offset = _scalar(config.strongermax_obo, config.strongermax_use_learned_obo)

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        obo = self.obo_offset
        if torch.is_tensor(obo) and obo.dim() == 3:
            obo = self.per_head(obo, scores)
        return ops.strongermax(
            scores, mask, log_strength=self.log_strength,
            temperature=self.temperature_factor, use_xmax=self.subtract_max, xmax_guess=self.xmax_guess,
            overflow_recompute=self.overflow_recompute, overflow_value=self.overflow_recompute_value,
            clamp_value=self.clamp_value, div_by_sum_of_terms=self.div_by_sum_of_terms, obo=obo,
            divisor=self.divisor, seq_len=self.seq_len(scores, mask),
        )

    def row_spec(self, n_keys: int) -> RowSpec:
        if not self.subtract_max:
            shift = "none"
        elif self.xmax_guess:  # upstream tests truthiness: 0 means "use the real max"
            shift = "guess_or_max" if self.overflow_recompute else "guess"
        else:
            shift = "max"
        clamp = self.clamp_value
        obo = self.obo_offset
        if torch.is_tensor(obo) and obo.dim() != 3:
            obo = obo.reshape(())
        return RowSpec(log_scale=self.log_strength / self.temperature_factor,
                       transform=None if clamp is None else (lambda x: x.clamp(max=clamp)),
                       kernel_transform=(ops_scores.IDENTITY, 0.0) if clamp is None else (ops_scores.CLAMP, clamp),
                       shift=shift, guess=float(self.xmax_guess or 0.0), overflow=self.overflow_recompute_value,
                       obo=obo, divide=self.div_by_sum_of_terms, divisor=self.divisor,
                       seq_len=n_keys if self.div_by_seq_len else None)


@SOFTMAX.register("sigsoftmax")
class SigSoftmax(ScoreNormalizer):
    """b^x sigma_b(x) / sum_j b^x_j sigma_b(x_j); b = e, or sigsoftmax_base."""

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.log_base = _log_base(config.sigsoftmax_use_euler_base, config.sigsoftmax_base)

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        return ops.sigsoftmax(scores, mask, self.log_base)

    def row_spec(self, n_keys: int) -> RowSpec:
        b = self.log_base  # z = u + ln sigma(u), u = x ln b (see ref.sigsoftmax)
        return RowSpec(transform=lambda x: x * b + torch.nn.functional.logsigmoid(x * b),
                       kernel_transform=(ops_scores.SIGSOFT, b))


# --- ConSmax family (elementwise, learned beta and gamma) --------------------------------------
@SOFTMAX.register("consmax")
class ConSmax(ScoreNormalizer):
    """b^{x - beta} / gamma with one learned (beta, gamma) per layer; b = e or consmax_base."""

    elementwise = True

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.beta = _scalar(config.consmax_initial_beta)
        self.gamma = _scalar(config.consmax_initial_gamma)
        self.log_base = _log_base(config.consmax_use_euler_base, config.consmax_base)

    forward = ScoreNormalizer.forward_elementwise

    def elem_spec(self, seq_len, scores=None):
        return ops_scores.consmax_spec(self.beta, self.gamma, self.log_base)


@SOFTMAX.register("consmax_quan")
class ConSmaxQuan(ConSmax):
    """ConSmax, base e, with beta and gamma fake-quantized to steps of 0.01 and 0.1 (straight-through
    in training, the same rounding in eval)."""

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.log_base = 1.0  # upstream ignores consmax_base here

    def elem_spec(self, seq_len, scores=None):
        beta, gamma = ref.round_ste(self.beta, 100.0), ref.round_ste(self.gamma, 10.0)
        return ops_scores.consmax_spec(beta, gamma, self.log_base)


@SOFTMAX.register("consmax_v2")
class ConSmaxV2(ScoreNormalizer):
    """Per-head ConSmax: beta_h = beta_init f_h, gamma_h = gamma_init g_h with learned factors
    ``beta_factor``, ``gamma_factor`` (n_head, 1, 1) starting at 1; optional clamp of x - beta."""

    elementwise = True

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.beta_init = float(config.consmax_initial_beta)
        self.gamma_init = float(config.consmax_initial_gamma)
        self.beta_factor = nn.Parameter(torch.ones(self.n_head, 1, 1))
        self.gamma_factor = nn.Parameter(torch.ones(self.n_head, 1, 1))
        self.clamp_value = config.consmax_v2_clamp_value if config.consmax_v2_clamping else None
        self.log_base = _log_base(config.consmax_use_euler_base, config.consmax_base)

    forward = ScoreNormalizer.forward_elementwise

    def elem_spec(self, seq_len, scores=None):
        def shaped(p):
            return p if scores is None else self.per_head(p, scores)

        beta, gamma = self.beta_init * shaped(self.beta_factor), self.gamma_init * shaped(self.gamma_factor)
        return ops_scores.consmax_spec(beta, gamma, self.log_base, self.clamp_value)


@SOFTMAX.register("saturatingconsmax")
class SaturatingConSmax(ScoreNormalizer):
    """ConSmax that saturates: (b^{x - beta} below x_sat, else x_sat) / gamma, x_sat =
    consmax_saturation + consmax_initial_beta; beta and gamma learned or fixed per
    consmax_learnable_beta / consmax_learnable_gamma."""

    elementwise = True

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.beta = _scalar(config.consmax_initial_beta, config.consmax_learnable_beta)
        self.gamma = _scalar(config.consmax_initial_gamma, config.consmax_learnable_gamma)
        self.log_base = _log_base(config.consmax_use_euler_base, config.consmax_base)
        self.x_sat = float(config.consmax_saturation + config.consmax_initial_beta)

    forward = ScoreNormalizer.forward_elementwise

    def elem_spec(self, seq_len, scores=None):
        return ops_scores.saturating_consmax_spec(self.beta, self.gamma, self.x_sat, self.log_base, seq_len)


# --- fixed elementwise curves -----------------------------------------------------------------
@SOFTMAX.register("polymax")
class Polymax(ScoreNormalizer):
    """0 below x0, a linear ramp to y0 on [x0, 0], x^p + y0 above 0; / polymax_divisor."""

    elementwise = True

    v_shaped = False

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.x_intercept = config.polymax_x_intercept
        self.y_intercept = config.polymax_y_intercept
        self.power = config.polymax_power
        self.divisor = config.polymax_divisor

    forward = ScoreNormalizer.forward_elementwise

    def elem_spec(self, seq_len, scores=None):
        return ops_scores.polymax_spec(self.x_intercept, self.y_intercept, self.power, self.divisor, seq_len,
                                       self.v_shaped)


@SOFTMAX.register("vpolymax")
class VPolymax(Polymax):
    """Polymax whose linear piece falls from 2 y0 at x0 to y0 at 0 (a V); same options."""

    v_shaped = True


@SOFTMAX.register("exppolymax")
class ExpPolymax(ScoreNormalizer):
    """b^x below 0, (x + s)^p + y0 from 0 (slopes matched at 0); / exppolymax_divisor."""

    elementwise = True

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.log_base = _log_base(config.exppolymax_use_euler_base, config.exppolymax_base)
        self.power = config.exppolymax_power
        self.y_intercept = config.exppolymax_y_intercept
        self.divisor = config.exppolymax_divisor

    forward = ScoreNormalizer.forward_elementwise

    def elem_spec(self, seq_len, scores=None):
        return ops_scores.exppolymax_spec(self.log_base, self.power, self.y_intercept, self.divisor, seq_len)


def _divisor_variant(name: str, class_name: str, divisor_option: str):
    """f(x) / D (/ L) with D = config.<divisor_option>: relumax, relu2max, sigmoidmax, softplus,
    squareplus differ only in f."""

    class _Variant(ScoreNormalizer):
        elementwise = True

        def __init__(self, config, n_head: Optional[int] = None):
            super().__init__(config, n_head)
            self.divisor = float(getattr(config, divisor_option))

        forward = ScoreNormalizer.forward_elementwise

        def elem_spec(self, seq_len, scores=None):
            return ops_scores.curve_spec(name, self.divisor, seq_len)

    _Variant.__name__ = _Variant.__qualname__ = class_name
    _Variant.__doc__ = f"{getattr(ops, name).__doc__.splitlines()[0]} D = {divisor_option}."
    return SOFTMAX.register(name)(_Variant)


ReLUMax = _divisor_variant("relumax", "ReLUMax", "relumax_divisor")
ReLU2Max = _divisor_variant("relu2max", "ReLU2Max", "relu2max_divisor")
SigmoidMax = _divisor_variant("sigmoidmax", "SigmoidMax", "sigmoidmax_divisor")
Softplus = _divisor_variant("softplus", "Softplus", "softplus_divisor")
Squareplus = _divisor_variant("squareplus", "Squareplus", "squareplus_divisor")


# --- learned piecewise-linear curve -----------------------------------------------------------
@SOFTMAX.register("pfla_softmax")
class PFLASoftmax(ScoreNormalizer):
    """A learnable piecewise-linear curve (knots ``x_vals``, values stored as sqrt(y) in ``y_vals``,
    initialised from pfla_softmax_init_activation), normalised by the row sum (+ off-by-one
    e^{_obo_raw}) or by a learned divisor relu(_gamma_raw) + eps."""

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        from forge_dist.model.activation import build_activation

        self.mode = config.pfla_softmax_mode
        self.learn_x = config.pfla_softmax_learn_x
        x_init = ref.pfla_knots(config.pfla_softmax_num_points, config.pfla_softmax_left_bound,
                                config.pfla_softmax_right_bound, config.pfla_softmax_density)
        with torch.no_grad():
            act = build_activation(config.pfla_softmax_init_activation, config,
                                   option="pfla_softmax_init_activation")
            y_init = torch.sqrt(act(x_init).detach().clamp(min=1e-6))
        self._knots("x_vals", x_init, config.pfla_softmax_learn_x)
        self._knots("y_vals", y_init, config.pfla_softmax_learn_y)
        self._gamma_raw = (nn.Parameter(torch.tensor(float(config.pfla_softmax_gamma_init)))
                           if config.pfla_softmax_use_learned_divisor else None)
        self._obo_raw = None
        if config.pfla_softmax_use_obo:
            self._obo_raw = _scalar(config.pfla_softmax_obo, config.pfla_softmax_use_learned_obo, shape=())

    @property
    def elementwise(self) -> bool:  # a learned divisor instead of the row sum
        return self._gamma_raw is not None

    def _knots(self, name: str, values: torch.Tensor, learnable: bool) -> None:
        if learnable:
            self.register_parameter(name, nn.Parameter(values))
        else:
            self.register_buffer(name, values)

    def knots(self):
        x_vals, y_vals = self.x_vals, self.y_vals
        if self.learn_x:  # learned knots may cross: take them in increasing order (with their values)
            order = torch.argsort(x_vals.detach())
            x_vals, y_vals = x_vals[order], y_vals[order]
        return x_vals, y_vals

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        x_vals, y_vals = self.knots()
        return ref.pfla_softmax(scores, self.keep(scores, mask), x_vals, y_vals, self.mode,
                                gamma_raw=self._gamma_raw, obo_log=self._obo_raw)

    def elem_spec(self, seq_len=None, scores=None):
        """The fused attention kernels' spec: the curve's knot table / the learned divisor, or divided
        by its row sum + eps (+ e^obo); pfla_softmax ignores div_by_seq_len (as upstream)."""
        x_vals, y_vals = self.knots()
        if self._gamma_raw is not None:
            return ops_scores.pfla_spec(x_vals, y_vals, self.mode, gamma=torch.relu(self._gamma_raw) + 1e-6)
        return ops_scores.pfla_spec(x_vals, y_vals, self.mode, divide=True,
                                    addend=ref.pfla_addend(x_vals, obo_log=self._obo_raw))

    def row_sum_spec(self):
        """(curve, addend) of the row-normalised mode, y = curve(s) / (sum_j curve(s_j) + addend), for
        the blocked attention path (attention/blocked.py); None with the learned divisor."""
        if self._gamma_raw is not None:
            return None
        x_vals, y_vals = self.knots()
        return ((lambda s: ref.pfla_curve(s, None, x_vals, y_vals, self.mode)),
                (lambda like: ref.pfla_addend(like, obo_log=self._obo_raw)))


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
