"""Reference norms over the last dimension.

Every function here is pure (no module state) so a fused kernel can replace it one for one; the
model calls them through ``forge_dist.ops``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from forge_dist.ops.reference.quantize import fake_quantize

Index = Union[slice, torch.Tensor]


def rms(x: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:  # (..., d) -> (..., 1)
    """sqrt(mean(x^2)) over the last dim; with eps, sqrt(mean(x^2) + eps).

    Without eps it is ReaLLM-Forge's ||x||_2 / sqrt(d), so a zero row gives NaN downstream, as there.
    """
    if eps is None:
        return x.norm(2, dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _scale(y: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    return y if weight is None else y * weight


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]) -> torch.Tensor:
    """y = x / rms(x) * g, rms(x) = sqrt(mean(x^2) (+ eps)).

    ReaLLM-Forge's RMSNorm has no epsilon (eps=None): it computes x / (||x||_2 / sqrt(d)), so a
    zero row gives NaN there as here. eps adds inside the square root, as in Zhang & Sennrich 2019.
    """
    if eps is None:
        y = x / rms(x)
    else:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return _scale(y, weight)


def partial_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], k: int,
                     eps: Optional[float] = None) -> torch.Tensor:
    """pRMSNorm (Zhang & Sennrich 2019, sec. 4): y = x / rms(x[..., :k]) * g.

    The statistic comes from the first k entries only; the whole row is scaled by it.
    """
    return _scale(x / rms(x[..., :k], eps), weight)


def _fake_quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Affine fake quantization to signed ``bits`` integers with one scale and zero point per row
    (forge_dist.ops.reference.quantize.affine_quantize along the last dim) and a straight-through
    gradient, d x_hat / d x = 1 (Bengio et al. 2013)."""
    x_hat = fake_quantize(x, "affine_quant", bits, dim=-1)
    return x + (x_hat - x).detach()


def k_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], index: Index, bits: Optional[int] = None,
               recompute_pct: Optional[float] = None, eps: Optional[float] = None) -> torch.Tensor:
    """kRMSNorm: y = x / s * g with s = rms of the k entries ``x[..., index]``.

    bits: fake-quantize the selected slice (per row) before taking its rms.
    recompute_pct p: a row whose s is not within (rms(x)(1-p), rms(x)(1+p)) uses the full rms(x)
    instead; decided per row, so every row of a batch is treated as it would be alone.
    """
    part = x[..., index]
    if bits is not None:
        part = _fake_quantize_rows(part, bits)
    s = rms(part, eps)
    if recompute_pct is not None:
        full = rms(x, eps)
        close = (s > full * (1 - recompute_pct)) & (s < full * (1 + recompute_pct))
        s = torch.where(close, s, full)
    return _scale(x / s, weight)


def hypersphere_norm(x: torch.Tensor, radius: Union[float, torch.Tensor],
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Projection onto the sphere of radius r: y = r * x / ||x||_2 (* g) (nGPT-style)."""
    return _scale(x / x.norm(2, dim=-1, keepdim=True) * radius, weight)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
