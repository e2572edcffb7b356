"""Score normalisers (softmax variants): the fused kernel where usable, else the reference.

Each function has its reference's signature (forge_dist.ops.reference.softmax_variants) except that
it takes the ``MaskSpec`` (or None) instead of a keep matrix: the kernels apply causal / window /
query offset / sink columns inside the kernel and never read a mask tensor, and the fallback builds
the keep matrix the reference needs. A softmax module switches by calling
``ops.<variant>(scores, mask, ...)`` where it called ``ref.<variant>(scores, self.keep(scores, mask), ...)``.

Two kernels: elementwise (y = f(x) / D, learned beta and gamma per head) and row-normalised
(y = e^{(t(x) - m) c} / (obo + sum), learned c = ln S / tau and obo per head); the tables below map
each variant onto one of them (constants as laid out in csrc/include/forge/scores.h).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from forge_dist.ops import registry
from forge_dist.ops.mask import MaskSpec
from forge_dist.ops.reference import softmax_variants as ref
from forge_dist.ops.reference.softmax_variants import Param

ELEM_KINDS = {"consmax": 0, "saturatingconsmax": 1, "polymax": 2, "exppolymax": 3, "relumax": 4, "relu2max": 5,
              "sigmoidmax": 6, "softplus": 7, "squareplus": 8, "pfla_softmax": 9}  # pfla: attention kernels only
IDENTITY, CLAMP, SIGSOFT = 0, 1, 2  # RowTransform
SHIFT_NONE, SHIFT_MAX, SHIFT_GUESS, SHIFT_GUESS_OR_MAX = 0, 1, 2, 3


def mask_args(mask: Optional["MaskSpec"]) -> list:
    """[enabled, causal, window (-1 none), q_offset, n_sink] (csrc MaskArgs)."""
    if mask is None:
        return [0, 0, -1, 0, 0]
    return [1, int(mask.causal), -1 if mask.window is None else int(mask.window), int(mask.q_offset), int(mask.n_sink)]


def _keep(scores: torch.Tensor, mask: Optional["MaskSpec"]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.keep(scores.shape[-2], scores.shape[-1], scores.device)


_out_dtype = registry.result_dtype  # per-head (dimensioned) float parameters promote, 0-d ones do not


def _heads(scores: torch.Tensor) -> int:
    return scores.shape[-3] if scores.dim() >= 3 else 1


def _per_head(p: Param, scores: torch.Tensor) -> Optional[torch.Tensor]:
    """p as a (1,) or (H,) tensor in the kernel's parameter precision; None if it is shaped otherwise."""
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    t = p.to(acc) if isinstance(p, torch.Tensor) else torch.tensor(float(p), dtype=acc)
    t = t.to(scores.device).reshape(-1)
    return t if t.numel() in (1, _heads(scores)) else None


def _usable(op: str, scores: torch.Tensor, out_dtype: torch.dtype, *params) -> bool:
    return scores.dim() >= 1 and scores.shape[-1] > 0 and registry.usable(op, scores, out_dtype, *params)


def _scale(divisor: float, seq_len: Optional[int]) -> float:
    return 1.0 / divisor / (seq_len or 1)


# --- elementwise -----------------------------------------------------------------------------------
@dataclass
class ElemSpec:
    """One elementwise variant for a kernel: its kind, constants (layout per csrc/include/forge/scores.h)
    and learned (beta, gamma); ``reference(scores, keep, beta, gamma)`` is the materialised formula. The same spec
    feeds the normaliser kernel and the fused attention kernel (forge_dist.ops.attention)."""

    name: str
    consts: Sequence[float]
    reference: Callable[..., torch.Tensor]
    beta: Param = 0.0
    gamma: Param = 1.0
    # a learned curve's table (pfla_softmax: knot positions then values, (2n,)), appended to the
    # kernel's parameter row [beta, gamma, table...]; its gradient comes back through that row
    table: Optional[torch.Tensor] = None
    # divide by the row sum of the curve plus ``addend`` (pfla_softmax without its learned divisor)
    divide: bool = False
    addend: Param = 0.0

    @property
    def kind(self) -> int:
        return ELEM_KINDS[self.name]


def elementwise(scores, mask, spec: ElemSpec):
    """y = f(scores) by ``spec``: the kernel where usable, else its reference."""
    if spec.table is not None or spec.divide:  # a table or a row sum: the attention kernels only
        return spec.reference(scores, _keep(scores, mask), spec.beta, spec.gamma)
    out = _out_dtype(scores, spec.beta, spec.gamma)
    b, g = _per_head(spec.beta, scores), _per_head(spec.gamma, scores)
    if b is None or g is None or not _usable(spec.name, scores, out, b):
        return spec.reference(scores, _keep(scores, mask), spec.beta, spec.gamma)
    n = max(b.numel(), g.numel())
    params = torch.stack([b.expand(n), g.expand(n)], dim=1)  # (H or 1, 2); autograd splits dparams back
    return torch.ops.forge_ops.score_elementwise_fwd(scores, params, spec.kind, [float(c) for c in spec.consts],
                                                     mask_args(mask), out)


