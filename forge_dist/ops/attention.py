"""Fused attention over any score normaliser: out_i = sum_j f(s_ij) v_j / D_i without the (T, S)
scores (csrc/cpu/attention.cpp); its autograd and fake-tensor rules are in forge_dist.ops.autograd.

``attention(q, k, v, spec, ...)`` takes the normaliser as a spec: an elementwise one
(forge_dist.ops.scores.ElemSpec: kind, constants, learned beta and gamma) or a row-normalised one
(forge_dist.model.softmax.RowSpec: exponent scale, transform, shift, obo, divisor). It returns None
where no kernel takes the call (device, dtype, a transform without a kernel code, a bias of
another shape); the caller then runs the blocked PyTorch path. Every learned parameter (beta,
gamma, per-head factors, temperature, obo, the flash-LOBO sink, the FIRE bias) gets its gradient
through the op's backward; a learned divisor (scalar or per head) of a row-normalised variant
divides the CPU kernel's output, its gradient by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from forge_dist.ops import registry
from forge_dist.ops.mask import MaskSpec
from forge_dist.ops.scores import ElemSpec, mask_args

ELEMENTWISE, ROWNORM = 0, 1
SHIFTS = {"none": 0, "max": 1, "guess": 2, "guess_or_max": 3}  # csrc ShiftMode
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_HAS_KERNEL: dict = {}


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def has_kernel(device: str) -> bool:
    """The loaded library has the fused attention kernel for ``device`` (a stale prebuilt may not)."""
    if device not in _HAS_KERNEL:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device)
        try:
            _HAS_KERNEL[device] = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
                "forge_ops::attention_fwd", key)
        except RuntimeError:
            _HAS_KERNEL[device] = False
    return _HAS_KERNEL[device]


def _vector(p, acc: torch.dtype, device) -> torch.Tensor:
    """A float, 0-d, (1,), (H,) or (H, 1, 1) parameter as a flat (n,) tensor (autograd kept)."""
    t = p if torch.is_tensor(p) else torch.tensor(float(p), dtype=acc)
    return t.to(device=device, dtype=acc).reshape(-1)


def _bias(bias: Optional[torch.Tensor], B: int, Hq: int, T: int, S: int, acc) -> Optional[torch.Tensor]:
    """(1 or Hq, T, S) in the accumulation type, or a bias with a batch dimension as (B, 1 or Hq, T, S);
    False when the bias has another layout."""
    if bias is None:
        return None
    while bias.dim() > 3 and bias.shape[0] == 1:
        bias = bias.squeeze(0)
    if bias.dim() == 4 and bias.shape[0] == B and bias.shape[1] in (1, Hq):
        return bias.expand(B, bias.shape[1], T, S).to(acc)
    if bias.dim() > 3:
        return False
    bias = bias.reshape((1,) * (3 - bias.dim()) + tuple(bias.shape))
    if bias.shape[0] not in (1, Hq):
        return False
    return bias.expand(bias.shape[0], T, S).to(acc)


def kernel_args(q, k, v, spec, *, mask: MaskSpec, scale: float, softcap: Optional[float] = None,
                bias: Optional[torch.Tensor] = None, sink_logit=None):
    """The attention_fwd op's arguments for ``spec`` (the one layout every fused attention kernel reads:
    this library's CPU op and the Triton kernels of forge_dist.ops.triton_attention), or None where
    no kernel covers the call (a transform without a kernel code, another bias layout). A bias is
    (1 or H, T, S) or (B, 1 or H, T, S); a learned divisor is left out of the op's constant factor: the
    caller divides the output by it (learned_divisor)."""
    acc, dev = _acc(q), q.device
    B, Hq, T, _ = q.shape
    S = k.shape[-2]
    b = _bias(bias, B, Hq, T, S, acc)
    if b is False:
        return None
    empty = q.new_zeros((0,), dtype=acc)
    one = torch.ones(1, dtype=acc, device=dev)
    if isinstance(spec, ElemSpec):
        beta, gamma = _vector(spec.beta, acc, dev), _vector(spec.gamma, acc, dev)
        n = max(beta.numel(), gamma.numel())
        if n not in (1, Hq) or beta.numel() not in (1, n) or gamma.numel() not in (1, n):
            return None
        params = torch.stack([beta.expand(n), gamma.expand(n)], dim=1)
        if spec.table is not None:  # [beta, gamma, table...] per row
            params = torch.cat([params, spec.table.to(device=dev, dtype=acc).reshape(1, -1).expand(n, -1)], dim=1)
        obo, sink = empty, empty
        if spec.divide:  # a row sum of the curve: the addend, and the flash-LOBO sink it counts
            obo = _vector(spec.addend, acc, dev)
            sink = empty if sink_logit is None else _vector(sink_logit, acc, dev)
            if obo.numel() not in (1, Hq) or sink.numel() not in (0, 1, Hq):
                return None
        row = [0.0, 0.0, float(spec.divide), 0.0, 0.0, 0.0, 1.0]
        args = (params, one, obo, sink, ELEMENTWISE, spec.kind, [float(c) for c in spec.consts], row)
    else:
        learned = torch.is_tensor(spec.divisor)
        if spec.kernel_transform is None and spec.transform is not None:
            return None
        code, tparam = spec.kernel_transform if spec.transform is not None else (0, 0.0)
        obo = _vector(spec.obo, acc, dev)
        sink = empty if sink_logit is None else _vector(sink_logit, acc, dev)
        if obo.numel() not in (1, Hq) or sink.numel() not in (0, 1, Hq):
            return None
        post = (1.0 if learned else 1.0 / float(spec.divisor)) / (spec.seq_len or 1)
        row = [float(code), float(SHIFTS[spec.shift]), float(spec.divide), float(tparam), float(spec.guess),
               float(spec.overflow), post]
        c = _vector(spec.log_scale, acc, dev)
        args = (empty, c, obo, sink, ROWNORM, 0, [0.0] * 8, row)
    return (q, k, v, b) + args + (mask_args(mask), float(scale), float(softcap or 0.0))


def learned_divisor(spec, q: torch.Tensor):
    """A row-normalised variant's learned divisor as (1 or H, 1, 1) in q's dtype, which divides the
    kernel's output (its gradient by autograd); None without one; False if shaped for no head layout."""
    divisor = None if isinstance(spec, ElemSpec) else spec.divisor
    if not torch.is_tensor(divisor):
        return None
    divisor = divisor.to(q.dtype).reshape(-1, 1, 1)
    return divisor if divisor.shape[0] in (1, q.shape[1]) else False


