"""Co4 attention (attention_variant=co4): triadic modulation and latent-to-token attention
(Adeel 2025, section 4; upstream Co4Attention), made causal.

n_latent learned queries Q (Lq, C); keys K = k_proj(x) and values V = v_proj(x) (B, T, C). Each of
triadic_loops rounds modulates (mod_fn f, triadic.py), with means over the tokens u <= t only:

    Q_t <- f(Q_t, (mean_{u<=t} K_u + mean_{u<=t} V_u) / 2)       (B, T, Lq, C): one query set per t
    K_t <- f(K_t, (mean_l Q_{t,l} + V_t) / 2)
    V_t <- f(V_t, (mean_l Q_{t,l} + K_t) / 2)

then q_proj(Q), and every latent query of position t attends (softmax, per head) over the keys
u <= t; the output at t is the mean over latents, then out_proj. Upstream takes the means over the
whole sequence and broadcasts one output to every position, which lets position t see the future
(docs/divergences.md). Attention runs through core.attend with the latents as query heads that
share one key/value head (the GQA layout), so the fused kernel applies.

Decode state: per round the running sums of K and V entering it, and the final K, V (B, H, S, D).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from forge_dist.model.attention.common import AttentionModule, extend_cache, merge_heads, split_heads
from forge_dist.model.attention.core import attend
from forge_dist.model.attention.triadic import cooperation  # noqa: F401  (registers MOD_FN)
from forge_dist.model.linear import build_linear
from forge_dist.ops.mask import MaskSpec
from forge_dist.model.quantize import ATTN_ACT_POINTS
from forge_dist.variants import ATTENTION, MOD_FN


def running_mean(x: torch.Tensor, cache, name: str, offset: int) -> torch.Tensor:
    """mean_{u<=t} x_u over the time dim 1 of x (B, T, C), continuing the cache's sum ``name``."""
    total = x.cumsum(dim=1)
    if cache is not None:
        if name in cache.state:
            total = total + cache.state[name]
        cache.state[name] = total[:, -1:]
    count = torch.arange(offset + 1, offset + x.shape[1] + 1, device=x.device, dtype=x.dtype)
    return total / count.view(1, -1, 1)


@ATTENTION.register("co4")
class Co4Attention(AttentionModule):
    act_points = ATTN_ACT_POINTS  # the attention runs through core.attend

    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__(config)
        C = config.n_embd
        self.head_dim = config.head_dim
        self.triadic_loops = config.triadic_loops
        self.mod_fn = MOD_FN.get(config.mod_fn, option="mod_fn")
        self.k_proj = build_linear("k", C, C, config, False)
        self.v_proj = build_linear("v", C, C, config, False)
        self.q_proj = build_linear("q", C, C, config, False)
        self.latent = nn.Parameter(torch.randn(config.n_latent, C) / math.sqrt(C))  # (Lq, C)
        self.out_proj = build_linear("attn_proj", C, C, config, False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def transform(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        offset = 0 if cache is None else cache.offset
        f = self.mod_fn
        k, v = self.k_proj(x), self.v_proj(x)  # (B, T, C)
        q = self.latent.expand(B, T, -1, -1)  # (B, T, Lq, C)
        for r in range(self.triadic_loops):
            context = 0.5 * (running_mean(k, cache, f"k_sum{r}", offset) + running_mean(v, cache, f"v_sum{r}", offset))
            q = f(q, context.unsqueeze(2))
            q_mean = q.mean(dim=2)  # (B, T, C)
            k = f(k, 0.5 * (q_mean + v))
            v = f(v, 0.5 * (q_mean + k))
        q = self.q_proj(q)  # (B, T, Lq, C)
        Lq, D = q.shape[2], self.head_dim
        # (B, T, Lq, H, D) -> (B, H*Lq, T, D): query head h*Lq + l uses key/value head h
        qh = q.view(B, T, Lq, -1, D).permute(0, 3, 2, 1, 4).reshape(B, -1, T, D)
        kh, vh = extend_cache(cache, k=split_heads(k, D), v=split_heads(v, D))  # (B, H, S, D)
        y = attend(qh, kh, vh, normalizer=None, mask=MaskSpec(causal=True, q_offset=offset),
                   scale=1.0 / math.sqrt(D), act_quant=self.act_quant)  # (B, H*Lq, T, D)
        y = y.view(B, -1, Lq, T, D).mean(dim=2)  # (B, H, T, D): mean over latents
        return self.resid_dropout(self.out_proj(merge_heads(y)))
