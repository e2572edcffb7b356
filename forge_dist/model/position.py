"""Relative position encodings applied inside attention: RoPE (rope_variant=rope), SOAP
(rope_variant=soap) and FIRE (use_fire_embeddings). Learned absolute positions live in gpt.py.

Rotary modules map (..., T, D) -> (..., T, D) given the absolute position of the first token, so
KV-cached decoding and tensor-parallel head shards need nothing special. None of them holds
state between calls (upstream's SOAP rolls its angle table on every call; see
docs/divergences.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor, R: int) -> torch.Tensor:
    """Rotate the interleaved pairs (2i, 2i+1) of x[..., :R] by ``angles`` (T, R/2); the other
    dims pass through:  (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a)."""
    rot, rest = x[..., :R], x[..., R:]
    pairs = rot.float().unflatten(-1, (R // 2, 2))  # (..., T, R/2, 2)
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, arXiv 2104.09864) on interleaved pairs of the first R = rope_length
    dims: pair i at position p is rotated by p * theta_i, theta_i = 10000^(-2i/R)."""

    def __init__(self, size: int, rope_length: Optional[int] = None, base: float = 10000.0):
        super().__init__()
        self.rope_length = rope_length or size
        inv_freq = base ** (-torch.arange(0, self.rope_length, 2, dtype=torch.float64) / self.rope_length)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def angles(self, T: int, offset: int, device) -> torch.Tensor:  # (T, R/2)
        pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
        return torch.outer(pos, self.inv_freq.to(device))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return rotate_pairs(x, self.angles(x.shape[-2], offset, x.device), self.rope_length)


class SymmetricalOverlapAngularPositions(nn.Module):
    """SOAP: one table of N = sym_rot_num_angles angles a_n = 2 pi n / N; position p rotates
    *every* pair of the first R dims by the same angle a_(p mod N) (no frequency spectrum), so
    hardware stores N (cos, sin) pairs. Stateless: p is the absolute position."""

    def __init__(self, size: int, rope_length: Optional[int] = None, num_angles: int = 512):
        super().__init__()
        self.rope_length = rope_length or size
        self.num_angles = num_angles
        table = torch.arange(num_angles, dtype=torch.float64) * (2 * math.pi / num_angles)
        self.register_buffer("angle_table", table.float(), persistent=False)

    def angles(self, T: int, offset: int, device) -> torch.Tensor:  # (T, R/2)
        idx = torch.arange(offset, offset + T, device=device) % self.num_angles
        return self.angle_table.to(device)[idx].unsqueeze(-1).expand(T, self.rope_length // 2)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return rotate_pairs(x, self.angles(x.shape[-2], offset, x.device), self.rope_length)


def build_rotary(config, size: int, always: bool = False) -> Optional[nn.Module]:
    """The rotary module attention applies to q and k (``size`` = their head dim), or None
    (NoPE / absolute only). ``always`` builds it regardless of use_rotary_embeddings (MLA's
    decoupled RoPE branch)."""
    if not (config.use_rotary_embeddings or always):
        return None
    if config.rope_variant == "soap":
        return SymmetricalOverlapAngularPositions(size, config.rope_length, config.sym_rot_num_angles)
    return RotaryEmbedding(size, config.rope_length)


class FIRE(nn.Module):
    """FIRE (Li et al. 2023, arXiv 2310.04418, eq. 6): a learned additive attention bias

        b(i, j) = f( psi(|i - j|) / psi(max(i, L)) ),   psi(z) = log(c z + fire_log_bias),

    c learnable (init fire_init_c), L = |m * fire_init_L| with m learnable (init 1), and
    f: 1 -> fire_mlp_width (-> ... fire_num_hidden_layers) -> n_head an MLP with ReLU (and an
    outer ReLU with fire_outermost_sigma). i, j are absolute positions. Names and the 1e-6
    guards follow upstream's state dict (mlp.{k}, c, init_L, L_multiplier). The last Linear's
    output rows are the heads, so tensor parallelism shards FIRE by head.
    """

    def __init__(self, config, n_head: int, eps: float = 1e-6):
        super().__init__()
        width, hidden = config.fire_mlp_width, config.fire_num_hidden_layers
        if hidden >= 1:
            layers = [nn.Linear(1, width)]
            for _ in range(hidden - 1):
                layers += [nn.ReLU(), nn.Linear(width, width)]
            layers += [nn.ReLU(), nn.Linear(width, n_head)]
        else:
            layers = [nn.Linear(1, n_head)]
        if config.fire_outermost_sigma:
            layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        self.c = nn.Parameter(torch.tensor(float(config.fire_init_c)))
        self.init_L = nn.Parameter(torch.tensor(float(config.fire_init_L)), requires_grad=False)
        self.L_multiplier = nn.Parameter(torch.tensor(1.0))
        self.fire_log_bias = float(config.fire_log_bias)
        self.eps = eps

    @property
    def n_head(self) -> int:
        return self.mlp[-2 if isinstance(self.mlp[-1], nn.ReLU) else -1].out_features

    def forward(self, T_q: int, T_k: int, q_offset: int = 0) -> torch.Tensor:  # (H, T_q, T_k)
        device, dtype = self.c.device, self.c.dtype  # positions in the module's precision (fp64 parity runs)
        i = torch.arange(q_offset, q_offset + T_q, device=device, dtype=dtype)
        j = torch.arange(T_k, device=device, dtype=dtype)
        rel = (i[:, None] - j[None, :]).abs() + self.eps  # (T_q, T_k)
        L = (self.L_multiplier * self.init_L).abs()
        norm = torch.maximum(i, L)[:, None] + self.eps  # (T_q, 1): psi(max(i, L)) keeps z in [0, 1]
        num = torch.log(self.c * rel + self.fire_log_bias + self.eps)
        den = torch.log((self.c * norm).abs() + self.fire_log_bias + self.eps)
        return self.mlp((num / den).unsqueeze(-1)).permute(2, 0, 1)


@register_rule
def rule_fire(cfg):
    if not cfg.use_fire_embeddings:
        return
    if cfg.fire_num_hidden_layers < 0:
        raise ConfigError(f"fire_num_hidden_layers={cfg.fire_num_hidden_layers} must be >= 0 "
                          "(0: a single Linear 1 -> n_head)")
    if cfg.fire_mlp_width < 1:
        raise ConfigError(f"fire_mlp_width={cfg.fire_mlp_width} must be >= 1")
    if not cfg.fire_log_bias > 0:
        raise ConfigError(f"fire_log_bias={cfg.fire_log_bias} must be > 0 so that "
                          "psi(z) = log(c z + fire_log_bias) is defined at z = 0")
