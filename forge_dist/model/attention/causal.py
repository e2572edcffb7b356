"""Causal self-attention (attention_variant=causal), ReaLLM-Forge's main attention.

Separate q/k/v projections (c_attn_q, c_attn_k, c_attn_v) and an output projection c_proj, named
as upstream. Grouped-query attention through n_kv_group; RoPE/SOAP on q and k; QK-norm (with a
learned scale g = log2(L^2 - L) replacing 1/sqrt(d)); flash-LOBO sink; sliding window; soft-capping;
FIRE bias; any softmax variant. The head count is read from the projection outputs at run time, so
a tensor-parallel shard (fewer heads per rank) runs the same forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from forge_dist.model.attention.core import attend
from forge_dist.model.attention.common import (build_fire, init_lobo, lobo_logit, merge_heads,
                                               qk_normalize, split_heads, uses_plain_softmax)
from forge_dist.model.linear import build_linear
from forge_dist.model.mask import MaskSpec
from forge_dist.model.position import build_rotary
from forge_dist.model.registries import ATTENTION
from forge_dist.model.softmax import build_softmax


@ATTENTION.register("causal")
class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__()
        self.head_dim = config.head_dim
        n_head, n_kv = config.n_head, config.kv_groups
        C = config.n_embd
        self.c_attn_q = build_linear("q", C, n_head * self.head_dim, config, config.bias)
        self.c_attn_k = build_linear("k", C, n_kv * self.head_dim, config, config.bias)
        self.c_attn_v = build_linear("v", C, n_kv * self.head_dim, config, config.bias)
        self.c_proj = build_linear("attn_proj", n_head * self.head_dim, C, config, config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

        self.rotary_emb_q = build_rotary(config, self.head_dim)
        self.rotary_emb_k = build_rotary(config, self.head_dim)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm_scale:
            L = config.block_size
            self.qk_norm_factor = nn.Parameter(torch.tensor(math.log2(L * L - L)))
        else:
            self.qk_norm_factor = None
        init_lobo(self, config, n_head)  # -> self.flash_lobo_log_const
        self.fire_pos_enc = build_fire(config, n_head, shared)
        self.window_size = config.window_size
        self.softcap = config.attn_logit_softcapping
        self.fused = not config.disable_flash_attention
        if uses_plain_softmax(config):
            self.softmax_layer_attn = None
        else:
            self.softmax_layer_attn = build_softmax(config.softmax_variant_attn, config)

    def forward(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        offset = 0 if cache is None else cache.offset
        q = split_heads(self.c_attn_q(x), self.head_dim)  # (B, H, T, D)
        k = split_heads(self.c_attn_k(x), self.head_dim)  # (B, Hkv, T, D)
        v = split_heads(self.c_attn_v(x), self.head_dim)
        if self.rotary_emb_q is not None:
            q = self.rotary_emb_q(q, offset)
            k = self.rotary_emb_k(k, offset)
        if cache is not None:
            if "k" in cache.state:
                k = torch.cat([cache.state["k"], k], dim=2)
                v = torch.cat([cache.state["v"], v], dim=2)
            cache.state["k"], cache.state["v"] = k, v

        scale = 1.0 / math.sqrt(self.head_dim)
        if self.use_qk_norm:
            q, k = qk_normalize(q), qk_normalize(k)
        if self.qk_norm_factor is not None:  # g replaces 1/sqrt(d): (g q) . k = g (q . k)
            q, scale = q * self.qk_norm_factor, 1.0
        mask = MaskSpec(causal=True, window=self.window_size, q_offset=offset)
        bias = None
        if self.fire_pos_enc is not None:
            bias = self.fire_pos_enc(q.shape[-2], k.shape[-2], offset)  # (H, T, S)
        y = attend(q, k, v, normalizer=self.softmax_layer_attn, mask=mask, scale=scale,
                   softcap=self.softcap, bias=bias, sink_logit=lobo_logit(self),
                   dropout_p=self.attn_dropout_p if self.training else 0.0, fused=self.fused)
        return self.resid_dropout(self.c_proj(merge_heads(y)))
