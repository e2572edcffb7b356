"""Blocked attention for every score normaliser: out_i = sum_j f(s_ij) v_j / D_i, key block by key
block, never holding the (B, H, T, S) scores.

Two kinds, read from the normaliser (forge_dist.model.softmax), one mechanism for all variants:
- elementwise (``normalizer.elementwise``: consmax family, polymax, relumax, ...): y_ij = f(s_ij)/D
  needs nothing from other keys, so each key block is normalised by the module itself (its fused
  kernel or reference, hidden keys as -inf) and multiplied into its values;
- row sum of a curve (``normalizer.row_sum_spec``: pfla_softmax without its learned divisor):
  D_i = sum_j y(s_ij) (+ eps, + e^obo), accumulated with O_i = sum_j y(s_ij) v_j, y = O / D;
- row-normalised (``normalizer.row_spec``: softmax with soft-capping, softermax, sigsoftmax,
  strongermax): pass 1 takes the row max m of w = t(s) over the blocks (only where the variant
  shifts by it), pass 2 accumulates e = exp(c (w - m)) into D_i = sum_j e_ij and O_i = sum_j e_ij v_j,
  then y_i = O_i / (obo + D_i) / divisor (/ L). With m fixed before pass 2 there is no running
  rescale, and the result equals the reference's, obo and a learned temperature included.

Each block runs under activation checkpointing: autograd keeps the block's inputs (views of q, k,
v) and the (B, H, T) statistics, and the backward recomputes f(s) block by block; so the memory is
O(T x block) instead of O(T x S), and every learned parameter (beta, gamma, per-head factors,
temperature, obo) gets its gradient from autograd. Masks (causal, window, q offset, sink columns),
soft-capping, additive bias (FIRE) and the flash-LOBO sink are applied inside the block; grouped-
query attention broadcasts K/V over the query heads of a group without repeating them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from forge_dist.model.softmax import RowSpec
from forge_dist.ops import registry
from forge_dist.ops.mask import MaskSpec

BLOCK = 128  # keys per block
Q_BLOCK = 256  # queries per block


def enabled() -> bool:
    """The blocked path is the default; FORGE_OPS=reference keeps the materialised one (parity runs)."""
    return registry.mode() != "reference"


def supports(normalizer: nn.Module, n_keys: int) -> bool:
    """True when ``normalizer`` can run blocked (elementwise, or row-normalised with a RowSpec)."""
    if getattr(normalizer, "elementwise", False) or _row_sum_spec(normalizer) is not None:
        return True
    spec = getattr(normalizer, "row_spec", None)
    return spec is not None and spec(n_keys) is not None


def _row_sum_spec(normalizer: nn.Module):
    """(curve, addend) of a variant normalised by the plain row sum of a curve (pfla_softmax), or None."""
    spec = getattr(normalizer, "row_sum_spec", None)
    return None if spec is None else spec()


def _group(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, Hq, T, D) -> (B, Hkv, R, T, D): query head h = g R + r uses KV head g (as repeat_kv)."""
    return x.unflatten(1, (n_kv, x.shape[1] // n_kv))


def _block_scores(qg, k_blk, scale, softcap, bias_blk, keep) -> torch.Tensor:  # (B, H, T, n), -inf hidden
    s = (qg @ k_blk.unsqueeze(2).transpose(-2, -1)).flatten(1, 2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias_blk is not None:
        s = s + bias_blk
    return s.masked_fill(~keep, float("-inf"))


def _pv(p: torch.Tensor, v_blk: torch.Tensor) -> torch.Tensor:  # (B, H, T, n) x (B, Hkv, n, Dv)
    return (_group(p, v_blk.shape[1]) @ v_blk.unsqueeze(2)).flatten(1, 2)


def _run(fn, *args):
    """fn(*args), recomputed in the backward instead of saved (when anything needs a gradient)."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _split(x: Optional[torch.Tensor], size: int, dim: int, n: int) -> list:
    """x in n blocks of ``size`` along dim (a broadcast dim of 1, or None, repeated)."""
    if x is None or x.shape[dim] == 1:
        return [x] * n
    return list(x.split(size, dim=dim))


def _blocks(mask: MaskSpec, T: int, S: int, block: int):
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        if not mask.block_hidden(T, j0, j1):
            yield j0, j1


def blocked_attend(q, k, v, *, normalizer: nn.Module, mask: MaskSpec, scale: float, softcap=None,
                   bias: Optional[torch.Tensor] = None, sink_logit=None, block: int = BLOCK,
                   q_block: int = Q_BLOCK) -> torch.Tensor:
    """q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, Hq, T, Dv); the materialised path's
    result (forge_dist.model.attention.core._materialised without quant points or dropout).

    Queries go in blocks of q_block rows too, so a causal or windowed mask skips the key blocks a
    query block cannot see (half the work for a causal square)."""
    # split once (not sliced per block): the backward of a slice would zero-fill a whole k-sized
    # gradient per block, O(T x S) work; split's backward concatenates the block gradients once
    T, S = q.shape[-2], k.shape[-2]
    k_blocks, v_blocks = k.split(block, dim=2), v.split(block, dim=2)
    n_q_blocks, n_k_blocks = -(-T // q_block), -(-S // block)
    bias_rows = _split(bias, q_block, -2, n_q_blocks)
    outs = []
    for n, (i0, q_rows) in enumerate(zip(range(0, T, q_block), q.split(q_block, dim=2))):
        outs.append(_attend_rows(
            q_rows, k_blocks, v_blocks, S, normalizer, dataclasses.replace(mask, q_offset=mask.q_offset + i0),
            scale, softcap, _split(bias_rows[n], block, -1, n_k_blocks), sink_logit, block))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _attend_rows(q, k_blocks, v_blocks, S: int, normalizer, mask: MaskSpec, scale, softcap, bias_blocks,
                 sink_logit, block: int):
    T, v = q.shape[-2], v_blocks[0]
    n_keys = S - mask.n_sink
    qg = _group(q, k_blocks[0].shape[1])
    acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype

    def block_inputs(j0, j1):
        keep = mask.keep(T, j1 - j0, q.device, k_start=j0)
        n = j0 // block
        return k_blocks[n], v_blocks[n], keep, None if bias_blocks is None else bias_blocks[n]

    out = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=acc)
    if getattr(normalizer, "elementwise", False):
        def elementwise_block(qg, k_blk, v_blk, keep, bias_blk):
            s = _block_scores(qg, k_blk, scale, softcap, bias_blk, keep)
            normalizer.total_keys = n_keys  # div_by_seq_len divides by every key, not the block's
            try:
                p = normalizer(s, None)
            finally:
                normalizer.total_keys = None
            return _pv(p.to(v_blk.dtype), v_blk)

        for j0, j1 in _blocks(mask, T, S, block):
            out = out + _run(elementwise_block, qg, *block_inputs(j0, j1)).to(acc)
        return out.to(q.dtype)  # a sink column only takes mass from a sum: none here

    row_sum = _row_sum_spec(normalizer)
    if row_sum is not None:  # y = curve(s) / (sum_j curve(s_j) + addend): accumulate both sums
        curve, addend = row_sum

        def sum_block(qg, k_blk, v_blk, keep, bias_blk):
            y = curve(_block_scores(qg, k_blk, scale, softcap, bias_blk, keep))  # 0 where hidden (-inf)
            return y.sum(-1, keepdim=True, dtype=acc), _pv(y.to(v_blk.dtype), v_blk).to(acc)

        den = q.new_zeros(*q.shape[:-1], 1, dtype=acc)
        for j0, j1 in _blocks(mask, T, S, block):
            d_blk, o_blk = _run(sum_block, qg, *block_inputs(j0, j1))
            den, out = den + d_blk, out + o_blk
        if sink_logit is not None:  # the sink column's curve value counts in the sum
            sink = torch.as_tensor(sink_logit, dtype=q.dtype, device=q.device).reshape(-1, 1, 1)
            den = den + curve(sink.expand(q.shape[1], T, 1).expand(q.shape[0], q.shape[1], T, 1)).to(acc)
        return (out / (den + addend(den))).to(q.dtype)

    spec: RowSpec = normalizer.row_spec(n_keys)
    transform = spec.transform or (lambda x: x)
    sink_w = None
    if sink_logit is not None:  # a virtual key with logit log C and a zero value: counts in m and D only
        sink = torch.as_tensor(sink_logit, dtype=q.dtype, device=q.device).reshape(-1, 1, 1)
        sink_w = transform(sink.expand(q.shape[1], T, 1).expand(q.shape[0], q.shape[1], T, 1))

    def transformed(qg, k_blk, keep, bias_blk):
        s = _block_scores(qg, k_blk, scale, softcap, bias_blk, keep)
        return transform(s.masked_fill(~keep, 0.0))  # hidden x -> 0 before t, as the reference

    m = torch.zeros((), dtype=q.dtype, device=q.device)
    # y = e^{c(w - m)} / sum e^{c(w - m)} does not depend on m: without obo or with no division it does
    m_matters = not spec.divide or torch.is_tensor(spec.obo) or spec.obo != 0
    if spec.shift in ("max", "guess_or_max"):
        lowest = torch.finfo(q.dtype).min

        def block_max(qg, k_blk, keep, bias_blk):
            return transformed(qg, k_blk, keep, bias_blk).masked_fill(~keep, lowest).amax(-1, keepdim=True)

        maxima = []
        for j0, j1 in _blocks(mask, T, S, block):
            k_blk, _, keep, bias_blk = block_inputs(j0, j1)
            if m_matters:
                maxima.append(_run(block_max, qg, k_blk, keep, bias_blk))
            else:
                with torch.no_grad():
                    maxima.append(block_max(qg, k_blk, keep, bias_blk))
        if sink_w is not None:
            maxima.append(sink_w)
        m = torch.cat(maxima, -1).amax(-1, keepdim=True) if maxima else m
        if spec.shift == "guess_or_max":
            m = torch.where(m - spec.guess > spec.overflow, m, torch.full_like(m, spec.guess))
    elif spec.shift == "guess":
        m = torch.full((), spec.guess, dtype=q.dtype, device=q.device)

    def row_block(qg, k_blk, v_blk, keep, bias_blk, m):
        u = (transformed(qg, k_blk, keep, bias_blk) - m) * spec.log_scale
        e = torch.exp(u.masked_fill(~keep, 0.0)).masked_fill(~keep, 0.0)
        return e.sum(-1, keepdim=True, dtype=acc), _pv(e.to(v_blk.dtype), v_blk).to(acc)

    den = q.new_zeros(*q.shape[:-1], 1, dtype=acc)
    for j0, j1 in _blocks(mask, T, S, block):
        d_blk, o_blk = _run(row_block, qg, *block_inputs(j0, j1), m)
        den, out = den + d_blk, out + o_blk
    if sink_w is not None:
        den = den + torch.exp((sink_w - m) * spec.log_scale).to(acc)
    if spec.divide:
        den = den + spec.obo
        out = out / torch.where(den == 0, 1.0, den)
    out = out / spec.divisor
    if spec.seq_len is not None:
        out = out / spec.seq_len
    return out.to(q.dtype)
