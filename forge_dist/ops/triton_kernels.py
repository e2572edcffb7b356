"""Triton kernels of the fused score-normaliser attention (forge_dist.ops.triton_attention launches them).
UNVERIFIED ON GPU: tested on CPU through Triton's interpreter (TRITON_INTERPRET=1) only.

out_i = sum_j f(s_ij) v_j / D_i streamed over key blocks (flash attention, Dao et al. 2022), with
s_ij = cap tanh(q_i . k_j scale / cap) + bias_ij. The variant is picked by tl.constexpr codes from the
one description the CPU kernel reads (csrc/include/forge/scores.h): ElemKind and the ElemSpec constant
layout (forge_dist.ops.scores), RowTransform and ShiftMode; every formula (forge_dist.ops.triton_formulas)
is the functor of the same name there, returning the value and its derivatives so forward and backward
share it.
- elementwise: f = F(s) with its constant or learned (beta, gamma) denominator, or divided by its row
  sum + an addend (pfla_softmax); no running state.
- row-normalised: t = T(s), e = exp(c (t - m)), D = obo + sum e (+ the flash-LOBO sink's e). The
  forward keeps a running max with the usual rescale and converts at the end to the variant's shift m
  (max, 0, a guess, or the max past an overflow threshold); stats [m, D, ties of the max] let the
  backward recompute e per tile, as flash attention keeps its log-sum-exp.
Backward (the CPU kernel's formulas): dP = dO v^T, delta = dO . out; elementwise ds = F'(s) dP;
row-normalised da = (post dP - delta) e / D, ds = c (da - [t = m] sum(da) / ties) T'(s).
"""
from __future__ import annotations

import triton
import triton.language as tl

from forge_dist.ops import attention as _family
from forge_dist.ops import scores as _codes
from forge_dist.ops.triton_formulas import (F_CAP, F_GUESS, F_OVERFLOW, F_POST, F_SCALE, F_TPARAM, PFLA,
                                            elem_formula, knot_grads, row_transform)

# the codes of csrc/include/forge/scores.h, from their Python tables (forge_dist.ops.scores, .attention)
ELEMENTWISE = tl.constexpr(_family.ELEMENTWISE)
ROWNORM = tl.constexpr(_family.ROWNORM)
SHIFT_NONE = tl.constexpr(_codes.SHIFT_NONE)
SHIFT_MAX = tl.constexpr(_codes.SHIFT_MAX)
SHIFT_GUESS_OR_MAX = tl.constexpr(_codes.SHIFT_GUESS_OR_MAX)
NO_WINDOW = 1 << 30  # the window argument without a window: every earlier key is in it
N_ROW_PARTS = 4
ROW_PARTS = tl.constexpr(N_ROW_PARTS)  # per query row, summed by the launcher: [dbeta or dc, dgamma, dobo, dsink]


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """tl.dot; PREC "upcast": both operands in float32 first (Triton's CPU interpreter multiplies
    bfloat16, which numpy lacks, as the integers it stores them in: the launcher asks for this there
    only; exact, as the products of bf16 values are in float32)."""
    if PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def tile_scores(q, k, Bias, F, bias_base, offs_m, offs_n, T, S, q_offset, n_sink, window, CAUSAL: tl.constexpr,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    """The scores of query rows offs_m (q) against keys offs_n (k): (s, tanh of the capped argument,
    visible) with the mask of forge_dist/ops/mask.py (csrc visible_cols) applied in the tile."""
    x = mm(q, tl.trans(k), PREC).to(tl.load(F + F_SCALE).dtype) * tl.load(F + F_SCALE)
    th = x
    if SOFTCAP:  # Gemma 2: cap tanh(x / cap); tanh(y) = 1 - 2 / (e^{2y} + 1)
        cap = tl.load(F + F_CAP)
        th = 1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0)
        x = cap * th
    key = offs_n[None, :] - n_sink
    pos = offs_m[:, None] + q_offset
    vis = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    keep = key >= pos - window  # no window: window = NO_WINDOW
    if CAUSAL:
        keep = keep & (key <= pos)
    vis = vis & (keep | (key < 0))
    if HAS_BIAS:
        x += tl.load(Bias + bias_base + offs_m[:, None] * S + offs_n[None, :], mask=vis, other=0.0)
    return tl.where(vis, x, 0.0), th, vis


