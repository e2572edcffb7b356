"""Transformer block: attention then MLP (or both in parallel), with pre-, peri- and post-LN in
any combination (ReaLLM-Forge block_variations; names match its state dict):

  sequential: a = out_ln_attn(attn(pre_ln_attn(x)));  x = post_ln_attn(x + a)
              m = out_ln_mlp(mlp(pre_ln_mlp(x)));     x = post_ln_mlp(x + m)
  parallel:   h = pre_ln(x);  x = post_ln(x + out_ln_attn(attn(h)) + out_ln_mlp(mlp(h)))   (GPT-J)

``use_peri_ln`` adds the output norms (out_ln_*), Peri-LN style; the per-branch options
(use_pre_ln_attn, ...) override the block-wide ones when set.
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.norm import build_norm


def _flag(config, position: str, branch: str) -> bool:
    specific = getattr(config, f"use_{position}_ln_{branch}")
    return getattr(config, f"use_{position}_ln") if specific is None else specific


class Block(nn.Module):
    def __init__(self, config, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.parallel = config.use_parallel_mlp
        self.attn = attn
        self.mlp = mlp

        def norm_if(flag):
            return build_norm(config.norm_variant_attn, config) if flag else None

        if self.parallel:
            self.pre_ln = norm_if(config.use_pre_ln)
            self.post_ln = norm_if(config.use_post_ln)
        else:
            self.pre_ln_attn = norm_if(_flag(config, "pre", "attn"))
            self.pre_ln_mlp = norm_if(_flag(config, "pre", "mlp"))
            self.post_ln_attn = norm_if(_flag(config, "post", "attn"))
            self.post_ln_mlp = norm_if(_flag(config, "post", "mlp"))
        self.out_ln_attn = norm_if(_flag(config, "peri", "attn"))
        self.out_ln_mlp = norm_if(_flag(config, "peri", "mlp"))

    @staticmethod
    def _maybe_norm(norm, x):
        return x if norm is None else norm(x)

    def forward(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        n = self._maybe_norm
        if self.parallel:
            h = n(self.pre_ln, x)
            a = n(self.out_ln_attn, self.attn(h, cache=cache))
            m = n(self.out_ln_mlp, self.mlp(h))
            return n(self.post_ln, x + a + m)
        x = n(self.post_ln_attn, x + n(self.out_ln_attn, self.attn(n(self.pre_ln_attn, x), cache=cache)))
        x = n(self.post_ln_mlp, x + n(self.out_ln_mlp, self.mlp(n(self.pre_ln_mlp, x))))
        return x
