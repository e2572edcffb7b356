"""The per-score formulas of the Triton attention kernels (forge_dist.ops.triton_kernels), each a
Triton function returning a value and its derivatives so the forward and both backward kernels share
it: the elementwise variants (``elem_formula``, pfla_softmax's knot table in ``pfla_formula`` and its
gradient ``knot_grads``) and the row-normalised transforms (``row_transform``). Each is the functor of
the same name in csrc/include/forge/scores.h; the codes come from its Python tables (forge_dist.ops.scores).
UNVERIFIED ON GPU: tested on CPU through Triton's interpreter (TRITON_INTERPRET=1) only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from forge_dist.ops import scores as _codes

CONSMAX = tl.constexpr(_codes.ELEM_KINDS["consmax"])
SATURATING_CONSMAX = tl.constexpr(_codes.ELEM_KINDS["saturatingconsmax"])
POLYMAX = tl.constexpr(_codes.ELEM_KINDS["polymax"])
EXPPOLYMAX = tl.constexpr(_codes.ELEM_KINDS["exppolymax"])
RELUMAX = tl.constexpr(_codes.ELEM_KINDS["relumax"])
RELU2MAX = tl.constexpr(_codes.ELEM_KINDS["relu2max"])
SIGMOIDMAX = tl.constexpr(_codes.ELEM_KINDS["sigmoidmax"])
SOFTPLUS = tl.constexpr(_codes.ELEM_KINDS["softplus"])
SQUAREPLUS = tl.constexpr(_codes.ELEM_KINDS["squareplus"])
PFLA = tl.constexpr(_codes.ELEM_KINDS["pfla_softmax"])
CLAMP = tl.constexpr(_codes.CLAMP)
SIGSOFT = tl.constexpr(_codes.SIGSOFT)
# float arguments, one tensor in the accumulation type (float64 runs keep float64 constants):
# [scale, softcap, consts[0..7], tparam, guess, overflow, post]
F_SCALE, F_CAP, F_CONST, F_TPARAM, F_GUESS, F_OVERFLOW, F_POST = (tl.constexpr(i) for i in (0, 1, 2, 10, 11, 12, 13))


@triton.jit
def _pow(x, p, SQUARE: tl.constexpr):  # x^p and d/dx for x > 0 (scores.h power / dpower)
    if SQUARE:
        y, d = x * x, 2.0 * x
    else:
        y, d = tl.exp(p * tl.log(x)), p * tl.exp((p - 1.0) * tl.log(x))
    return y, d


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def pfla_formula(x, Table, n_knots, gamma, QUAD: tl.constexpr):
    """pfla_softmax (scores.h Pfla): the curve through knots Table[0:n] (positions) and Table[n:2n]
    (values v = sqrt(y)), "linear" lerp of v^2 or (QUAD) x lerp(v)^2, the first segment extended left and
    the last value held right, / gamma; 0 at non-finite x. Returns (y, dy/dx, dy/dgamma, k, and dy/d of
    v_k, v_k+1, x_k, x_k+1), k the segment [x_k, x_k+1] holding min(x, x_{n-1})."""
    fin = tl.abs(x) < float("inf")
    x = tl.where(fin, x, 0.0)
    x_last = tl.load(Table + n_knots - 1)
    held = x >= x_last
    xi = tl.where(held, x_last, x)
    cnt = tl.where(xi >= x_last, 0, 0)  # searchsorted(right=True): the knots at or below xi
    for i in range(0, n_knots):
        cnt += tl.where(tl.load(Table + i) <= xi, 1, 0)
    k = tl.minimum(tl.maximum(cnt - 1, 0), n_knots - 2)
    x0 = tl.load(Table + k)
    inv_w = 1.0 / (tl.load(Table + k + 1) - x0)
    t = (xi - x0) * inv_w
    v0 = tl.load(Table + n_knots + k)
    v1 = tl.load(Table + n_knots + k + 1)
    if QUAD:
        ln = v0 + (v1 - v0) * t
        c = x * ln * ln
        two_xl = 2.0 * x * ln
        dv0, dv1, dt, dx = two_xl * (1.0 - t), two_xl * t, two_xl * (v1 - v0), ln * ln
    else:
        c = v0 * v0 + (v1 * v1 - v0 * v0) * t
        dv0, dv1, dt, dx = 2.0 * v0 * (1.0 - t), 2.0 * v1 * t, v1 * v1 - v0 * v0, x * 0.0
    slope = tl.where(held, 0.0, dt * inv_w)  # dt/dx = 1/w, dt/dx_k = -(1 - t)/w, dt/dx_k+1 = -t/w
    g = tl.where(fin, 1.0 / gamma, 0.0)
    return (c * g, (dx + slope) * g, -c * g / gamma, k, dv0 * g, dv1 * g, -slope * (1.0 - t) * g,
            -slope * t * g)


@triton.jit
def elem_formula(x, F, beta, gamma, Table, n_knots, KIND: tl.constexpr, SQUARE: tl.constexpr):
    """(f(x), df/dx, df/dbeta, df/dgamma) of the elementwise variant KIND (scores.h functors; constants
    F + F_CONST in the ElemSpec layout; Table, n_knots: pfla_softmax's knots, SQUARE its quadratic mode)."""
    zero = x * 0.0
    c0 = tl.load(F + F_CONST)
    if KIND == PFLA:
        y, d, dg, _k, _a, _b, _c, _d = pfla_formula(x, Table, n_knots, gamma, SQUARE)
        y, d, db, dg = y, d, zero, dg
    elif KIND == CONSMAX:  # b^{min(x - beta, clamp)} / gamma; consts [ln b, clamp]
        clampv = tl.load(F + F_CONST + 1)
        y = tl.exp(tl.minimum(x - beta, clampv) * c0) / gamma
        d = tl.where(x - beta <= clampv, c0 * y, zero)
        y, d, db, dg = y, d, -d, -y / gamma
    elif KIND == SATURATING_CONSMAX:  # (b^{x - beta} below x_sat, else x_sat) / gamma / L; [ln b, x_sat, 1/L]
        xs = tl.load(F + F_CONST + 1)
        inv_l = tl.load(F + F_CONST + 2)
        v = tl.where(x < xs, tl.exp((x - beta) * c0), zero + xs)
        y = v / gamma * inv_l
        d = tl.where(x < xs, c0 * y, zero)
        y, d, db, dg = y, d, -d, -y / gamma
    elif KIND == POLYMAX:  # 0 below x0, slope x + y0 on [x0, 0], x^p + y0 above; [x0, y0, p, slope, scale]
        y0 = tl.load(F + F_CONST + 1)
        p = tl.load(F + F_CONST + 2)
        slope = tl.load(F + F_CONST + 3)
        sc = tl.load(F + F_CONST + 4)
        pw, dpw = _pow(tl.where(x > 0.0, x, zero + 1.0), p, SQUARE)
        y = tl.where(x < c0, zero, tl.where(x > 0.0, pw + y0, slope * x + y0)) * sc
        d = tl.where(x < c0, zero, tl.where(x > 0.0, dpw, zero + slope)) * sc
        y, d, db, dg = y, d, zero, zero
    elif KIND == EXPPOLYMAX:  # b^x below 0, (x + s)^p + y0 from 0; [ln b, p, y0, s, scale]
        p = tl.load(F + F_CONST + 1)
        y0 = tl.load(F + F_CONST + 2)
        s = tl.load(F + F_CONST + 3)
        sc = tl.load(F + F_CONST + 4)
        neg = x < 0.0
        expo = tl.exp(tl.where(neg, x, zero) * c0)
        pw, dpw = _pow(tl.where(neg, zero + 1.0, x) + s, p, SQUARE)
        y, d, db, dg = tl.where(neg, expo, pw + y0) * sc, tl.where(neg, c0 * expo, dpw) * sc, zero, zero
    elif KIND == RELUMAX:  # consts [scale]
        y, d, db, dg = tl.maximum(x, zero) * c0, tl.where(x > 0.0, zero + c0, zero), zero, zero
    elif KIND == RELU2MAX:
        r = tl.maximum(x, zero)
        y, d, db, dg = r * r * c0, 2.0 * r * c0, zero, zero
    elif KIND == SIGMOIDMAX:
        sg = _sigmoid(x)
        y, d, db, dg = sg * c0, c0 * sg * (1.0 - sg), zero, zero
    elif KIND == SOFTPLUS:  # torch's threshold 20: x itself above it
        y = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, zero + 20.0))))
        y, d, db, dg = y * c0, tl.where(x > 20.0, zero + 1.0, _sigmoid(x)) * c0, zero, zero
    else:  # SQUAREPLUS (Barron 2021): (x + sqrt(x^2 + b)) / 2; consts [scale, b]
        r = tl.sqrt(x * x + tl.load(F + F_CONST + 1))
        y, d, db, dg = 0.5 * (x + r) * c0, 0.5 * (1.0 + x / r) * c0, zero, zero
    return y, d, db, dg