def consmax_spec(beta: Param, gamma: Param, log_base: float = 1.0, clamp_value: Optional[float] = None):
    consts = [log_base, math.inf if clamp_value is None else clamp_value]
    return ElemSpec("consmax", consts, lambda s, keep, b, g: ref.consmax(s, keep, b, g, log_base, clamp_value),
                    beta, gamma)


def consmax(scores, mask, beta: Param, gamma: Param, log_base: float = 1.0, clamp_value: Optional[float] = None):
    """b^{min(x - beta, clamp)} / gamma; beta, gamma scalars or per head."""
    return elementwise(scores, mask, consmax_spec(beta, gamma, log_base, clamp_value))


def saturating_consmax_spec(beta: Param, gamma: Param, x_sat: float, log_base: float = 1.0,
                            seq_len: Optional[int] = None):
    return ElemSpec("saturatingconsmax", [log_base, x_sat, _scale(1.0, seq_len)],
                    lambda s, keep, b, g: ref.saturating_consmax(s, keep, b, g, x_sat, log_base, seq_len),
                    beta, gamma)


def saturating_consmax(scores, mask, beta: Param, gamma: Param, x_sat: float, log_base: float = 1.0,
                       seq_len: Optional[int] = None):
    return elementwise(scores, mask, saturating_consmax_spec(beta, gamma, x_sat, log_base, seq_len))


def polymax_spec(x_intercept: float, y_intercept: float, power: float, divisor: float,
                 seq_len: Optional[int] = None, v_shaped: bool = False):
    slope = y_intercept / (x_intercept if v_shaped else -x_intercept)
    formula = ref.vpolymax if v_shaped else ref.polymax
    return ElemSpec("polymax", [x_intercept, y_intercept, power, slope, _scale(divisor, seq_len)],
                    lambda s, keep, *_: formula(s, keep, x_intercept, y_intercept, power, divisor, seq_len))


def polymax(scores, mask, x_intercept: float, y_intercept: float, power: float, divisor: float,
            seq_len: Optional[int] = None):
    return elementwise(scores, mask, polymax_spec(x_intercept, y_intercept, power, divisor, seq_len))


def vpolymax(scores, mask, x_intercept: float, y_intercept: float, power: float, divisor: float,
             seq_len: Optional[int] = None):
    return elementwise(scores, mask, polymax_spec(x_intercept, y_intercept, power, divisor, seq_len, True))


def exppolymax_spec(log_base: float, power: float, y_intercept: float, divisor: float,
                    seq_len: Optional[int] = None):
    consts = [log_base, power, y_intercept, ref.exppolymax_shift(log_base, power), _scale(divisor, seq_len)]
    return ElemSpec("exppolymax", consts, lambda s, keep, *_: ref.exppolymax(
        s, keep, log_base, power, y_intercept, divisor, seq_len))


def exppolymax(scores, mask, log_base: float, power: float, y_intercept: float, divisor: float,
               seq_len: Optional[int] = None):
    return elementwise(scores, mask, exppolymax_spec(log_base, power, y_intercept, divisor, seq_len))


def curve_spec(name: str, divisor: float, seq_len: Optional[int] = None, b: float = ref.SQUAREPLUS_B):
    """relumax, relu2max, sigmoidmax, softplus, squareplus: f(x) / D (/ L)."""
    reference = _CURVES[name]
    if name == "squareplus":
        return ElemSpec(name, [_scale(divisor, seq_len), b],
                        lambda s, keep, *_: reference(s, keep, divisor, seq_len, b))
    return ElemSpec(name, [_scale(divisor, seq_len)], lambda s, keep, *_: reference(s, keep, divisor, seq_len))


_CURVES = {"relumax": ref.relumax, "relu2max": ref.relu2max, "sigmoidmax": ref.sigmoidmax, "softplus": ref.softplus,
           "squareplus": ref.squareplus}


def _fixed_curve(name: str):
    def variant(scores, mask, divisor: float, seq_len: Optional[int] = None):
        return elementwise(scores, mask, curve_spec(name, divisor, seq_len))

    variant.__name__ = variant.__qualname__ = name
    variant.__doc__ = _CURVES[name].__doc__
    return variant


relumax = _fixed_curve("relumax")
relu2max = _fixed_curve("relu2max")
sigmoidmax = _fixed_curve("sigmoidmax")
softplus = _fixed_curve("softplus")


def squareplus(scores, mask, divisor: float, seq_len: Optional[int] = None, b: float = ref.SQUAREPLUS_B):
    """Squareplus (Barron 2021): (x + sqrt(x^2 + b)) / 2, / D (/ L)."""
    return elementwise(scores, mask, curve_spec("squareplus", divisor, seq_len, b))


