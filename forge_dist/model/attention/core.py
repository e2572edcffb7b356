"""The part every dot-product attention variant shares: scores -> mask -> normaliser -> values.

    scores = q k^T * scale                          (B, H, T, S)
    scores = c * tanh(scores / c)                   attention soft-capping (Gemma 2), before masking
    scores = scores + bias                          FIRE relative bias (hidden keys stay hidden)
    probs  = normaliser(scores, mask)               softmax or any softmax variant; 0 where hidden
    y      = dropout(probs) v                       (B, H, T, Dv)

A sink (flash-LOBO, "off-by-one" attention) is a virtual leading key with logit log C and a zero
value: for softmax it adds C to the denominator, y_i = sum_j e^{s_ij} v_j / (C + sum_j e^{s_ij}).
Unlike upstream, every query also sees its own key (see docs/divergences.md).

Plain softmax with none of soft-cap/bias/sink runs PyTorch's fused scaled_dot_product_attention,
grouped-query attention included (``enable_gqa``), instead of materialising the scores.
Head counts are read from the tensors, so the same code runs on a tensor-parallel shard of heads.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.model.mask import MaskSpec


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*n_rep, S, D); query head h uses KV head h // n_rep (upstream GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attend(
    q: torch.Tensor,  # (B, Hq, T, D)
    k: torch.Tensor,  # (B, Hkv, S, D)
    v: torch.Tensor,  # (B, Hkv, S, Dv)
    *,
    normalizer: Optional[nn.Module],  # None -> plain softmax
    mask: MaskSpec,
    scale: float | torch.Tensor,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,  # (H, T, S) or broadcastable
    sink_logit: Optional[torch.Tensor] = None,  # scalar or (H, 1, 1)
    dropout_p: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:  # (B, Hq, T, Dv)
    n_rep = q.shape[1] // k.shape[1]
    plain = normalizer is None and softcap is None and bias is None and sink_logit is None
    if fused and plain and not torch.is_tensor(scale):
        return _sdpa(q, k, v, mask, float(scale), dropout_p, n_rep)

    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if sink_logit is not None:
        sink = torch.as_tensor(sink_logit, dtype=scores.dtype, device=scores.device)
        sink = sink.reshape(-1, 1, 1).expand(scores.shape[1], scores.shape[2], 1).expand(scores.shape[0], -1, -1, -1)
        scores = torch.cat([sink, scores], dim=-1)
        mask = dataclasses.replace(mask, n_sink=1)
    if normalizer is None:
        from forge_dist.model.softmax import Softmax

        probs = Softmax()(scores, mask)
    else:
        probs = normalizer(scores, mask)
    if sink_logit is not None:
        probs = probs[..., 1:]
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v


def _sdpa(q, k, v, mask: MaskSpec, scale: float, dropout_p: float, n_rep: int):
    T, S = q.shape[-2], k.shape[-2]
    square_causal = mask.causal and mask.window is None and mask.q_offset == 0 and T == S
    attn_mask = None
    if not square_causal and (mask.causal or mask.window is not None):
        attn_mask = mask.keep(T, S, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=square_causal, scale=scale,
        enable_gqa=n_rep > 1,
    )