def run_fwd(op, q, k, v, spec, **kw) -> Optional[torch.Tensor]:
    """op (an attention_fwd: this library's CPU op or the Triton one) on kernel_args(q, k, v, spec, **kw),
    its output divided by the learned divisor; None where no kernel covers the call."""
    divisor = learned_divisor(spec, q)
    args = None if divisor is False else kernel_args(q, k, v, spec, **kw)
    if args is None:
        return None
    out = op(*args)[0]
    return out if divisor is None else out / divisor


def attention(q, k, v, spec, *, mask: MaskSpec, scale: float, softcap: Optional[float] = None,
              bias: Optional[torch.Tensor] = None, sink_logit=None, n_keys: Optional[int] = None):
    """q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, Hq, T, Dv), or None (no kernel).
    ``sink_logit``: the flash-LOBO virtual key (log C; scalar or per head), counted by row-normalised
    variants only (it has a zero value, so an elementwise variant's output does not see it)."""
    if (q.device.type != "cpu" or q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype)
            or not registry.kernel_device(q, "attention") or not has_kernel("cpu")):
        return None
    return run_fwd(torch.ops.forge_ops.attention_fwd, q, k, v, spec, mask=mask, scale=scale, softcap=softcap,
                   bias=bias, sink_logit=sink_logit)
