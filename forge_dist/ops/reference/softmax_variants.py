"""Reference score normalisers: what a fused softmax-variant kernel must reproduce.

Every function is pure and takes
    scores  raw scaled scores, (..., Tk): attention (B, H, Tq, Tk) or output logits (B, V), (B, T, V)
    keep    bool broadcastable to scores, True where a key is visible; None = every key visible
and the variant's parameters as Python floats or tensors broadcastable to scores (a per-head
parameter arrives as (H, 1, 1)). ``seq_len`` is L for the optional "divide by L" (None: no division).

Contract shared by all of them:
- a hidden key (keep False, or a score of -inf) gives exactly 0, with a finite gradient: the hidden
  entries of the argument of every non-linearity are replaced by a safe finite value before the
  formula and the output is zeroed after, so no inf - inf or 0 * inf appears forward or backward;
- row-normalised variants sum over visible keys only, and a fully hidden row gives zeros;
- every other variant is elementwise (no sum over keys), as in ReaLLM-Forge.
A torch.where never lets the unselected branch of a piecewise formula see an input that would
overflow or hit a pole there (its 0 gradient times an infinite local derivative would be NaN).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

Param = Union[float, torch.Tensor]
SQUAREPLUS_B = 4.0 * math.log(2.0) ** 2  # Barron 2021 (arXiv 2112.11687): b = 4 ln^2 2 ~ softplus


# --- shared mechanisms ------------------------------------------------------------------------
def visible(scores: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """keep, and also hide every score that is already -inf (a caller that pre-masked)."""
    vis = ~torch.isneginf(scores)
    return vis if keep is None else vis & keep


def fill_hidden(x: torch.Tensor, keep: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """x with hidden entries replaced by a finite value (no gradient reaches them)."""
    return torch.where(keep, x, value)


def zero_hidden(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, y, 0.0)


def row_max(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # (..., Tk) -> (..., 1)
    """Max over visible keys; a fully hidden row gets the dtype's lowest finite value."""
    return fill_hidden(x, keep, torch.finfo(x.dtype).min).amax(-1, keepdim=True)


