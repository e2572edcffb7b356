"""Causal self-attention (attention_variant=causal), ReaLLM-Forge's main attention.

Separate q/k/v projections (c_attn_q, c_attn_k, c_attn_v) and an output projection c_proj, named
as upstream. Grouped-query attention through n_kv_group (query head h uses KV head
h // (n_head / n_kv_group)); RoPE/SOAP on q and k; QK-norm (with a learned scale
g = log2(L^2 - L) replacing 1/sqrt(d)); flash-LOBO sink; sliding window; soft-capping; FIRE bias;
any softmax variant; KV-cached decoding; every activation fake-quant point (quantize_attn_act_*:
input/output around ``transform``, the rest in core.attend). The head count is read from the
projection outputs at run time, so a tensor-parallel shard (fewer heads per rank) runs the same
forward.

The head layout (how many heads, of which q/k and v widths) and how head outputs become the
residual update are hooks, so infinite-head attention reuses this class (infinite.py).
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.attention.common import extend_cache, merge_heads, split_heads
from forge_dist.model.attention.core import DotProductAttention
from forge_dist.model.linear import build_linear
from forge_dist.variants import ATTENTION


@ATTENTION.register("causal")
class CausalSelfAttention(DotProductAttention):
    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__(config)
        n_head, n_kv, self.qk_head_dim, self.v_head_dim = self.head_shapes(config)
        C = config.n_embd
        self.c_attn_q = build_linear("q", C, n_head * self.qk_head_dim, config, config.bias)
        self.c_attn_k = build_linear("k", C, n_kv * self.qk_head_dim, config, config.bias)
        self.c_attn_v = build_linear("v", C, n_kv * self.v_head_dim, config, config.bias)
        self.build_output(config, n_head)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.init_scoring(config, n_head, self.qk_head_dim, shared)

    @staticmethod
    def head_shapes(config):
        """(n_head, n_kv_heads, q/k head dim, v head dim): heads of n_embd / n_head."""
        return config.n_head, config.kv_groups, config.head_dim, config.head_dim

    def build_output(self, config, n_head: int) -> None:
        self.c_proj = build_linear("attn_proj", n_head * self.v_head_dim, config.n_embd, config, config.bias)

    def combine_heads(self, y):  # (B, H, T, Dv) -> (B, T, C): concatenate heads, project
        return self.c_proj(merge_heads(y))

    def transform(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        offset = 0 if cache is None else cache.offset
        q = split_heads(self.c_attn_q(x), self.qk_head_dim)  # (B, H, T, Dqk)
        k = split_heads(self.c_attn_k(x), self.qk_head_dim)  # (B, Hkv, T, Dqk)
        v = split_heads(self.c_attn_v(x), self.v_head_dim)  # (B, Hkv, T, Dv)
        q, k = self.rotate(q, k, offset)
        k, v = extend_cache(cache, k=k, v=v)  # (B, Hkv, S, .) with every key so far
        y = self.mix(q, k, v, offset)  # (B, H, T, Dv)
        return self.resid_dropout(self.combine_heads(y))
