"""Softmax variants that are curves rather than row softmaxes: the ConSmax family (learned beta,
gamma), fixed elementwise curves (polymax, exppolymax, relumax & co.) and pfla_softmax's learned
piecewise-linear curve. Registered in SOFTMAX on import (forge_dist.model.softmax imports this
module)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from forge_dist import ops
from forge_dist.ops import scores as ops_scores
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import SOFTMAX
from forge_dist.ops.reference import softmax_variants as ref
from forge_dist.model.score_normalizer import ScoreNormalizer, _log_base, _scalar


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

