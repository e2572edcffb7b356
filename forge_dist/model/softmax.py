"""Softmax variants: score normalisers for attention (softmax_variant_attn) and for sampling
(softmax_variant_output).

Interface of every variant: ``module(scores, mask: MaskSpec | None) -> probs`` with scores of shape
(B, H, T_q, T_k). Masked positions must come out exactly 0 with finite gradients, whatever the
formula does at -inf (ReaLLM-Forge's squareplus gives NaN there; that is a bug we do not copy).
Per-head parameters have a leading head dim (H, 1, 1) so tensor parallelism can slice them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.model.mask import MaskSpec
from forge_dist.model.registries import SOFTMAX


def masked_fill_neg_inf(scores: torch.Tensor, mask: MaskSpec | None):
    """Scores with hidden keys at -inf, and the keep matrix (None when nothing is hidden)."""
    if mask is None:
        return scores, None
    keep = mask.keep(scores.shape[-2], scores.shape[-1], scores.device)
    return scores.masked_fill(~keep, float("-inf")), keep


@SOFTMAX.register("softmax")
class Softmax(nn.Module):
    """e^{x - max} / sum e^{x - max}; a fully hidden row gives zeros."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, scores, mask: MaskSpec | None = None):
        x, keep = masked_fill_neg_inf(scores, mask)
        probs = torch.softmax(x, dim=-1)
        return probs if keep is None else probs.masked_fill(~keep, 0.0)


def build_softmax(name: str, config, option: str = "softmax_variant_attn") -> nn.Module:
    return SOFTMAX.build(name, config, option=option)