@triton.jit
def key_blocks(m0, S, q_offset, n_sink, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Key blocks query rows m0..m0+BLOCK_M see: the sink blocks, then [window start, causal end).
    Returns (n sink blocks, first block after them, number of blocks)."""
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, n_sink + q_offset + m0 + BLOCK_M)
    lo = tl.maximum(n_sink + q_offset + m0 - window, 0)
    n_a = tl.cdiv(tl.minimum(n_sink, S), BLOCK_N)
    start = tl.maximum((lo // BLOCK_N) * BLOCK_N, n_a * BLOCK_N)
    return n_a, start, n_a + tl.maximum(tl.cdiv(hi - start, BLOCK_N), 0)


@triton.jit
def query_range(j0, T, q_offset, n_sink, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """[lo, hi) of the query rows that see any key of the block j0..j0+BLOCK_N (lo block-aligned)."""
    lo = j0 * 0  # tensors from the start: a runtime if needs one type per variable
    hi = j0 * 0 + T
    if j0 >= n_sink:  # no sink column in the block: causal and the window bound the rows
        if CAUSAL:
            lo = tl.maximum(j0 - n_sink - q_offset, 0)
        hi = tl.minimum(j0 + BLOCK_N - n_sink - q_offset + window, T)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _row_shift(mx, F, SHIFT: tl.constexpr):
    """(m, uses the max) from the visible max mx (csrc row_shift; -inf: nothing visible)."""
    guess = tl.load(F + F_GUESS)
    if SHIFT == SHIFT_NONE:
        guess = guess * 0.0
    use = mx < -float("inf")  # False
    if SHIFT == SHIFT_MAX:
        use = mx > -float("inf")
    elif SHIFT == SHIFT_GUESS_OR_MAX:
        use = (mx > -float("inf")) & (mx - guess > tl.load(F + F_OVERFLOW))
    return tl.where(use, mx, guess), use


@triton.jit
def load_rows(P, base, offs, n, DIM: tl.constexpr, BLOCK_DIM: tl.constexpr):
    """(len(offs), BLOCK_DIM) rows of a contiguous (n, DIM) matrix at P + base, zero-padded."""
    cols = tl.arange(0, BLOCK_DIM)
    return tl.load(P + base + offs[:, None] * DIM + cols[None, :], mask=(offs[:, None] < n) & (cols[None, :] < DIM),
                   other=0.0)


@triton.jit
def head_params(Params, C, Obo, F, n_params, p_width, n_obo, h, FAMILY: tl.constexpr):
    """(beta, gamma) of an elementwise variant, (c, obo) of a row-normalised one, for head h; and the
    offset of the head's parameter row (width p_width: [beta, gamma, table...])."""
    row = tl.where(n_params == 1, 0, h) * p_width
    if FAMILY == ELEMENTWISE:
        p0, p1 = tl.load(Params + row), tl.load(Params + row + 1)
    else:
        p0, p1 = tl.load(C), tl.load(Obo + tl.where(n_obo == 1, 0, h))
    return p0, p1, row


@triton.jit
def row_consts(Stats, Delta, bh, offs_m, T, obo, DIVIDE: tl.constexpr):
    """Per query row of the row-normalised backward: (m, 1/D or 1, delta or 0 (the division's term),
    sum(da) over keys and sink / ties: the share of the max's gradient, delta)."""
    ok = offs_m < T
    row = (bh * T + offs_m) * 3
    m = tl.load(Stats + row, mask=ok, other=0.0)
    den = tl.load(Stats + row + 1, mask=ok, other=1.0)
    ties = tl.load(Stats + row + 2, mask=ok, other=0.0)
    delta = tl.load(Delta + bh * T + offs_m, mask=ok, other=0.0)
    if DIVIDE:
        inv = 1.0 / den
        dl = delta
        sum_da = delta * obo * inv
    else:
        inv = den * 0.0 + 1.0
        dl = delta * 0.0
        sum_da = delta
    return m, inv, dl, tl.where(ties > 0.0, sum_da / tl.where(ties > 0.0, ties, 1.0), 0.0), delta


@triton.jit
def tile_grad(s, dp, vis, F, p0, p1, Table, n_knots, m, inv, dl, share, FAMILY: tl.constexpr, KIND: tl.constexpr,
              SQUARE: tl.constexpr, TRANSFORM: tl.constexpr):
    """(weights of v, dL/ds, and two per-element terms of the small gradients) of one tile: elementwise
    (dbeta, dgamma), its dL/df = (dP - delta) / D with a row-sum division (inv = 1/D, dl = delta), else
    dP (inv 1, dl 0); row-normalised (dc, 0). p0, p1: head_params."""
    zero = s * 0.0
    if FAMILY == ELEMENTWISE:
        y, d, db, dg = elem_formula(s, F, p0, p1, Table, n_knots, KIND, SQUARE)
        gy = (dp - dl[:, None]) * inv[:, None]
        w, ds, r0, r1 = y * inv[:, None], d * gy, db * gy, dg * gy
    else:
        t, dt = row_transform(s, tl.load(F + F_TPARAM), TRANSFORM)
        q = tl.where(vis, tl.exp((tl.where(vis, t, m[:, None]) - m[:, None]) * p0) * inv[:, None], zero)
        da = (tl.load(F + F_POST) * dp - dl[:, None]) * q
        w = q * tl.load(F + F_POST)
        ds = p0 * (da - tl.where(vis & (t == m[:, None]), share[:, None], zero)) * dt
        r0, r1 = da * (t - m[:, None]), zero
    return tl.where(vis, w, zero), tl.where(vis, ds, zero), tl.where(vis, r0, zero), tl.where(vis, r1, zero)


@triton.jit
def unfinish(ds, th, F, SOFTCAP: tl.constexpr):
    """dL/ds -> dL/d(q.k): back through cap tanh(. / cap) and the scale."""
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    return ds * tl.load(F + F_SCALE)


@triton.jit
def bias_plane(b, h, T, S, bias_heads, bias_batch):
    """The offset of batch b, query head h's (T, S) plane of a (1 or H, T, S) or (B, 1 or H, T, S) bias."""
    return (tl.where(bias_batch == 1, b, 0) * bias_heads + tl.where(bias_heads == 1, 0, h)) * T * S


@triton.jit
def query_block(Hq, Hkv, T, S, bias_heads, bias_batch, BLOCK_M: tl.constexpr):
    """The BLOCK_M query rows of one (batch, query head) this program of attn_fwd / attn_bwd_dq takes:
    (m0, bh, h, offset of its KV head's rows, offset of its bias plane, row offsets). Grid axis 0 (up to
    2^31 - 1) is batch x heads, so the offsets are int64."""
    m0 = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    kv = (b * Hkv + h // (Hq // Hkv)) * S  # GQA: the query heads of a group read one KV head
    return m0, bh, h, kv, bias_plane(b, h, T, S, bias_heads, bias_batch), m0 + tl.arange(0, BLOCK_M)


@triton.jit
def key_tile(blk, n_a, start, q, K, V, Bias, F, kv, bias_base, offs_m, T, S, q_offset, n_sink, window,
             D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
             PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Key block ``blk`` of key_blocks' sequence (the sink blocks, then from ``start``): (key offsets,
    K rows, V rows, and tile_scores' scores, tanh of the capped ones and visibility)."""
    offs_n = tl.where(blk < n_a, blk * BLOCK_N, start + (blk - n_a) * BLOCK_N) + tl.arange(0, BLOCK_N)
    k = load_rows(K, kv * D, offs_n, S, D, BLOCK_D)
    v = load_rows(V, kv * DV, offs_n, S, DV, BLOCK_DV)
    s, th, vis = tile_scores(q, k, Bias, F, bias_base, offs_m, offs_n, T, S, q_offset, n_sink, window, CAUSAL,
                             HAS_BIAS, SOFTCAP, PREC)
    return offs_n, k, v, s, th, vis


@triton.jit
def attn_fwd(Q, K, V, Bias, Params, C, Obo, Sink, F, Out, Stats, Hq, Hkv, T, S, n_params, p_width, n_obo, n_sinkp,
             q_offset, n_sink, window, bias_heads, bias_batch, D: tl.constexpr, DV: tl.constexpr, FAMILY: tl.constexpr,
             KIND: tl.constexpr, SQUARE: tl.constexpr, TRANSFORM: tl.constexpr, SHIFT: tl.constexpr,
             DIVIDE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
             PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head) over the key blocks they see."""
    m0, bh, h, kv, bias_base, offs_m = query_block(Hq, Hkv, T, S, bias_heads, bias_batch, BLOCK_M)
    q = load_rows(Q, bh * T * D, offs_m, T, D, BLOCK_D)
    p0, p1, prow = head_params(Params, C, Obo, F, n_params, p_width, n_obo, h, FAMILY)
    table, n_knots = Params + prow + 2, (p_width - 2) // 2
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=F.dtype.element_ty)
    zeros = tl.zeros((BLOCK_M,), dtype=F.dtype.element_ty)
    mr, l_sum, ties = zeros - float("inf"), zeros, zeros  # running max, sum of e^{c (t - mr)}, ties of mr
    tparam = tl.load(F + F_TPARAM)
    if FAMILY == ROWNORM:
        if n_sinkp > 0:  # flash-LOBO: a virtual key of logit ln C and zero value, counted in D and the max
            ts, _ = row_transform(tl.load(Sink + tl.where(n_sinkp == 1, 0, h)), tparam, TRANSFORM)
            mr, l_sum, ties = zeros + ts, zeros + 1.0, zeros + 1.0
    n_a, start, n_blocks = key_blocks(m0, S, q_offset, n_sink, window, BLOCK_M, BLOCK_N, CAUSAL)
    for blk in range(0, n_blocks):
        offs_n, k, v, s, th, vis = key_tile(blk, n_a, start, q, K, V, Bias, F, kv, bias_base, offs_m, T, S, q_offset,
                                            n_sink, window, D, DV, CAUSAL, HAS_BIAS, SOFTCAP, PREC, BLOCK_N, BLOCK_D,
                                            BLOCK_DV)
        if FAMILY == ELEMENTWISE:
            y, _d, _db, _dg = elem_formula(s, F, p0, p1, table, n_knots, KIND, SQUARE)
            y = tl.where(vis, y, 0.0)
            if DIVIDE:
                l_sum += tl.sum(y, 1)
            acc += mm(y.to(v.dtype), v, PREC).to(acc.dtype)
        else:
            t, _dt = row_transform(s, tparam, TRANSFORM)
            t = tl.where(vis, t, -float("inf"))
            m_new = tl.maximum(mr, tl.max(t, 1))
            m_safe = tl.where(m_new > -float("inf"), m_new, 0.0)
            alpha = tl.exp((mr - m_safe) * p0)
            e = tl.where(vis, tl.exp((t - m_safe[:, None]) * p0), 0.0)
            l_sum = l_sum * alpha + tl.sum(e, 1)
            acc = acc * alpha[:, None] + mm(e.to(v.dtype), v, PREC).to(acc.dtype)
            ties = tl.where(m_new == mr, ties, 0.0) + tl.sum(tl.where(vis & (t == m_new[:, None]), 1.0, 0.0), 1)
            mr = m_new
    ok = offs_m < T
    if FAMILY == ELEMENTWISE:
        if DIVIDE:  # a curve divided by its row sum (pfla_softmax): D = addend + sum f (+ f(sink))
            den = l_sum + tl.load(Obo + tl.where(n_obo == 1, 0, h))
            if n_sinkp > 0:
                ys, _d, _db, _dg = elem_formula(tl.load(Sink + tl.where(n_sinkp == 1, 0, h)), F, p0, p1, table,
                                                n_knots, KIND, SQUARE)
                den += ys
            den = tl.where(den == 0.0, 1.0, den)
            acc = acc / den[:, None]
            row = (bh * T + offs_m) * 3
            tl.store(Stats + row, zeros, mask=ok)
            tl.store(Stats + row + 1, den, mask=ok)
            tl.store(Stats + row + 2, zeros, mask=ok)
    if FAMILY == ROWNORM:  # from the running max to the variant's shift m
        m, use = _row_shift(mr, F, SHIFT)
        g = tl.where(mr > -float("inf"), tl.exp((mr - m) * p0), 0.0)
        den = zeros + 1.0
        if DIVIDE:
            den = l_sum * g + p1
            den = tl.where(den == 0.0, 1.0, den)
        acc = acc * (g * tl.load(F + F_POST) / den)[:, None]
        row = (bh * T + offs_m) * 3
        tl.store(Stats + row, m, mask=ok)
        tl.store(Stats + row + 1, den, mask=ok)
        tl.store(Stats + row + 2, tl.where(use, ties, 0.0), mask=ok)
    cols = tl.arange(0, BLOCK_DV)
    tl.store(Out + bh * T * DV + offs_m[:, None] * DV + cols[None, :], acc.to(Out.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < DV))


@triton.jit
def attn_bwd_dq(Q, K, V, Bias, Params, C, Obo, Sink, F, Stats, Delta, DO, DQ, DBias, Parts, DParams, Hq, Hkv, T, S,
                n_params, p_width, n_obo, n_sinkp, q_offset, n_sink, window, bias_heads, bias_batch, D: tl.constexpr, DV: tl.constexpr,
                FAMILY: tl.constexpr, KIND: tl.constexpr, SQUARE: tl.constexpr, TRANSFORM: tl.constexpr,
                DIVIDE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr,
                SOFTCAP: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq of BLOCK_M query rows, dbias of their tiles (atomic: summed over batch and shared heads), and
    the rows' terms of the small gradients (Parts (B, Hq, T, ROW_PARTS))."""
    m0, bh, h, kv, bias_base, offs_m = query_block(Hq, Hkv, T, S, bias_heads, bias_batch, BLOCK_M)
    ok = offs_m < T
    q = load_rows(Q, bh * T * D, offs_m, T, D, BLOCK_D)
    do = load_rows(DO, bh * T * DV, offs_m, T, DV, BLOCK_DV)
    p0, p1, prow = head_params(Params, C, Obo, F, n_params, p_width, n_obo, h, FAMILY)
    table, n_knots = Params + prow + 2, (p_width - 2) // 2
    zeros = tl.zeros((BLOCK_M,), dtype=F.dtype.element_ty)
    m, inv, dl, share, delta = zeros, zeros + 1.0, zeros, zeros, zeros
    if FAMILY == ROWNORM or DIVIDE:
        m, inv, dl, share, delta = row_consts(Stats, Delta, bh, offs_m, T, p1, DIVIDE)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=F.dtype.element_ty)
    part0, part1 = zeros, zeros
    n_a, start, n_blocks = key_blocks(m0, S, q_offset, n_sink, window, BLOCK_M, BLOCK_N, CAUSAL)
    for blk in range(0, n_blocks):
        offs_n, k, v, s, th, vis = key_tile(blk, n_a, start, q, K, V, Bias, F, kv, bias_base, offs_m, T, S, q_offset,
                                            n_sink, window, D, DV, CAUSAL, HAS_BIAS, SOFTCAP, PREC, BLOCK_N, BLOCK_D,
                                            BLOCK_DV)
        dp = mm(do, tl.trans(v), PREC).to(dq.dtype)
        _w, ds, r0, r1 = tile_grad(s, dp, vis, F, p0, p1, table, n_knots, m, inv, dl, share, FAMILY, KIND, SQUARE,
                                   TRANSFORM)
        if KIND == PFLA:  # the knot table's gradient (atomic: knots shared by every row and head)
            knot_grads(s, (dp - dl[:, None]) * inv[:, None], vis, table, DParams + prow + 2, n_knots, p1, SQUARE)
        part0 += tl.sum(r0, 1)
        part1 += tl.sum(r1, 1)
        if NEED_DBIAS:
            tl.atomic_add(DBias + bias_base + offs_m[:, None] * S + offs_n[None, :], ds, mask=vis)
        ds = unfinish(ds, th, F, SOFTCAP)
        dq += mm(ds.to(k.dtype), k, PREC).to(dq.dtype)
    cols = tl.arange(0, BLOCK_D)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + cols[None, :], dq.to(DQ.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < D))
    part2, part3 = zeros, zeros
    if FAMILY == ELEMENTWISE:
        if DIVIDE:  # dL/df at the sink (zero value) is -delta / D; the addend's gradient the same
            part2 = -delta * inv
            if n_sinkp > 0:
                xs = tl.load(Sink + tl.where(n_sinkp == 1, 0, h))
                _y, dys, dbs, dgs = elem_formula(xs, F, p0, p1, table, n_knots, KIND, SQUARE)
                gs = tl.where(ok, -delta * inv, 0.0)
                part0 += dbs * gs
                part1 += dgs * gs
                part3 = dys * gs
                if KIND == PFLA:
                    knot_grads(xs, tl.sum(gs, 0), xs == xs, table, DParams + prow + 2, n_knots, p1, SQUARE)
    if FAMILY == ROWNORM:
        if DIVIDE:
            part2 = -delta * inv  # dobo
        if n_sinkp > 0:  # the sink's own terms: da = -delta e_sink / D (it has no value)
            xs = tl.load(Sink + tl.where(n_sinkp == 1, 0, h))
            ts, dts = row_transform(xs, tl.load(F + F_TPARAM), TRANSFORM)
            da = -dl * tl.exp((ts - m) * p0) * inv
            part0 += da * (ts - m)
            part3 = p0 * (da - tl.where(ts == m, share, 0.0)) * dts
    row = (bh * T + offs_m) * ROW_PARTS
    tl.store(Parts + row, part0, mask=ok)
    tl.store(Parts + row + 1, part1, mask=ok)
    tl.store(Parts + row + 2, part2, mask=ok)
    tl.store(Parts + row + 3, part3, mask=ok)


@triton.jit
def attn_bwd_dkdv(Q, K, V, Bias, Params, C, Obo, F, Stats, Delta, DO, DK, DV_, Hq, Hkv, T, S, n_params, p_width, n_obo,
                  q_offset, n_sink, window, bias_heads, bias_batch, D: tl.constexpr, DV: tl.constexpr, FAMILY: tl.constexpr,
                  KIND: tl.constexpr, SQUARE: tl.constexpr, TRANSFORM: tl.constexpr, DIVIDE: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk, dv of BLOCK_N keys of one (batch, KV head), summed over the query heads of its group (GQA
    without repeating K/V) and the query blocks that see the keys."""
    j0 = tl.program_id(1) * BLOCK_N
    bkv = tl.program_id(0).to(tl.int64)
    b, kvh = bkv // Hkv, bkv % Hkv
    rep = Hq // Hkv
    offs_n = j0 + tl.arange(0, BLOCK_N)
    k = load_rows(K, bkv * S * D, offs_n, S, D, BLOCK_D)
    v = load_rows(V, bkv * S * DV, offs_n, S, DV, BLOCK_DV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=F.dtype.element_ty)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=F.dtype.element_ty)
    lo, hi = query_range(j0, T, q_offset, n_sink, window, BLOCK_M, BLOCK_N, CAUSAL)
    for hh in range(0, rep):
        h = kvh * rep + hh
        bh = b * Hq + h
        bias_base = bias_plane(b, h, T, S, bias_heads, bias_batch)
        p0, p1, prow = head_params(Params, C, Obo, F, n_params, p_width, n_obo, h, FAMILY)
        table, n_knots = Params + prow + 2, (p_width - 2) // 2
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = load_rows(Q, bh * T * D, offs_m, T, D, BLOCK_D)
            do = load_rows(DO, bh * T * DV, offs_m, T, DV, BLOCK_DV)
            zeros = tl.zeros((BLOCK_M,), dtype=F.dtype.element_ty)
            m, inv, dl, share = zeros, zeros + 1.0, zeros, zeros
            if FAMILY == ROWNORM or DIVIDE:
                m, inv, dl, share, _delta = row_consts(Stats, Delta, bh, offs_m, T, p1, DIVIDE)
            s, th, vis = tile_scores(q, k, Bias, F, bias_base, offs_m, offs_n, T, S, q_offset, n_sink, window,
                                     CAUSAL, HAS_BIAS, SOFTCAP, PREC)
            dp = mm(do, tl.trans(v), PREC).to(dk.dtype)
            w, ds, _r0, _r1 = tile_grad(s, dp, vis, F, p0, p1, table, n_knots, m, inv, dl, share, FAMILY, KIND, SQUARE,
                                        TRANSFORM)
            ds = unfinish(ds, th, F, SOFTCAP)
            dv += mm(tl.trans(w).to(do.dtype), do, PREC).to(dv.dtype)
            dk += mm(tl.trans(ds).to(q.dtype), q, PREC).to(dk.dtype)
    ok = offs_n < S
    cols = tl.arange(0, BLOCK_D)
    tl.store(DK + bkv * S * D + offs_n[:, None] * D + cols[None, :], dk.to(DK.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < D))
    cols = tl.arange(0, BLOCK_DV)
    tl.store(DV_ + bkv * S * DV + offs_n[:, None] * DV + cols[None, :], dv.to(DV_.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < DV))