def exp_visible(u: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """e^u at visible keys, 0 at hidden ones (whose u is replaced by 0 before the exp)."""
    return zero_hidden(torch.exp(fill_hidden(u, keep)), keep)


def shifted(x: torch.Tensor, shift: Param, keep: torch.Tensor) -> torch.Tensor:
    """x - shift at visible keys, 0 at hidden ones (a fully hidden row's shift is never used)."""
    return fill_hidden(x - shift, keep)


def normalize_rows(e: torch.Tensor, obo: Param = 0.0, eps: float = 0.0) -> torch.Tensor:
    """e / (obo + sum_j e_j + eps), with e already 0 at hidden keys; a 0 denominator (a fully
    hidden row without obo) becomes 1, so that row stays 0 instead of 0/0."""
    den = e.sum(-1, keepdim=True) + eps + obo
    return e / torch.where(den == 0, 1.0, den)


def scale_down(y: torch.Tensor, divisor: Param, seq_len: Optional[int]) -> torch.Tensor:
    """y / D, then / L when ``div_by_seq_len`` (upstream's order of the two divisions)."""
    y = y / divisor
    return y if seq_len is None else y / seq_len


def round_ste(p: torch.Tensor, scale: float) -> torch.Tensor:
    """round(p * scale) / scale forward, identity gradient (straight-through, Bengio et al. 2013)."""
    return p + (torch.round(p * scale) / scale - p).detach()


def exppolymax_shift(log_base: float, power: float) -> float:
    """s with d/dx (x + s)^p = d/dx b^x at x = 0: p s^(p-1) = ln b, s = (ln b / p)^(1/(p-1)); 0 for p=1.

    Raises ValueError when s is not a real number (ln b / p < 0 with a fractional root).
    """
    if power == 1.0:
        return 0.0
    ratio, root = log_base / power, 1.0 / (power - 1.0)
    if ratio < 0 and not root.is_integer():
        raise ValueError(f"(ln b / p)^(1/(p-1)) = ({ratio:.4g})^({root:.4g}) is not real")
    return ratio ** root


# --- row-normalised variants ------------------------------------------------------------------
def softmax(scores: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """e^{x - max} / sum_visible e^{x - max} (torch's fused softmax; hidden logits at the lowest
    finite value so a fully hidden row is uniform inside and zeroed, never NaN)."""
    keep = visible(scores, keep)
    probs = torch.softmax(fill_hidden(scores, keep, torch.finfo(scores.dtype).min), dim=-1)
    return zero_hidden(probs, keep)


def softermax(scores: torch.Tensor, keep: Optional[torch.Tensor], use_xmax: bool = True) -> torch.Tensor:
    """Base-2 softmax (Stevens et al. 2021): 2^{x - max} / sum 2^{x - max}; without ``use_xmax``
    the max is not subtracted (as upstream: it overflows where 2^x does)."""
    keep = visible(scores, keep)
    x = fill_hidden(scores, keep)
    shift = row_max(x, keep) if use_xmax else 0.0
    return normalize_rows(exp_visible(shifted(x, shift, keep) * math.log(2.0), keep))


def strongermax(
    scores: torch.Tensor,
    keep: Optional[torch.Tensor],
    *,
    log_strength: float = 1.0,  # ln S; S = e gives softmax
    temperature: Param = 1.0,  # tau
    use_xmax: bool = True,
    xmax_guess: Optional[float] = None,  # None or 0: the real row max (upstream tests truthiness)
    overflow_recompute: bool = False,
    overflow_value: float = 88.0,
    clamp_value: Optional[float] = None,
    div_by_sum_of_terms: bool = True,
    obo: Param = 0.0,  # off-by-one addend (Miller 2023), scalar or (H, 1, 1)
    divisor: Param = 1.0,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """Parameterised softmax: r = S^{(x' - m)/tau}, r / (obo + sum r), / L, / D.

    x' = min(x, clamp_value) when clamping. m is the row max over visible keys, or the fixed
    ``xmax_guess``; with ``overflow_recompute`` a row uses its real max instead of the guess when
    max_j(x'_j) - guess > overflow_value (decided per row; upstream decides for the whole batch).
    """
    keep = visible(scores, keep)
    x = fill_hidden(scores, keep)
    if clamp_value is not None:
        x = x.clamp(max=clamp_value)
    shift: Param = 0.0
    if use_xmax:
        if xmax_guess:
            shift = xmax_guess
            if overflow_recompute:
                m = row_max(x, keep)
                shift = torch.where(m - xmax_guess > overflow_value, m, xmax_guess)
        else:
            shift = row_max(x, keep)
    r = exp_visible(shifted(x, shift, keep) / temperature * log_strength, keep)
    if div_by_sum_of_terms:
        r = normalize_rows(r, obo)
    return scale_down(r, divisor, seq_len)


def sigsoftmax(scores: torch.Tensor, keep: Optional[torch.Tensor], log_base: float = 1.0) -> torch.Tensor:
    """SigSoftmax (Kanai et al. 2018, arXiv 1805.10829): b^x sigma_b(x) / sum_j b^x_j sigma_b(x_j),
    sigma_b(x) = 1 / (1 + b^-x). Evaluated as a softmax of z = u + log sigma(u), u = x ln b, which
    is the same value without overflowing where b^x does."""
    keep = visible(scores, keep)
    u = fill_hidden(scores, keep) * log_base
    z = u + F.logsigmoid(u)
    return normalize_rows(exp_visible(shifted(z, row_max(z, keep), keep), keep))


# --- elementwise variants ---------------------------------------------------------------------
def consmax(
    scores: torch.Tensor,
    keep: Optional[torch.Tensor],
    beta: Param,
    gamma: Param,
    log_base: float = 1.0,
    clamp_value: Optional[float] = None,
) -> torch.Tensor:
    """ConSmax (Liu et al. 2024, arXiv 2402.10930): b^{x - beta} / gamma, no sum over keys.

    beta, gamma: scalars (consmax, consmax_quan) or per head (H, 1, 1) (consmax_v2, which may also
    clamp x - beta from above at ``clamp_value``).
    """
    keep = visible(scores, keep)
    u = shifted(scores, beta, keep)
    if clamp_value is not None:
        u = u.clamp(max=clamp_value)
    return exp_visible(u * log_base, keep) / gamma


def saturating_consmax(
    scores: torch.Tensor,
    keep: Optional[torch.Tensor],
    beta: Param,
    gamma: Param,
    x_sat: float,
    log_base: float = 1.0,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """(b^{x - beta} for x < x_sat, else x_sat) / gamma, / L; x_sat = saturation + initial beta.

    As upstream, the flat piece is the value x_sat itself (a jump at x_sat, not a continuation).
    """
    keep = visible(scores, keep)
    x = fill_hidden(scores, keep)
    below = x < x_sat
    e = torch.exp(shifted(x.clamp(max=x_sat), beta, keep) * log_base)  # clamp: no overflow when unselected
    return zero_hidden(scale_down(torch.where(below, e, x_sat), gamma, seq_len), keep)


def _elementwise(f: Callable[[torch.Tensor], torch.Tensor], scores, keep, divisor, seq_len) -> torch.Tensor:
    """f(x) / D (/ L) with hidden scores evaluated at 0 and zeroed: the mechanism of every
    elementwise normaliser without learned parameters."""
    keep = visible(scores, keep)
    return zero_hidden(scale_down(f(fill_hidden(scores, keep)), divisor, seq_len), keep)


def polymax(scores, keep, x_intercept: float, y_intercept: float, power: float, divisor: float,
            seq_len: Optional[int] = None) -> torch.Tensor:
    """Polymax, piecewise: 0 for x < x0; (y0 / -x0) x + y0 on [x0, 0] (a ramp from 0 up to y0);
    x^p + y0 for x > 0; then / D (/ L). x0 < 0."""
    return _piecewise_poly(scores, keep, y_intercept / -x_intercept, x_intercept, y_intercept, power,
                           divisor, seq_len)


def vpolymax(scores, keep, x_intercept: float, y_intercept: float, power: float, divisor: float,
             seq_len: Optional[int] = None) -> torch.Tensor:
    """Polymax with a V: the linear piece has slope y0 / x0 < 0, falling from 2 y0 at x0 to y0 at 0
    (0 below x0, x^p + y0 above 0), / D (/ L)."""
    return _piecewise_poly(scores, keep, y_intercept / x_intercept, x_intercept, y_intercept, power,
                           divisor, seq_len)


def _piecewise_poly(scores, keep, slope, x0, y0, p, divisor, seq_len):
    def f(x):
        pos = x > 0
        poly = torch.where(pos, x, 1.0) ** p + y0  # x = 1 where unselected: finite slope for any p
        return torch.where(x < x0, 0.0, torch.where(pos, poly, slope * x + y0))

    return _elementwise(f, scores, keep, divisor, seq_len)


def exppolymax(scores, keep, log_base: float, power: float, y_intercept: float, divisor: float,
               seq_len: Optional[int] = None) -> torch.Tensor:
    """b^x for x < 0; (x + s)^p + y0 for x >= 0 with s = exppolymax_shift(ln b, p) (slopes match at
    0); then / D (/ L). b^x is computed as e^{x ln b}, so any base b > 0 works."""
    s = exppolymax_shift(log_base, power)

    def f(x):
        neg = x < 0
        expo = torch.exp(torch.where(neg, x, 0.0) * log_base)
        poly = (torch.where(neg, 1.0, x) + s) ** power + y_intercept
        return torch.where(neg, expo, poly)

    return _elementwise(f, scores, keep, divisor, seq_len)


def relumax(scores, keep, divisor: float, seq_len: Optional[int] = None) -> torch.Tensor:
    """relu(x) / D (/ L) (ReLU attention, Shen et al. 2023, arXiv 2302.06461, with a fixed D)."""
    return _elementwise(torch.relu, scores, keep, divisor, seq_len)


def relu2max(scores, keep, divisor: float, seq_len: Optional[int] = None) -> torch.Tensor:
    """relu(x)^2 / D (/ L)."""
    return _elementwise(lambda x: torch.relu(x) ** 2, scores, keep, divisor, seq_len)


def sigmoidmax(scores, keep, divisor: float, seq_len: Optional[int] = None) -> torch.Tensor:
    """sigma(x) / D (/ L)."""
    return _elementwise(torch.sigmoid, scores, keep, divisor, seq_len)


def softplus(scores, keep, divisor: float, seq_len: Optional[int] = None) -> torch.Tensor:
    """softplus(x) = ln(1 + e^x), / D (/ L)."""
    return _elementwise(F.softplus, scores, keep, divisor, seq_len)


def squareplus(scores, keep, divisor: float, seq_len: Optional[int] = None,
               b: float = SQUAREPLUS_B) -> torch.Tensor:
    """Squareplus (Barron 2021): (x + sqrt(x^2 + b)) / 2, / D (/ L). Finite at hidden keys
    (upstream evaluates it at -inf: -inf + inf = NaN)."""
    return _elementwise(lambda x: 0.5 * (x + torch.sqrt(x * x + b)), scores, keep, divisor, seq_len)


# --- PFLA-softmax: a learnable piecewise-linear curve -----------------------------------------
def pfla_knots(n: int, left: float, right: float, density: str) -> torch.Tensor:  # (n,)
    """n interior knots: evenly spaced on (left, right) ("linear"), or on (-r, r), r = max(|left|,
    right), denser near 0: sign(u) u^2 ("quad") or sign(u) (e^|u| - 1) / (e - 1) ("exp")."""
    if density == "linear":
        return torch.linspace(left, right, n + 2)[1:-1]
    u = torch.linspace(-1.0, 1.0, n + 2)[1:-1]
    r = max(abs(left), right)
    if density == "quad":
        return torch.sign(u) * u.abs() ** 2 * r
    if density == "exp":
        return torch.sign(u) * (torch.exp(u.abs()) - 1) / (math.e - 1) * r
    raise ValueError(f"pfla_softmax_density={density!r}; valid values: linear, quad, exp")


def lerp_knots(x: torch.Tensor, x_knots: torch.Tensor, y_knots: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear curve through (x_k, y_k): interpolation inside the segment holding x,
    the first segment extended to the left, the last value held to the right (as upstream)."""
    n = x_knots.numel()
    xi = torch.minimum(x, x_knots[-1].to(x.dtype))
    k = torch.searchsorted(x_knots.detach().to(x.dtype), xi.detach().contiguous(), right=True)
    k = (k - 1).clamp(0, n - 2)  # segment [x_k, x_k+1] holding x
    x0, x1 = x_knots[k], x_knots[k + 1]
    y0, y1 = y_knots[k], y_knots[k + 1]
    return y0 + (y1 - y0) * (xi - x0) / (x1 - x0)


def pfla_softmax(
    scores: torch.Tensor,
    keep: Optional[torch.Tensor],
    x_knots: torch.Tensor,  # (n,) increasing
    sqrt_y: torch.Tensor,  # (n,) the stored knot values are sqrt(y), so y >= 0
    mode: str = "linear",
    gamma_raw: Optional[torch.Tensor] = None,
    obo_log: Optional[Param] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """y(x) = lerp(x; x_k, sqrt_y_k^2) ("linear") or x * lerp(x; x_k, sqrt_y_k)^2 ("quadratic"),
    then y / (relu(gamma_raw) + eps) with a learned divisor, else y / (sum_visible y + eps [+ e^obo_log]).

    Any non-finite score counts as hidden (as upstream). The off-by-one addend is e^obo_log: upstream
    maps the stored value through exp (pfla_softmax_obo = 0 gives +1, Miller's softmax_1).
    """
    y = pfla_curve(scores, keep, x_knots, sqrt_y, mode)
    if gamma_raw is not None:
        return y / (torch.relu(gamma_raw) + eps)
    return y / (y.sum(-1, keepdim=True) + pfla_addend(y, eps, obo_log))


def pfla_curve(scores, keep, x_knots, sqrt_y, mode: str = "linear") -> torch.Tensor:
    """pfla_softmax's unnormalised curve y(x), 0 at hidden and non-finite scores."""
    finite = torch.isfinite(scores)
    keep = finite if keep is None else finite & keep
    x = fill_hidden(scores, keep)
    if mode == "linear":
        y = lerp_knots(x, x_knots, sqrt_y * sqrt_y)
    elif mode == "quadratic":
        y = x * lerp_knots(x, x_knots, sqrt_y) ** 2
    else:
        raise ValueError(f"pfla_softmax_mode={mode!r}; valid values: linear, quadratic")
    return zero_hidden(y, keep)


def pfla_addend(like: torch.Tensor, eps: float = 1e-6, obo_log: Optional[Param] = None):
    """What pfla_softmax adds to the row sum: eps (+ e^obo_log)."""
    if obo_log is None:
        return eps
    return eps + torch.exp(torch.as_tensor(obo_log, dtype=like.dtype, device=like.device))
