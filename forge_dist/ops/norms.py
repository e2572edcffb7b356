"""Norms over the last dim: the fused kernel (csrc/cpu/norms.cpp, csrc/cuda/norm_kernels.cu) where
usable, else forge_dist.ops.reference.norms, with the same signatures and results.

One kernel computes y = (h - mean) rstd w (+ b), h = x (+ residual), rstd from the first k entries;
RMSNorm, pRMSNorm, the hypersphere projection and LayerNorm are settings of it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from forge_dist.ops import registry
from forge_dist.ops.reference import norms as ref
from forge_dist.ops.reference.norms import rms  # noqa: F401 - re-exported (no kernel: a statistic only)


_out_dtype = registry.result_dtype  # the reference's result dtype: x times the parameters


def _can_fuse(op: str, x: torch.Tensor, out_dtype: torch.dtype, *params) -> bool:
    return x.dim() >= 1 and x.shape[-1] > 0 and registry.usable(op, x, out_dtype, *params)


def _norm(x, residual, weight, bias, k, eps, center, out_dtype):
    y, h, _mean, _rstd = torch.ops.forge_ops.norm_fwd(x, residual, weight, bias, k, eps, center, out_dtype)
    return y, h


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]) -> torch.Tensor:
    """y = x / rms(x) * g; eps None is ReaLLM-Forge's eps-free x / (||x|| / sqrt(d)) (NaN for a zero row)."""
    out = _out_dtype(x, weight)
    if not _can_fuse("rms_norm", x, out, weight):
        return ref.rms_norm(x, weight, eps)
    return _norm(x, None, weight, None, x.shape[-1], eps or 0.0, False, out)[0]


def partial_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], k: int,
                     eps: Optional[float] = None) -> torch.Tensor:
    """pRMSNorm: the rms of the first k entries scales the whole row."""
    out = _out_dtype(x, weight)
    if not _can_fuse("partial_rms_norm", x, out, weight) or not 1 <= k <= x.shape[-1]:
        return ref.partial_rms_norm(x, weight, k, eps)
    return _norm(x, None, weight, None, k, eps or 0.0, False, out)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                 eps: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) with h = x + residual, in one pass over memory (the pre-norm block's
    ``x = x + attn(...); y = norm(x)``)."""
    out = _out_dtype(x, weight)
    if (not _can_fuse("add_rms_norm", x, out, weight, residual) or residual.shape != x.shape
            or residual.dtype != x.dtype):
        h = x + residual
        return ref.rms_norm(h, weight, eps), h
    return _norm(x, residual, weight, None, x.shape[-1], eps or 0.0, False, out)


def hypersphere_norm(x: torch.Tensor, radius: Union[float, torch.Tensor],
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = r x / ||x|| (* g): the eps-free RMSNorm with gain r g / sqrt(d), since ||x|| = sqrt(d) rms(x).
    A learned radius gets its gradient through that gain (autograd of the product)."""
    out = _out_dtype(x, radius, weight)
    if not _can_fuse("hypersphere_norm", x, out, weight, radius):
        return ref.hypersphere_norm(x, radius, weight)
    d = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # the kernel's parameter precision
    r = radius.to(acc) if isinstance(radius, torch.Tensor) else torch.tensor(float(radius), dtype=acc)
    gain = (r.to(x.device) / math.sqrt(d)).reshape(-1).expand(d)
    if weight is not None:
        gain = gain * weight
    return _norm(x, None, gain.contiguous(), None, d, 0.0, False, out)[0]


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm over the last dim (output in x's dtype, as F.layer_norm)."""
    if not _can_fuse("layer_norm", x, x.dtype, weight, bias) or (weight is None and bias is not None):
        return ref.layer_norm(x, weight, bias, eps)
    return _norm(x, None, weight, bias, x.shape[-1], eps, True, x.dtype)[0]


def k_rms_norm(x, weight, index, bits=None, recompute_pct=None, eps=None):
    """kRMSNorm has no kernel: its entries are a slice or a random draw, optionally fake-quantized
    per row with a per-row recompute test; the reference composes the fused pieces it needs."""
    return ref.k_rms_norm(x, weight, index, bits, recompute_pct, eps)