def pfla_spec(x_knots: torch.Tensor, sqrt_y: torch.Tensor, mode: str, gamma: Param = 1.0, divide: bool = False,
              addend: Param = 0.0):
    """pfla_softmax's learned curve (knots increasing; values stored as sqrt(y)) / gamma, or / (row sum +
    addend) with ``divide``; consts [quadratic] (csrc/include/forge/scores.h Pfla)."""
    if mode not in ("linear", "quadratic"):
        raise ValueError(f"pfla_softmax_mode={mode!r}; valid values: linear, quadratic")

    def reference(s, keep, _beta, g):
        y = ref.pfla_curve(s, keep, x_knots, sqrt_y, mode)
        return y / (y.sum(-1, keepdim=True) + addend) if divide else y / g

    return ElemSpec("pfla_softmax", [float(mode == "quadratic")], reference, 0.0, gamma,
                    table=torch.cat([x_knots.reshape(-1), sqrt_y.reshape(-1)]), divide=divide, addend=addend)


# --- row-normalised --------------------------------------------------------------------------------
def _rownorm(name: str, scores, mask, fallback, *, c: Param = 1.0, obo: Param = 0.0, transform: int = IDENTITY,
             tparam: float = 0.0, shift: int = SHIFT_MAX, guess: float = 0.0, overflow: float = 0.0,
             divide: bool = True, post: float = 1.0, promote=()):
    out = _out_dtype(scores, obo, *promote)
    c_t, obo_t = _per_head(c, scores), _per_head(obo, scores)
    if c_t is None or c_t.numel() != 1 or obo_t is None or not _usable(name, scores, out, c_t):
        return fallback()
    y, _stats = torch.ops.forge_ops.score_rownorm_fwd(scores, c_t, obo_t, mask_args(mask), transform, shift, divide,
                                                      float(tparam), float(guess), float(overflow), float(post), out)
    return y


def softmax(scores, mask):
    """e^{x - max} / sum over visible keys; a fully hidden row gives zeros."""
    return _rownorm("softmax", scores, mask, lambda: ref.softmax(scores, _keep(scores, mask)))


def softermax(scores, mask, use_xmax: bool = True):
    """2^{x - max} / sum (Stevens et al. 2021)."""
    return _rownorm("softermax", scores, mask, lambda: ref.softermax(scores, _keep(scores, mask), use_xmax),
                    c=math.log(2.0), shift=SHIFT_MAX if use_xmax else SHIFT_NONE)


def sigsoftmax(scores, mask, log_base: float = 1.0):
    """Softmax of u + ln sigma(u), u = x ln b (Kanai et al. 2018)."""
    return _rownorm("sigsoftmax", scores, mask, lambda: ref.sigsoftmax(scores, _keep(scores, mask), log_base),
                    transform=SIGSOFT, tparam=log_base)


def strongermax(scores, mask, *, log_strength: float = 1.0, temperature: Param = 1.0, use_xmax: bool = True,
                xmax_guess: Optional[float] = None, overflow_recompute: bool = False, overflow_value: float = 88.0,
                clamp_value: Optional[float] = None, div_by_sum_of_terms: bool = True, obo: Param = 0.0,
                divisor: Param = 1.0, seq_len: Optional[int] = None):
    """S^{(x' - m) / tau} / (obo + sum), / L, / D; the exponent scale c = ln S / tau is one learnable
    input of the kernel, so a learned temperature gets its gradient through it."""
    def fallback():
        return ref.strongermax(
            scores, _keep(scores, mask), log_strength=log_strength, temperature=temperature, use_xmax=use_xmax,
            xmax_guess=xmax_guess, overflow_recompute=overflow_recompute, overflow_value=overflow_value,
            clamp_value=clamp_value, div_by_sum_of_terms=div_by_sum_of_terms, obo=obo, divisor=divisor,
            seq_len=seq_len)

    if isinstance(divisor, torch.Tensor):  # a learned divisor is not a kernel input
        return fallback()
    if not use_xmax:
        shift = SHIFT_NONE
    elif xmax_guess:  # upstream tests truthiness: 0 means "use the real max"
        shift = SHIFT_GUESS_OR_MAX if overflow_recompute else SHIFT_GUESS
    else:
        shift = SHIFT_MAX
    c = log_strength / temperature if isinstance(temperature, torch.Tensor) else log_strength / float(temperature)
    return _rownorm("strongermax", scores, mask, fallback, c=c, obo=obo,
                    transform=IDENTITY if clamp_value is None else CLAMP,
                    tparam=0.0 if clamp_value is None else clamp_value, shift=shift, guess=xmax_guess or 0.0,
                    overflow=overflow_value, divide=div_by_sum_of_terms, post=_scale(divisor, seq_len),
                    promote=(temperature,))
