"""Quantization ops: the fused kernel (csrc/cpu/quant.cpp, csrc/cuda/quant_kernels.cu) where usable,
else forge_dist.ops.reference.quantize with the same numerics (codes, scales, zero points).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from forge_dist.ops import registry
from forge_dist.ops.reference import quantize as ref

KERNEL_METHODS = {"affine_quant": False, "symmetric_quant": True}  # method -> symmetric
KERNEL_BITS = range(2, 17)  # float32 compute (the reference switches to float64 above 16 bits)


def fake_quantize(x: torch.Tensor, method: str, bits: int, dim: Optional[int] = None) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (d x_hat / d x = 1, Bengio et al. 2013).

    Statistics over the whole tensor (dim None) or one scale per slice along ``dim`` (e.g. dim=-1 on
    an (out, in) weight: per output channel). The kernel does it in one pass over memory per slice
    (two for a whole tensor: statistics, then codes) and its backward is the identity; other
    methods (stochastic, ternary) and options (mask, reduce_stats, stats_from) use the reference.
    """
    if (method in KERNEL_METHODS and bits in KERNEL_BITS and x.dim() >= 1 and x.numel() > 0
            and registry.usable("fake_quantize", x)):
        if dim is None:
            return torch.ops.forge_ops.fake_quantize(x, bits, KERNEL_METHODS[method], False)
        moved = x.movedim(dim, -1)
        return torch.ops.forge_ops.fake_quantize(moved, bits, KERNEL_METHODS[method], True).movedim(-1, dim)
    x_hat = ref.fake_quantize(x, method, bits, dim=dim).detach()
    return x_hat + (x - x.detach())  # exactly x_hat forward, gradient 1


def _per_channel(v: torch.Tensor, n: int) -> torch.Tensor:
    """A scale or zero point as (1,) (per tensor) or (N,) (per output channel); any shape with 1 or N values."""
    flat = torch.as_tensor(v).reshape(-1)
    if flat.numel() not in (1, n):
        raise ValueError(f"expected 1 or {n} quantization parameters, got shape {tuple(v.shape)}")
    return flat


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b with W = (q - zero_point) * scale, q int8 (out, in): the weights stay int8 in
    memory. Up to 8 rows (decoding, memory-bound) the kernel dequantises each weight row in cache
    inside the dot products, reading a quarter of the float bytes; above, the matmul is compute-bound
    and the weights are dequantised in one pass for the BLAS (CUDA: in tiles of 1024 rows).
    scale / zero_point: one value, or one per output channel. The gradient reaches x (and the bias)."""
    n = qweight.shape[0]
    scale, zero_point = _per_channel(scale, n), _per_channel(zero_point, n)
    if (qweight.dtype == torch.int8 and qweight.dim() == 2 and x.shape[-1] == qweight.shape[1]
            and scale.numel() == zero_point.numel() and registry.usable("int8_linear", x, None, qweight, scale)):
        return torch.ops.forge_ops.int8_linear(x, qweight, scale, zero_point, bias)
    w = ref.dequantize(zero_point.reshape(-1, 1), scale.reshape(-1, 1), qweight, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
