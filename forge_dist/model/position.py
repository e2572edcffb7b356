"""Relative position encodings applied inside attention: RoPE (rope_variant=rope), SOAP
(rope_variant=soap) and FIRE (use_fire_embeddings). Learned absolute positions live in gpt.py.

Rotary modules map (B, H, T, D) -> (B, H, T, D) given the absolute position of the first query,
so KV-cached decoding and tensor-parallel head shards need nothing special.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) on interleaved pairs (2i, 2i+1) of the first ``rope_length`` dims:
    theta_i = 10000^(-2i/R), pair i at position p rotated by p*theta_i; other dims pass through."""

    def __init__(self, head_dim: int, rope_length: Optional[int] = None, base: float = 10000.0):
        super().__init__()
        self.rope_length = rope_length or head_dim
        inv_freq = base ** (-torch.arange(0, self.rope_length, 2, dtype=torch.float64) / self.rope_length)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def angles(self, T: int, offset: int, device) -> torch.Tensor:  # (T, R/2)
        pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
        return torch.outer(pos, self.inv_freq.to(device))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return rotate_pairs(x, self.angles(x.shape[-2], offset, x.device), self.rope_length)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor, R: int) -> torch.Tensor:
    """Rotate interleaved pairs of x[..., :R] by ``angles`` (T, R/2) (or broadcastable)."""
    rot, rest = x[..., :R], x[..., R:]
    pairs = rot.float().unflatten(-1, (R // 2, 2))  # (..., T, R/2, 2)
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


ROTARY_VARIANTS = {"rope": RotaryEmbedding}


def build_rotary(config, head_dim: int) -> Optional[nn.Module]:
    """The rotary module attention applies to q and k, or None (NoPE / absolute only)."""
    if not config.use_rotary_embeddings:
        return None
    return ROTARY_VARIANTS[config.rope_variant](head_dim, config.rope_length)
