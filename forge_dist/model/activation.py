"""Activation variants (activation_variant, dact_activation, kan_base_activation), built as modules
so learnable ones hold parameters under ReaLLM-Forge's names.

Every activation is elementwise except ``glu``, which halves the last dim (a * sigmoid(b) of the
two halves). ``width_divisor`` says how many inputs feed one output (1, or 2 for glu), so an MLP
makes its up projection ``width_divisor`` times its hidden width and glu works in every MLP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.variants import ACTIVATION


class Activation(nn.Module):
    """Base of every activation: input width = ``width_divisor`` * output width."""

    width_divisor = 1


# --- torch activations ---------------------------------------------------------------------------
class TorchActivation(Activation):
    """A torch.nn activation held as ``activation``, as upstream's wrapper does, so learnable ones
    (prelu's slope: ``activation.weight``) keep upstream's state-dict names, and train/eval
    behaviour (rrelu samples its slope only in training) comes from torch."""

    factory = nn.Identity

    def __init__(self, config=None):
        super().__init__()
        self.activation = self.factory()

    def forward(self, x):
        return self.activation(x)


def _wrap(name: str, factory, width_divisor: int = 1) -> type:
    cls = type(f"Activation_{name}", (TorchActivation,),
               {"factory": staticmethod(factory), "width_divisor": width_divisor})
    ACTIVATION.register(name)(cls)
    return cls


_wrap("celu", nn.CELU)
_wrap("elu", nn.ELU)
_wrap("gelu", nn.GELU)  # exact erf form, as upstream
_wrap("glu", lambda: nn.GLU(dim=-1), width_divisor=2)  # (..., 2F) -> (..., F)
_wrap("leaky_relu", nn.LeakyReLU)
_wrap("mish", nn.Mish)
_wrap("relu", nn.ReLU)
_wrap("relu6", nn.ReLU6)
_wrap("rrelu", nn.RReLU)  # random slope in U(1/8, 1/3) in training, their mean in eval
_wrap("selu", nn.SELU)
_wrap("sigmoid", nn.Sigmoid)
_wrap("silu", nn.SiLU)
_wrap("softplus", nn.Softplus)
_wrap("softsign", nn.Softsign)
_wrap("tanh", nn.Tanh)
_wrap("identity", nn.Identity)


@ACTIVATION.register("prelu")
class PReLU(TorchActivation):
    """torch PReLU, one learnable slope ``activation.weight`` init 0.25; the slope follows the
    input's dtype, so a float32 slope works on bf16 activations under autocast."""

    factory = nn.PReLU

    def forward(self, x):
        return F.prelu(x, self.activation.weight.to(x.dtype))


# --- custom activations --------------------------------------------------------------------------
@ACTIVATION.register("squared_relu")
class SquaredReLU(Activation):
    """relu(x)^2 (So et al. 2021, Primer)."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x):
        return F.relu(x).square()


@ACTIVATION.register("gelu_shifted")
class ShiftedGELU(Activation):
    """gelu(x - s); s a 0-d parameter (shifted_gelu_learnable_shift) or buffer, init
    shifted_gelu_initial_shift."""

    def __init__(self, config):
        super().__init__()
        shift = torch.tensor(float(config.shifted_gelu_initial_shift))
        if config.shifted_gelu_learnable_shift:
            self.shift = nn.Parameter(shift)
        else:
            self.register_buffer("shift", shift)

    def forward(self, x):
        return F.gelu(x - self.shift)


def _sorted_knots(x_vals: torch.Tensor, y_vals: torch.Tensor):
    """Knots in increasing x (learned knots may cross during training; sorting keeps the function
    well defined and is differentiable)."""
    xs, order = torch.sort(x_vals)
    return xs, y_vals[order]


def _segment(x: torch.Tensor, xs: torch.Tensor):
    """Raw and clamped segment index of each x: xs[i] <= x < xs[i+1] gives i (-1 left of xs[0],
    n-1 at or right of xs[-1]); the clamped one is in [0, n-2]."""
    raw = torch.bucketize(x.detach().contiguous(), xs.detach().contiguous(), right=True) - 1
    return raw, raw.clamp(0, xs.numel() - 2)


class PiecewiseLinear(Activation):
    """Piecewise-linear activation through learnable knots (x_vals, y_vals), initialised on gelu at
    ``num_points`` evenly spaced interior points of (left_bound, right_bound).

    learned_ends=False (``piecewise``, ``pfla``): 0 left of the first knot, a segment from the last
    knot to (R, R), identity from the right bound R on.
    learned_ends=True (``pfla_le``): the first and last segments extend to -inf and +inf.
    """

    def __init__(self, num_points: int, left_bound: float, right_bound: float, learned_ends: bool):
        super().__init__()
        self.right_bound = float(right_bound)
        self.learned_ends = learned_ends
        x = torch.linspace(left_bound, right_bound, num_points + 2)[1:-1]
        self.x_vals = nn.Parameter(x)
        self.y_vals = nn.Parameter(F.gelu(x))

    def forward(self, x):
        xs, ys = _sorted_knots(self.x_vals, self.y_vals)
        if not self.learned_ends:  # close the last segment at (R, R)
            r = xs.new_tensor([self.right_bound])
            xs, ys = torch.cat([xs, r]), torch.cat([ys, r])
        raw, i = _segment(x, xs)
        slope = (ys[1:] - ys[:-1]) / (xs[1:] - xs[:-1])  # (n-1,)
        y = ys[i] + slope[i] * (x - xs[i])
        if self.learned_ends:
            return y
        y = torch.where(raw < 0, torch.zeros_like(y), y)
        return torch.where(raw >= xs.numel() - 1, x, y)


@ACTIVATION.register("piecewise")
class PiecewiseLearnableActivation(PiecewiseLinear):
    def __init__(self, config):
        super().__init__(config.pla_num_points, config.pla_left_bound, config.pla_right_bound, False)


@ACTIVATION.register("pfla")
class PiecewiseFullyLearnableActivation(PiecewiseLinear):
    def __init__(self, config):
        super().__init__(config.pfla_num_points, config.pfla_left_bound, config.pfla_right_bound, False)


@ACTIVATION.register("pfla_le")
class PiecewiseLearnedEndsActivation(PiecewiseLinear):
    def __init__(self, config):
        super().__init__(config.pfla_num_points, config.pfla_left_bound, config.pfla_right_bound, True)


def natural_cubic_second_derivatives(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Second derivatives M of the natural cubic spline through (xs, ys): M_0 = M_{n-1} = 0 and

        h_{i-1} M_{i-1} + 2 (h_{i-1} + h_i) M_i + h_i M_{i+1} = 6 (d_i - d_{i-1}),  i = 1..n-2,

    h_i = x_{i+1} - x_i, d_i = (y_{i+1} - y_i) / h_i (e.g. Burden & Faires, Numerical Analysis,
    sec. 3.5). The tridiagonal system is solved densely: n is tens of knots, and the solve is
    differentiable in both xs and ys.
    """
    h = xs[1:] - xs[:-1]
    d = (ys[1:] - ys[:-1]) / h
    zero = xs.new_zeros(1)
    if xs.numel() == 2:  # a single segment: the spline is the straight line
        return torch.cat([zero, zero])
    inner = torch.diag(2 * (h[:-1] + h[1:])) + torch.diag(h[1:-1], 1) + torch.diag(h[1:-1], -1)
    m = torch.linalg.solve(inner, 6 * (d[1:] - d[:-1]))  # (n-2,)
    return torch.cat([zero, m, zero])


@ACTIVATION.register("learned_spline")
class LearnedSplineActivation(Activation):
    """Natural cubic spline through ``lsa_num_knots`` learnable knots (x_vals, y_vals), initialised
    on gelu over [-5, 5]. Outside the knots it continues linearly (the natural boundary S'' = 0
    extended), so large inputs cannot blow up cubically.
    """

    def __init__(self, config):
        super().__init__()
        x = torch.linspace(-5.0, 5.0, config.lsa_num_knots)
        self.x_vals = nn.Parameter(x)
        self.y_vals = nn.Parameter(F.gelu(x))

    def forward(self, x):
        solve_dtype = torch.promote_types(self.x_vals.dtype, torch.float32)  # no bf16/fp16 solver
        xs, ys = _sorted_knots(self.x_vals.to(solve_dtype), self.y_vals.to(solve_dtype))
        m = natural_cubic_second_derivatives(xs, ys)
        h = xs[1:] - xs[:-1]
        # S_i(t) = a + b t + c t^2 + e t^3 on [x_i, x_{i+1}], t = x - x_i
        b = (ys[1:] - ys[:-1]) / h - h * (2 * m[:-1] + m[1:]) / 6
        c = m[:-1] / 2
        e = (m[1:] - m[:-1]) / (6 * h)
        xs, ys, h, b, c, e = (v.to(torch.promote_types(x.dtype, self.x_vals.dtype)) for v in (xs, ys, h, b, c, e))
        _, i = _segment(x, xs)
        t = x - xs[i]
        tc = torch.minimum(torch.clamp(t, min=0), h[i])  # inside the segment
        inside = ys[i] + tc * (b[i] + tc * (c[i] + tc * e[i]))
        slope = b[i] + tc * (2 * c[i] + 3 * e[i] * tc)
        return inside + slope * (t - tc)  # linear continuation past either end


def build_activation(name: str, config, option: str = "activation_variant") -> nn.Module:
    return ACTIVATION.build(name, config, option=option)


def width_divisor(name: str, option: str = "activation_variant") -> int:
    """Inputs per output of the named activation (2 for glu), without building it."""
    return ACTIVATION.get(name, option).width_divisor


# --- configuration rules -------------------------------------------------------------------------
ACTIVATION_OPTIONS = ("activation_variant", "dact_activation", "kan_base_activation")


@register_rule
def rule_activations(cfg):
    used = {getattr(cfg, o) for o in ACTIVATION_OPTIONS}
    for points, lo, hi in (("pla_num_points", "pla_left_bound", "pla_right_bound"),
                           ("pfla_num_points", "pfla_left_bound", "pfla_right_bound")):
        if getattr(cfg, points) < 1:
            raise ConfigError(f"{points}={getattr(cfg, points)} must be at least 1")
        if not getattr(cfg, lo) < getattr(cfg, hi):
            raise ConfigError(f"{lo}={getattr(cfg, lo)} must be below {hi}={getattr(cfg, hi)}")
    if "pfla_le" in used and cfg.pfla_num_points < 2:
        raise ConfigError(f"pfla_num_points={cfg.pfla_num_points}: pfla_le extrapolates its edge "
                          "segments and needs at least 2 points")
    if cfg.lsa_num_knots < 2:
        raise ConfigError(f"lsa_num_knots={cfg.lsa_num_knots} must be at least 2")