@triton.jit
def row_transform(x, p, TRANSFORM: tl.constexpr):
    """(t(x), dt/dx) of the row-normalised family (scores.h RowT): x, min(x, clamp), or sigsoftmax's
    u + ln sigma(u), u = x ln b (Kanai et al. 2018)."""
    if TRANSFORM == CLAMP:
        t, dt = tl.minimum(x, p), tl.where(x <= p, x * 0.0 + 1.0, x * 0.0)
    elif TRANSFORM == SIGSOFT:
        u = x * p
        t, dt = u + tl.minimum(u, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(u))), p * (2.0 - _sigmoid(u))
    else:
        t, dt = x, x * 0.0 + 1.0
    return t, dt


@triton.jit
def knot_grads(s, gy, vis, Table, DTable, n_knots, gamma, SQUARE: tl.constexpr):
    """DTable (positions, then values) += the knots' gradients for dL/df = gy at scores s (pfla_formula)."""
    _y, _d, _dg, k, dv0, dv1, dx0, dx1 = pfla_formula(s, Table, n_knots, gamma, SQUARE)
    tl.atomic_add(DTable + k, dx0 * gy, mask=vis)
    tl.atomic_add(DTable + k + 1, dx1 * gy, mask=vis)
    tl.atomic_add(DTable + n_knots + k, dv0 * gy, mask=vis)
    tl.atomic_add(DTable + n_knots + k + 1, dv1 * gy, mask=vis)
