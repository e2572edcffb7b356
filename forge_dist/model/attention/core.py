"""The part every dot-product attention variant shares: scores -> mask -> normaliser -> values.

    scores = Q(q) Q(k)^T * scale                    (B, H, T, S)
    scores = c * tanh(scores / c)                   attention soft-capping (Gemma 2), before masking
    scores = scores + bias                          FIRE relative bias (hidden keys stay hidden)
    scores = Q(scores)                              statistics over the visible entries only
    probs  = normaliser(scores, mask)               softmax or any softmax variant; 0 where hidden
    y      = Q(Q(dropout(probs)) Q(v))              (B, H, T, Dv)

Q marks an activation fake-quantization point (qk_mult_q_input, qk_mult_k_input, softmax_input,
pv_mult_p_input, pv_mult_v_input, pv_mult_output), in upstream's manual-path order; each is the
identity unless the caller's ``act_quant`` has it enabled. Hidden scores are neither counted in
the softmax_input statistics nor changed, so they stay hidden.

A sink (flash-LOBO, "off-by-one" attention) is a virtual leading key with logit log C and a zero
value: for softmax it adds C to the denominator, y_i = sum_j e^{s_ij} v_j / (C + sum_j e^{s_ij}).
Unlike upstream, every query also sees its own key (see docs/divergences.md).

Plain softmax (soft-capping off) runs PyTorch's fused scaled_dot_product_attention, grouped-query
attention included (``enable_gqa``); FIRE bias and sink then travel in its additive mask instead
of a materialised score matrix. Every other normaliser runs the fused kernel where one takes it
(attention/fused.py: C++ on CPU, FlexAttention on CUDA), else blocked over keys
(attention/blocked.py), never holding the scores, unless FORGE_OPS=reference or dropout is on. Only
the quant points on tensors the kernel keeps inside (softmax_input, pv_mult_p_input) force the
materialised path; q, k, v and the output are quantized around the kernel. Head counts are read from the tensors, so the same code runs on a
tensor-parallel shard of heads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.model.attention import blocked
from forge_dist.model.attention.fused import fused_attend
from forge_dist.model.attention.common import (AttentionModule, build_fire, init_lobo, lobo_logit, qk_normalize,
                                               uses_plain_softmax)
from forge_dist.ops.mask import MaskSpec
from forge_dist.model.position import build_rotary
from forge_dist.model.quantize import ATTN_ACT_POINTS
from forge_dist.model.softmax import Softmax, build_softmax


_PLAIN_SOFTMAX = Softmax()


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*n_rep, S, D); query head h uses KV head h // n_rep (upstream GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _sink_column(sink_logit, like: torch.Tensor) -> torch.Tensor:
    """log C as a (H or 1, 1, 1) tensor of ``like``'s dtype/device."""
    return torch.as_tensor(sink_logit, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)


SCORE_POINTS = ("softmax_input", "pv_mult_p_input")  # tensors only the materialised path has


class _NoPoints:
    """Stands in for an ActQuantPoints with every point off."""

    def __contains__(self, point: str) -> bool:
        return False

    def __call__(self, point: str, x: torch.Tensor, mask=None) -> torch.Tensor:
        return x


_NO_POINTS = _NoPoints()


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
    sink_logit: Optional[torch.Tensor] = None,  # scalar or (H,) / (H, 1, 1)
    dropout_p: float = 0.0,
    fused: bool = True,
    act_quant: Optional[nn.Module] = None,  # an ActQuantPoints of group "attn"
) -> torch.Tensor:  # (B, Hq, T, Dv)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads evenly")
    n_rep = q.shape[1] // k.shape[1]
    points = _NO_POINTS if act_quant is None else act_quant
    # per-tensor statistics of k and v over the KV heads, before GQA repeats them (as upstream)
    q, k = points("qk_mult_q_input", q), points("qk_mult_k_input", k)
    v = points("pv_mult_v_input", v)
    if torch.is_tensor(scale):  # a learned scale (qk-norm g): (g q) . k = g (q . k)
        q, scale = q * scale, 1.0
    materialise = not fused or any(p in points for p in SCORE_POINTS)
    y = None
    if not materialise and normalizer is None and softcap is None:
        y = _sdpa(q, k, v, mask, float(scale), dropout_p, n_rep, bias, sink_logit)
    elif not materialise and dropout_p == 0.0 and blocked.enabled():
        norm = normalizer or _PLAIN_SOFTMAX
        y = fused_attend(q, k, v, normalizer=norm, mask=mask, scale=scale, softcap=softcap, bias=bias,
                         sink_logit=sink_logit)  # None where no fused kernel takes the call
        if y is None and blocked.supports(norm, k.shape[-2] - mask.n_sink):
            y = blocked.blocked_attend(q, k, v, normalizer=norm, mask=mask, scale=scale, softcap=softcap, bias=bias,
                                       sink_logit=sink_logit)
    if y is None:
        y = _materialised(q, k, v, n_rep, normalizer, mask, scale, softcap, bias, sink_logit, dropout_p, points)
    return points("pv_mult_output", y)


