"""The fused attention route for score normalisers: the normaliser's spec handed to a kernel that never
holds the (B, H, T, S) scores. CPU: the C++ kernel (forge_dist.ops.attention); CUDA: the Triton
kernel (forge_dist.ops.triton_attention, where triton is installed), else FlexAttention
(attention/flex.py); both unverified on GPU. None where none takes the call: attention/core.py then
runs the blocked PyTorch path (attention/blocked.py), or the materialised one (FORGE_OPS=reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from forge_dist.ops import attention as fused_op
from forge_dist.ops import triton_attention
from forge_dist.ops.mask import MaskSpec


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def spec_of(normalizer: nn.Module, n_keys: int):
    """ElemSpec (elementwise variants, and a curve divided by its row sum: pfla_softmax) or RowSpec
    (row-normalised ones) over n_keys real keys, or None."""
    elem = getattr(normalizer, "elem_spec", None)
    if elem is not None:
        spec = elem(n_keys if getattr(normalizer, "div_by_seq_len", False) else None)
        if spec is not None:
            return spec
    spec = getattr(normalizer, "row_spec", None)
    return None if spec is None else spec(n_keys)


def fused_attend(q, k, v, *, normalizer: nn.Module, mask: MaskSpec, scale: float, softcap=None,
                 bias: Optional[torch.Tensor] = None, sink_logit=None) -> Optional[torch.Tensor]:
    """(B, Hq, T, Dv), the materialised path's result, or None (no fused kernel for this call)."""
    spec = spec_of(normalizer, k.shape[-2] - mask.n_sink)
    if spec is None:
        return None
    if _on_cuda(q):  # Triton kernel, else FlexAttention (both unverified on GPU)
        y = triton_attention.attention(q, k, v, spec, mask=mask, scale=scale, softcap=softcap, bias=bias,
                                       sink_logit=sink_logit)
        if y is not None:
            return y
        from forge_dist.model.attention import flex

        return flex.flex_attend(q, k, v, spec, mask=mask, scale=scale, softcap=softcap, bias=bias,
                                sink_logit=sink_logit)
    return fused_op.attention(q, k, v, spec, mask=mask, scale=scale, softcap=softcap, bias=bias,
                              sink_logit=sink_logit)
