"""Reference norms over the last dimension."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]) -> torch.Tensor:
    """y = x / rms(x) * g, rms(x) = sqrt(mean(x^2) (+ eps)).

    ReaLLM-Forge's RMSNorm has no epsilon (eps=None): it computes x / (||x||_2 / sqrt(d)), so a
    zero row gives NaN there as here. eps adds inside the square root, as in Zhang & Sennrich 2019.
    """
    if eps is None:
        rms = x.norm(2, dim=-1, keepdim=True) / (x.shape[-1] ** 0.5)
        y = x / rms
    else:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
