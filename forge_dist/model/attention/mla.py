"""Multi-head latent attention (attention_variant=mla), DeepSeek-V2 style (arXiv 2405.04434, 2.1).

    q_c = W_q x                (H * d_h)      q_r = RoPE(W_qr x)  (H * d_r)
    c   = W_down x             (d_latent)     the only per-token state a KV cache keeps,
    k_c = W_uk c, v = W_uv c   (H * d_h)        with k_r = RoPE(W_kr x) (d_r, shared by heads)
    scores = [q_c; q_r] . [k_c; k_r] / sqrt(d_h + d_r),  causal;  y = out_proj(concat heads)

d_h = n_embd / n_head, d_latent = mla_latent_dim (None -> 4 d_h, upstream's fallback),
d_r = mla_rotary_dim. Upstream reads neither config field (see docs/divergences.md). The rotary
branch always exists (it is MLA's only position signal); rope_variant picks RoPE or SOAP.
use_mla_lobo adds a learned per-head C_h = exp(lobo_log_h) to the softmax denominator through the
same sink mechanism as flash-LOBO; softmax variants, window, soft-capping and FIRE apply as in
causal attention (scoring is shared, core.DotProductAttention). Projection names follow upstream.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.attention.common import extend_cache, lobo_logit, merge_heads, split_heads
from forge_dist.model.attention.core import DotProductAttention
from forge_dist.model.linear import build_linear
from forge_dist.variants import ATTENTION


@ATTENTION.register("mla")
class MultiHeadLatentAttention(DotProductAttention):
    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__(config)
        H, C = config.n_head, config.n_embd
        self.d_head = config.head_dim
        self.d_latent = config.mla_latent_dim or 4 * self.d_head
        self.d_rope = config.mla_rotary_dim
        self.q_proj = build_linear("q", C, H * self.d_head, config, config.bias)
        self.q_rope_proj = build_linear("q", C, H * self.d_rope, config, config.bias)
        self.k_rope_proj = build_linear("k", C, self.d_rope, config, config.bias)
        self.kv_down_proj = build_linear("k", C, self.d_latent, config, False)
        self.k_up_proj = build_linear("k", self.d_latent, H * self.d_head, config, False)
        self.v_up_proj = build_linear("v", self.d_latent, H * self.d_head, config, False)
        self.out_proj = build_linear("attn_proj", H * self.d_head, C, config, config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.init_scoring(config, H, self.d_rope, shared, always_rotary=True)
        if config.use_mla_lobo:  # log C_h per head, C_h added to the softmax denominator
            self.lobo_log = nn.Parameter(torch.full((H,), float(config.mla_lobo_init)))
        else:
            self.register_parameter("lobo_log", None)

    def sink_logit(self):
        flash = lobo_logit(self)
        if self.lobo_log is None:
            return flash
        own = self.lobo_log.reshape(-1, 1, 1)  # (H, 1, 1)
        # both sinks on: denominators add, C_h + C_flash = exp(logaddexp(log C_h, log C_flash))
        return own if flash is None else torch.logaddexp(own, flash.to(own))

    def transform(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        offset = 0 if cache is None else cache.offset
        q_c = split_heads(self.q_proj(x), self.d_head)  # (B, H, T, d_h)
        q_r = split_heads(self.q_rope_proj(x), self.d_rope)  # (B, H, T, d_r)
        k_r = self.k_rope_proj(x).unsqueeze(1)  # (B, 1, T, d_r), one rotary key for all heads
        q_r, k_r = self.rotate(q_r, k_r, offset)
        latent = self.kv_down_proj(x)  # (B, T, d_latent)
        latent, k_r = extend_cache(cache, latent=latent, k_rope=k_r)  # compressed cache
        k_c = split_heads(self.k_up_proj(latent), self.d_head)  # (B, H, S, d_h)
        v = split_heads(self.v_up_proj(latent), self.d_head)  # (B, H, S, d_h)
        q = torch.cat([q_c, q_r], dim=-1)  # (B, H, T, d_h + d_r)
        k = torch.cat([k_c, k_r.expand(-1, k_c.shape[1], -1, -1)], dim=-1)  # (B, H, S, d_h + d_r)
        y = self.mix(q, k, v, offset)  # (B, H, T, d_h)
        return self.resid_dropout(self.out_proj(merge_heads(y)))


@register_rule
def rule_mla(cfg):
    if cfg.attention_variant != "mla":
        return
    if cfg.mla_rotary_dim <= 0 or cfg.mla_rotary_dim % 2:
        raise ConfigError(f"mla_rotary_dim={cfg.mla_rotary_dim} must be a positive even number "
                          "(RoPE rotates pairs)")
    if cfg.rope_length is not None and cfg.rope_length > cfg.mla_rotary_dim:
        raise ConfigError(f"rope_length={cfg.rope_length} exceeds mla_rotary_dim={cfg.mla_rotary_dim}, "
                          "the width MLA rotates; lower rope_length or raise mla_rotary_dim")
