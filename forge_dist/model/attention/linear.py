"""Linear attention (attention_variant=linear), upstream's diagonal form of Katharopoulos et al.
2020 ("Transformers are RNNs", arXiv 2006.16236), per head and per feature d:

    phi(z) = elu(z) + 1,   q' = phi(s q),  k' = phi(s k)     s learnable, init 1/sqrt(head_dim)
    y_t = q'_t * sum_{u<=t} k'_u * v_u  /  max(q'_t . sum_{u<=t} k'_u, 1e-3)

with elementwise k' * v where the paper has the outer product k' v^T (as upstream). Causal through
cumulative sums, so the recurrent state for decoding is the two running sums (B, H, D).

Names as upstream: one fused ``c_attn`` (n_embd -> 3 n_embd, always with bias; the q/k/v thirds
are each split by head), ``c_proj`` (always with bias), ``scale``. Upstream has no dropout here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.model.attention.common import AttentionModule, merge_heads, split_heads
from forge_dist.model.linear import build_linear
from forge_dist.variants import ATTENTION


@ATTENTION.register("linear")
class LinearAttention(AttentionModule):  # activation-quant points: input, output (no q.k scores)
    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__(config)
        C = config.n_embd
        self.head_dim = config.head_dim
        self.c_attn = build_linear("q", C, 3 * C, config, True)
        self.c_proj = build_linear("attn_proj", C, C, config, True)
        self.scale = nn.Parameter(torch.tensor(1.0 / math.sqrt(self.head_dim)))

    def transform(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        q, k, v = (split_heads(t, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))  # (B, H, T, D)
        q = F.elu(q * self.scale) + 1
        k = F.elu(k * self.scale) + 1
        kv_sum = (k * v).cumsum(dim=2)  # (B, H, T, D): sum_{u<=t} k'_u * v_u
        k_sum = k.cumsum(dim=2)  # (B, H, T, D): sum_{u<=t} k'_u
        if cache is not None:
            if "kv_sum" in cache.state:  # continue the sums of the tokens already seen
                kv_sum = kv_sum + cache.state["kv_sum"]
                k_sum = k_sum + cache.state["k_sum"]
            cache.state["kv_sum"], cache.state["k_sum"] = kv_sum[:, :, -1:], k_sum[:, :, -1:]
        denom = (q * k_sum).sum(dim=-1, keepdim=True).clamp(min=1e-3)  # (B, H, T, 1)
        return self.c_proj(merge_heads(q * kv_sum / denom))
