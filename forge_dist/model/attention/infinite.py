"""Infinite-head attention (attention_variant=infinite; upstream InfiniteHeadAttention, "IHA").

Heads are decoupled from n_embd: n_head queries of n_qk_head_dim, n_kv_group keys of
n_qk_head_dim and values of n_v_head_dim, so heads can be added without shrinking them. The head
outputs become the residual update either by concatenation (use_concat_heads: c_proj maps
n_head * n_v_head_dim -> n_embd) or by summation over heads (B, T, n_v_head_dim) followed by one
c_proj, or by the sum of n_cproj projections (c_proj_list). Per-layer shapes come from
n_head_layerlist / n_qk_head_dim_layerlist / n_v_head_dim_layerlist (config.for_layer).

Everything else (GQA, RoPE/SOAP on n_qk_head_dim, QK-norm and its scale, flash-LOBO, window,
soft-capping, FIRE, softmax variants, KV cache) is the causal attention's, unchanged.
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.attention.causal import CausalSelfAttention
from forge_dist.model.attention.common import merge_heads
from forge_dist.model.linear import build_linear
from forge_dist.variants import ATTENTION


@ATTENTION.register("infinite", "iqa")  # "iqa": the name older configs use
class InfiniteHeadAttention(CausalSelfAttention):
    @staticmethod
    def head_shapes(config):
        """Unset dims fall back to n_embd / n_head (upstream has no fallback and fails)."""
        qk = config.n_qk_head_dim or config.head_dim
        v = config.n_v_head_dim or qk
        return config.n_head, config.kv_groups, qk, v

    def build_output(self, config, n_head: int) -> None:
        self.use_concat_heads = config.use_concat_heads
        C, Dv = config.n_embd, self.v_head_dim
        n_cproj = config.n_cproj or 1
        if self.use_concat_heads:
            self.c_proj = build_linear("attn_proj", n_head * Dv, C, config, config.bias)
        elif n_cproj == 1:
            self.c_proj = build_linear("attn_proj", Dv, C, config, config.bias)
        else:
            self.c_proj_list = nn.ModuleList(
                build_linear("attn_proj", Dv, C, config, config.bias) for _ in range(n_cproj))

    def combine_heads(self, y):  # (B, H, T, Dv) -> (B, T, C)
        if self.use_concat_heads:
            return self.c_proj(merge_heads(y))
        y = y.sum(dim=1)  # (B, T, Dv): heads summed, not concatenated
        if hasattr(self, "c_proj_list"):
            return sum(proj(y) for proj in self.c_proj_list)
        return self.c_proj(y)
