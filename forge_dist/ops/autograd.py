"""Fake-tensor (meta) and autograd registrations of the ``forge_ops`` operators.

The C++ library (csrc/ops.cpp) gives schemas and device kernels; here each forward op gets a shape
function, so it traces under torch.compile and runs on the meta device, and a backward that calls
its ``*_bwd`` op. Registered once, after the library is loaded (forge_dist.ops.registry).
"""
from __future__ import annotations

import math

import torch
from torch.library import register_autograd, register_fake

_REGISTERED = False


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor):
    return math.prod(t.shape[:-1]) if t.dim() else 1


def _grad_or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


# --- norms -----------------------------------------------------------------------------------------
def _norm_fwd_fake(x, residual, weight, bias, k, eps, center, out_dtype):
    rows = _rows(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return (x.new_empty(x.shape, dtype=out_dtype or x.dtype), h,
            x.new_empty((rows if center else 0,), dtype=_acc(x)), x.new_empty((rows,), dtype=_acc(x)))


def _norm_bwd_fake(grad, h, weight, mean, rstd, grad_h, k, center, need_dw, need_db):
    d = h.shape[-1]
    wdtype = weight.dtype if weight is not None else h.dtype
    return (torch.empty_like(h), h.new_empty((d if need_dw else 0,), dtype=wdtype),
            h.new_empty((d if need_db else 0,), dtype=wdtype))


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, k, _eps, center, _out = inputs
    _y, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.k, ctx.center, ctx.has_residual, ctx.has_bias = k, center, residual is not None, bias is not None


def _norm_backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    extra = grad_h if ctx.has_residual else None
    dx, dw, db = torch.ops.forge_ops.norm_bwd(
        _grad_or_zeros(grad_y, h), h, weight, mean, rstd, extra, ctx.k, ctx.center,
        weight is not None and need[2], ctx.has_bias and need[3])
    return (dx, dx if ctx.has_residual else None, dw if dw.numel() else None, db if db.numel() else None,
            None, None, None, None)


# --- score normalisers -----------------------------------------------------------------------------
def _elem_fwd_fake(scores, params, kind, consts, mask, out_dtype):
    return scores.new_empty(scores.shape, dtype=out_dtype or scores.dtype)


def _elem_bwd_fake(grad, scores, params, kind, consts, mask, need_dparams):
    return torch.empty_like(scores), torch.empty_like(params)


def _elem_setup(ctx, inputs, output):
    scores, params, kind, consts, mask, _out = inputs
    ctx.save_for_backward(scores, params)
    ctx.args = (kind, consts, mask)


def _elem_backward(ctx, grad):
    scores, params = ctx.saved_tensors
    dscores, dparams = torch.ops.forge_ops.score_elementwise_bwd(grad, scores, params, *ctx.args,
                                                                 ctx.needs_input_grad[1])
    return dscores, (dparams if ctx.needs_input_grad[1] else None), None, None, None, None


def _row_fwd_fake(scores, c, obo, mask, transform, shift_mode, divide, tparam, guess, overflow, post, out_dtype):
    return (scores.new_empty(scores.shape, dtype=out_dtype or scores.dtype),
            scores.new_empty((_rows(scores), 3), dtype=_acc(scores)))


def _row_bwd_fake(grad, scores, c, obo, stats, mask, transform, divide, tparam, post, need_dc, need_dobo):
    return torch.empty_like(scores), torch.empty_like(c), torch.empty_like(obo)


def _row_setup(ctx, inputs, output):
    scores, c, obo, mask, transform, _shift, divide, tparam, _guess, _overflow, post, _out = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(scores, c, obo, stats)
    ctx.args = (mask, transform, divide, tparam, post)


def _row_backward(ctx, grad, _grad_stats):
    scores, c, obo, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    dscores, dc, dobo = torch.ops.forge_ops.score_rownorm_bwd(grad, scores, c, obo, stats, *ctx.args, need[1], need[2])
    return (dscores, dc if need[1] else None, dobo if need[2] else None) + (None,) * 9


# --- fused attention (forge_dist/ops/attention.py) -----------------------------------------------
ROWNORM = 1  # attention family code of the row-normalised variants (ops/attention.py)


def _attn_fwd_fake(q, k, v, bias, params, c, obo, sink, family, kind, consts, row, mask, scale, softcap):
    B, Hq, T, _ = q.shape
    return (q.new_empty((B, Hq, T, v.shape[-1])),
            q.new_empty((B if family == ROWNORM or row[2] else 0, Hq, T, 3), dtype=_acc(q)))  # row[2]: divide


def _attn_bwd_fake(grad, q, k, v, bias, params, c, obo, sink, out, stats, family, kind, consts, row, mask, scale,
                   softcap, need_dbias):
    acc = _acc(q)
    dbias = q.new_empty(bias.shape, dtype=acc) if need_dbias and bias is not None else q.new_empty((0,), dtype=acc)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias,
            torch.empty_like(params), q.new_empty((1,), dtype=acc), torch.empty_like(obo), torch.empty_like(sink)]


