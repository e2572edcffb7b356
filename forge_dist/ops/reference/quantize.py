"""Reference quantizers: the integer codes, scales and zero points a fused kernel must reproduce.

Per-tensor quantizers of ReaLLM-Forge (quantization/quantize.py); each returns
``(zero_point, scale, q)`` with the dequantized value ``(q - zero_point) * scale``:

  affine     scale = (max - min) / (2^b - 1),  zp = -round(min / scale) + qmin,
             q = clamp(round(x / scale) + zp, qmin, qmax)          qmin = -2^(b-1), qmax = 2^(b-1) - 1
  symmetric  scale = max|x| / (2^(b-1) - 1),  zp = 0,  q = clamp(round(x / scale), qmin, qmax)
  stochastic scale = max|x| / s,  s = 2^b - 1,  l = |x| / scale,
             q = sign(x) (floor(l) + Bernoulli(frac(l)))            (unbiased: E[q scale] = x)
  ternary    scale = mean|x| (at least 1e-5),  zp = 0,  q = clamp(round(x / scale), -1, 1)

``torch.round`` rounds half to even, as upstream. Statistics are taken over the whole tensor, over
the entries where ``mask`` is True (e.g. the causal lower triangle of attention scores), or per
slice along ``dim`` (BitNet's per-token absmax). Every statistic passes through
``reduce_stats(value, op)`` with op in {"max", "min", "sum"}: a tensor-parallel layer that holds a
shard passes an all-reduce over its group, so every rank quantizes exactly like the unsharded
tensor. Replicated inputs must only be reduced with "max"/"min" (idempotent), never "sum".
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

ReduceStats = Callable[[torch.Tensor, str], torch.Tensor]
Quantized = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (zero_point, scale, q)

TERNARY_MIN_SCALE = 1e-5


def no_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    """The single-device statistic reduction: the local value is the global one."""
    return value


def int_range(bits: int) -> Tuple[int, int]:
    """Signed range of ``bits`` integers: (-2^(b-1), 2^(b-1) - 1)."""
    if bits < 1:
        raise ValueError(f"quantization bits={bits} must be at least 1")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def storage_dtype(bits: int) -> torch.dtype:
    """Smallest signed integer type holding ``bits``-bit codes (upstream's set_dtype)."""
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def compute_dtype(x: torch.Tensor, bits: int) -> torch.dtype:
    """float32 at least; float64 above 16 bits so 32-bit codes are exact."""
    return torch.float64 if bits > 16 else torch.promote_types(x.dtype, torch.float32)


# --- statistics (the one step tensor parallelism overrides) ------------------------------------
def tensor_stat(x: torch.Tensor, kind: str, mask: Optional[torch.Tensor] = None, dim: Optional[int] = None,
                reduce_stats: Optional[ReduceStats] = None) -> torch.Tensor:
    """max | min | absmax | absmean of ``x`` over the masked entries, whole tensor or along ``dim``.

    Returns a 0-d tensor (dim None) or one with ``dim`` kept as size 1.
    """
    reduce = reduce_stats or no_reduce
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    keep = dim is not None
    if mask is not None:
        mask = mask.expand_as(x)
    if kind == "absmean":
        a = x.abs() if mask is None else x.abs().masked_fill(~mask, 0)
        total = reduce(a.sum(dims, keepdim=keep), "sum")
        n = torch.full_like(total, x.numel() // max(1, total.numel())) if mask is None else \
            mask.sum(dims, keepdim=keep).to(total.dtype)
        return total / reduce(n, "sum").clamp(min=1)
    if kind == "absmax":
        a = x.abs() if mask is None else x.abs().masked_fill(~mask, 0)
        return reduce(a.amax(dims, keepdim=keep), "max")
    if kind in ("max", "min"):
        fill = float("-inf") if kind == "max" else float("inf")
        v = x if mask is None else x.masked_fill(~mask, fill)
        v = v.amax(dims, keepdim=keep) if kind == "max" else v.amin(dims, keepdim=keep)
        return reduce(v, kind)
    raise ValueError(f"unknown statistic {kind!r}")


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A zero range (a constant or all-zero tensor) gets scale 1, so codes stay finite."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _prepare(x, bits, mask, stats_from):
    """x in the compute dtype with masked-out entries zeroed (they may be -inf), and the tensor
    the statistics come from (``stats_from``, e.g. a whole embedding table, or x itself)."""
    cd = compute_dtype(x, bits)
    xc = x.to(cd)
    if mask is not None:
        xc = xc.masked_fill(~mask.expand_as(xc), 0)
    src = xc if stats_from is None else stats_from.to(cd)
    return xc, src


# --- the four quantizers -------------------------------------------------------------------------
def affine_quantize(x: torch.Tensor, bits: int, *, mask=None, dim=None, reduce_stats=None, stats_from=None,
                    generator=None) -> Quantized:
    qmin, qmax = int_range(bits)
    xc, src = _prepare(x, bits, mask, stats_from)
    lo = tensor_stat(src, "min", mask if stats_from is None else None, dim, reduce_stats)
    hi = tensor_stat(src, "max", mask if stats_from is None else None, dim, reduce_stats)
    scale = _nonzero((hi - lo) / ((1 << bits) - 1))
    zero_point = -torch.round(lo / scale) + qmin
    q = torch.clamp(torch.round(xc / scale) + zero_point, qmin, qmax)
    return zero_point, scale, q.to(storage_dtype(bits))


def symmetric_quantize(x: torch.Tensor, bits: int, *, mask=None, dim=None, reduce_stats=None, stats_from=None,
                       generator=None) -> Quantized:
    qmin, qmax = int_range(bits)
    if qmax < 1:
        raise ValueError("symmetric_quant needs bits >= 2 (1 bit leaves no positive level)")
    xc, src = _prepare(x, bits, mask, stats_from)
    scale = _nonzero(tensor_stat(src, "absmax", mask if stats_from is None else None, dim, reduce_stats) / qmax)
    q = torch.clamp(torch.round(xc / scale), qmin, qmax)
    return torch.zeros_like(scale), scale, q.to(storage_dtype(bits))


def stochastic_quantize(x: torch.Tensor, bits: int, *, mask=None, dim=None, reduce_stats=None, stats_from=None,
                        generator: Optional[torch.Generator] = None) -> Quantized:
    """Codes lie in [-(2^b - 1), 2^b - 1]: sign plus a b-bit magnitude, so they are stored in the
    next wider type (upstream casts 8-bit codes to int8, which wraps values above 127)."""
    s = (1 << bits) - 1
    xc, src = _prepare(x, bits, mask, stats_from)
    scale = _nonzero(tensor_stat(src, "absmax", mask if stats_from is None else None, dim, reduce_stats) / s)
    level = (xc.abs() / scale).clamp(max=s)
    low = torch.floor(level)
    up = torch.bernoulli((level - low).clamp(0, 1), generator=generator)
    q = torch.sign(xc) * (low + up)
    return torch.zeros_like(scale), scale, q.to(storage_dtype(bits + 1))


def ternary_quantize(x: torch.Tensor, bits: int = 2, *, mask=None, dim=None, reduce_stats=None,
                     stats_from=None, generator=None) -> Quantized:
    """``bits`` is ignored: codes are always {-1, 0, 1} (BitNet b1.58's absmean weights)."""
    xc, src = _prepare(x, 2, mask, stats_from)
    mean = tensor_stat(src, "absmean", mask if stats_from is None else None, dim, reduce_stats)
    scale = mean.clamp(min=TERNARY_MIN_SCALE)
    q = torch.clamp(torch.round(xc / scale), -1, 1)
    return torch.zeros_like(scale), scale, q.to(torch.int8)


QUANTIZERS = {
    "affine_quant": affine_quantize,
    "symmetric_quant": symmetric_quantize,
    "stochastic_quant": stochastic_quantize,
    "ternary_quant": ternary_quantize,
}


def dequantize(zero_point: torch.Tensor, scale: torch.Tensor, q: torch.Tensor,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x_hat = (q - zero_point) * scale."""
    out = (q.to(scale.dtype) - zero_point) * scale
    return out if dtype is None else out.to(dtype)


def fake_quantize(x: torch.Tensor, method: str, bits: int, **kwargs) -> torch.Tensor:
    """quantize then dequantize, in x's dtype (no gradient plumbing; see forge_dist.model.quantize)."""
    zero_point, scale, q = QUANTIZERS[method](x, bits, **kwargs)
    return dequantize(zero_point, scale, q, x.dtype)


# --- BitNet numerics -----------------------------------------------------------------------------
def sign_binarize(w: torch.Tensor, reduce_stats: Optional[ReduceStats] = None) -> torch.Tensor:
    """BitNet (Wang et al. 2023, eq. 1-2): sign(W - mean(W)) as int8 codes in {-1, 0, 1}."""
    reduce = reduce_stats or no_reduce
    mean = reduce(w.sum(), "sum") / reduce(torch.tensor(float(w.numel()), dtype=w.dtype, device=w.device), "sum")
    return torch.sign(w - mean).to(torch.int8)


def absmax_rescale(y: torch.Tensor, bits: int = 8, eps: float = 1e-5, dim: Optional[int] = -1,
                   reduce_stats: Optional[ReduceStats] = None) -> torch.Tensor:
    """BitNet's activation range map: clamp(y Q_b / (gamma + eps), -Q_b + eps, Q_b - eps) with
    Q_b = 2^(b-1) and gamma = max|y| (per token along ``dim``; whole tensor when dim is None).
    Clamped, not rounded, and not mapped back (as Beomi's BitLinear in ReaLLM-Forge)."""
    q_b = float(1 << (bits - 1))
    gamma = tensor_stat(y, "absmax", None, dim, reduce_stats)
    return torch.clamp(y * q_b / (gamma + eps), -q_b + eps, q_b - eps)
