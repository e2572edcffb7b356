"""Selective state-space mixer (attention_variant=ssm), Mamba style (Gu & Dao 2023, arXiv
2312.00752, Algorithm 2), in pure PyTorch. Upstream's ``ssm`` (a Hymba-derived Mamba block) is
commented out in the snapshot and needs CUDA-only kernels; this is our own, causal by construction.

    x, z  = in_proj(u).chunk(2)                       (B, T, E) each, E = ssm_mamba_expand * n_embd
    x     = silu(causal depthwise conv_K(x))          K = ssm_conv_kernel_size, left-padded
    dt, B, C = x_proj(x)  split (R, N, N)             R = ssm_dt_rank, N = ssm_d_state
    dt    = softplus(dt_proj(dt) + dt_bias)           (B, T, E) input-dependent step
    A     = -exp(A_log)                               (E, N), init A_en = -(n + 1)
    h_t   = exp(dt_t A) * h_{t-1} + dt_t B_t x_t      zero-order hold for A, Euler for B
    y_t   = C_t . h_t + D * x_t
    out   = out_proj(y * silu(z))                     in/out projections biased with ssm_io_bias

Per-channel parameters (conv1d, dt_bias, A_log, D) have the channel E as leading dim. The decode
state is the last K-1 conv inputs and h (B, E, N).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.attention.common import AttentionModule
from forge_dist.model.linear import build_linear
from forge_dist.variants import ATTENTION


def selective_scan(x, dt, A, Bm, Cm, h):
    """Sequential reference scan. x, dt (B, T, E); A (E, N); Bm, Cm (B, T, N); h (B, E, N).
    Returns y (B, T, E) with y_t = C_t . h_t (in x's dtype), and the last state h_T (float32:
    the recurrence runs in float32 whatever the activation precision)."""
    dtype = x.dtype
    x, dt, A, Bm, Cm, h = (t.float() for t in (x, dt, A, Bm, Cm, h))
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (B, T, E, N) decay per step
    dBx = (dt * x).unsqueeze(-1) * Bm.unsqueeze(2)  # (B, T, E, N) input per step
    ys = []
    for t in range(x.shape[1]):
        h = dA[:, t] * h + dBx[:, t]
        ys.append(torch.einsum("ben,bn->be", h, Cm[:, t]))
    return torch.stack(ys, dim=1).to(dtype), h


@ATTENTION.register("ssm")
class SelectiveSSM(AttentionModule):  # activation-quant points: input, output (no q.k scores)
    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__(config)
        C = config.n_embd
        E, N, R, K = config.ssm_mamba_expand * C, config.ssm_d_state, config.ssm_dt_rank, config.ssm_conv_kernel_size
        self.d_state, self.dt_rank, self.kernel_size = N, R, K
        self.in_proj = build_linear("q", C, 2 * E, config, config.ssm_io_bias)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, bias=True)  # depthwise; causal by left padding
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=False)
        # dt_bias = softplus^-1(dt0), dt0 log-uniform in [1e-3, 1e-1] (Mamba's init); kept outside
        # dt_proj so the model-wide Linear init does not reset it
        dt0 = torch.exp(torch.rand(E) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = build_linear("attn_proj", E, C, config, config.ssm_io_bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def transform(self, u, cache=None):  # (B, T, C) -> (B, T, C)
        B, T, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, E) each
        E, ctx = x.shape[-1], self.kernel_size - 1
        state = cache.state if cache is not None else {}
        prev = state.get("conv", x.new_zeros(B, ctx, E))  # the K-1 inputs before this chunk
        xp = torch.cat([prev, x], dim=1)  # (B, K-1+T, E)
        x = F.silu(self.conv1d(xp.transpose(1, 2)).transpose(1, 2))  # (B, T, E)
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt) + self.dt_bias)  # (B, T, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        h0 = state.get("ssm", x.new_zeros(B, E, self.d_state, dtype=torch.float32))
        y, h = selective_scan(x, dt, A, Bm, Cm, h0)
        if cache is not None:
            state["conv"], state["ssm"] = xp[:, xp.shape[1] - ctx:], h
        y = (y + x * self.D) * F.silu(z)
        return self.resid_dropout(self.out_proj(y))


@register_rule
def rule_ssm(cfg):
    for name in ("ssm_mamba_expand", "ssm_conv_kernel_size", "ssm_dt_rank", "ssm_d_state"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be a positive integer")