def _attn_setup(ctx, inputs, output):
    q, k, v, bias, params, c, obo, sink, *rest = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, bias, params, c, obo, sink, out, stats)
    ctx.args = tuple(rest)


def attention_backward(bwd_op):
    """The autograd backward of an attention_fwd op through its ``bwd_op`` (same schema as
    forge_ops::attention_bwd: this library's, or forge_triton's in forge_dist.ops.triton_attention)."""
    def backward(ctx, grad, _grad_stats):
        q, k, v, bias, params, c, obo, sink, out, stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv, dbias, dparams, dc, dobo, dsink = bwd_op(
            grad, q, k, v, bias, params, c, obo, sink, out, stats, *ctx.args, bool(bias is not None and need[3]))
        grads = (dq, dk, dv, dbias, dparams, dc.reshape(c.shape), dobo, dsink)
        return tuple(g if n else None for g, n in zip(grads, need[:8])) + (None,) * 7

    return backward


_attn_backward = attention_backward(lambda *args: torch.ops.forge_ops.attention_bwd(*args))


# --- quantization ----------------------------------------------------------------------------------
def _fake_quantize_fake(x, bits, symmetric, per_row):
    return torch.empty_like(x)


def _fake_quantize_backward(ctx, grad):
    return grad, None, None, None  # straight-through: d x_hat / d x = 1 (Bengio et al. 2013)


def _int8_linear_fake(x, qweight, scale, zero_point, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _int8_setup(ctx, inputs, output):
    x, qweight, scale, zero_point, bias = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.has_bias = bias is not None


def _int8_backward(ctx, grad):
    """dx = grad W, W = (q - zp) scale (the weights are frozen codes: no gradient for them)."""
    qweight, scale, zero_point = ctx.saved_tensors
    w = (qweight.to(torch.float32) - zero_point.reshape(-1, 1)) * scale.reshape(-1, 1)
    dx = grad @ w.to(grad.dtype) if ctx.needs_input_grad[0] else None
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return dx, None, None, None, db


def register_all() -> None:
    """Idempotent: the fake and autograd rules of every forward op."""
    global _REGISTERED
    if _REGISTERED:
        return
    for name, fake in (("norm_fwd", _norm_fwd_fake), ("norm_bwd", _norm_bwd_fake),
                       ("score_elementwise_fwd", _elem_fwd_fake), ("score_elementwise_bwd", _elem_bwd_fake),
                       ("score_rownorm_fwd", _row_fwd_fake), ("score_rownorm_bwd", _row_bwd_fake),
                       ("fake_quantize", _fake_quantize_fake), ("int8_linear", _int8_linear_fake)):
        register_fake(f"forge_ops::{name}")(fake)
    register_autograd("forge_ops::norm_fwd", _norm_backward, setup_context=_norm_setup)
    register_autograd("forge_ops::score_elementwise_fwd", _elem_backward, setup_context=_elem_setup)
    register_autograd("forge_ops::score_rownorm_fwd", _row_backward, setup_context=_row_setup)
    register_autograd("forge_ops::fake_quantize", _fake_quantize_backward)
    register_autograd("forge_ops::int8_linear", _int8_backward, setup_context=_int8_setup)
    if hasattr(torch.ops.forge_ops, "attention_fwd"):  # absent from a library built before it
        register_fake("forge_ops::attention_fwd")(_attn_fwd_fake)
        register_fake("forge_ops::attention_bwd")(_attn_bwd_fake)
        register_autograd("forge_ops::attention_fwd", _attn_backward, setup_context=_attn_setup)
    _REGISTERED = True