def _materialised(q, k, v, n_rep: int, normalizer, mask: MaskSpec, scale, softcap, bias, sink_logit,
                  dropout_p: float, points) -> torch.Tensor:
    """The score matrix spelled out: every variant and option, and the score-level quant points."""
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if "softmax_input" in points:  # statistics over the visible (causal, windowed) entries only
        T, S = scores.shape[-2:]
        scores = points("softmax_input", scores, mask.keep(T, S, scores.device))
    if sink_logit is not None:
        B, H, T, _ = scores.shape
        sink = _sink_column(sink_logit, scores).expand(H, T, 1).expand(B, H, T, 1)
        scores = torch.cat([sink, scores], dim=-1)
        mask = dataclasses.replace(mask, n_sink=1)
    probs = (normalizer or _PLAIN_SOFTMAX)(scores, mask)
    if sink_logit is not None:
        probs = probs[..., 1:]  # the sink's value is zero: it only takes probability mass
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return points("pv_mult_p_input", probs) @ v


def _sdpa(q, k, v, mask: MaskSpec, scale: float, dropout_p: float, n_rep: int, bias, sink_logit):
    T, S = q.shape[-2], k.shape[-2]
    attn_mask, is_causal = None, False
    if bias is None and sink_logit is None:
        if mask.is_plain_causal(T, S):
            is_causal = True  # the kernel's own lower-triangular mask, nothing read from memory
        elif not mask.hides_nothing(T, S):
            attn_mask = mask.keep(T, S, q.device)
    else:  # additive mask: -inf hidden, + FIRE bias, and a leading sink column with a zero key/value
        attn_mask = mask.additive(T, S, q.dtype, q.device)
        if bias is not None:
            attn_mask = attn_mask + bias.to(q.dtype)
        if sink_logit is not None:
            sink = _sink_column(sink_logit, q)
            attn_mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            H = max(sink.shape[0], attn_mask.shape[0])
            attn_mask = torch.cat([sink.expand(H, T, 1), attn_mask.expand(H, T, S)], dim=-1)
            k = torch.cat([k.new_zeros(*k.shape[:2], 1, k.shape[-1]), k], dim=2)
            v = torch.cat([v.new_zeros(*v.shape[:2], 1, v.shape[-1]), v], dim=2)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=n_rep > 1,
    )


class DotProductAttention(AttentionModule):
    """Base of the dot-product variants (causal, infinite, mla): everything between their
    projections and their output projection, configured once from the layer's config.

    Subclasses project, call ``rotate`` (RoPE/SOAP), extend the cache, then ``mix``. Attribute
    names follow upstream's state dict: qk_norm_factor, flash_lobo_log_const, fire_pos_enc,
    softmax_layer_attn. Every activation-quant point applies.
    """

    act_points = ATTN_ACT_POINTS

    def init_scoring(self, config, n_head: int, rotary_size: int, shared, always_rotary: bool = False):
        self.rotary_emb_q = build_rotary(config, rotary_size, always_rotary)
        self.rotary_emb_k = build_rotary(config, rotary_size, always_rotary)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm_scale:  # learned g replacing 1/sqrt(d), init log2(L^2 - L), L = block_size
            L = config.block_size
            self.qk_norm_factor = nn.Parameter(torch.tensor(math.log2(L * L - L)))
        else:
            self.qk_norm_factor = None
        init_lobo(self, config, n_head)  # -> self.flash_lobo_log_const
        self.fire_pos_enc = build_fire(config, n_head, shared)
        self.window_size = config.window_size
        self.attn_logit_softcapping = config.attn_logit_softcapping
        self.fused = not config.disable_flash_attention
        self.attn_dropout_p = config.dropout
        if uses_plain_softmax(config):
            self.softmax_layer_attn = None
        else:
            self.softmax_layer_attn = build_softmax(config.softmax_variant_attn, config, n_head=n_head)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int):
        """RoPE/SOAP on q (B, H, T, D) and k (B, Hkv, T, D) at absolute positions offset.."""
        if self.rotary_emb_q is None:
            return q, k
        return self.rotary_emb_q(q, offset), self.rotary_emb_k(k, offset)

    def sink_logit(self) -> Optional[torch.Tensor]:
        return lobo_logit(self)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """Causal attention of q (B, H, T, D) over every key so far k (B, Hkv, S, D) -> (B, H, T, Dv).

        QK-norm here (after RoPE: rotations keep the norm, so the order does not change the
        result); scale 1/sqrt(D), or the learned g with use_qk_norm_scale.
        """
        if self.use_qk_norm:
            q, k = qk_normalize(q), qk_normalize(k)
        scale = self.qk_norm_factor if self.qk_norm_factor is not None else 1.0 / math.sqrt(q.shape[-1])
        bias = None
        if self.fire_pos_enc is not None:
            bias = self.fire_pos_enc(q.shape[-2], k.shape[-2], offset)  # (H, T, S)
        mask = MaskSpec(causal=True, window=self.window_size, q_offset=offset)
        return attend(q, k, v, normalizer=self.softmax_layer_attn, mask=mask, scale=scale,
                      softcap=self.attn_logit_softcapping, bias=bias, sink_logit=self.sink_logit(),
                      dropout_p=self.attn_dropout_p if self.training else 0.0, fused=self.fused,
                      act_quant=self.act_quant)
