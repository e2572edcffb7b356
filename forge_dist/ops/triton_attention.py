"""The GPU route of the fused score-normaliser attention: Triton kernels (forge_dist.ops.triton_kernels)
behind the custom ops ``forge_triton::attention_fwd`` / ``attention_bwd``, which take exactly the
arguments of this library's CPU op (forge_dist.ops.attention.kernel_args builds them for both) and
share its fake-tensor and autograd rules (forge_dist.ops.autograd), so torch.compile traces the call
as one opaque op. UNVERIFIED ON GPU: checked on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, tests/ops/test_triton_attention.py); bench/gpu_check.sh times it on a GPU.

Route order on CUDA (forge_dist.model.attention.fused): this Triton kernel, else FlexAttention
(attention/flex.py), else the blocked / materialised PyTorch paths; FORGE_OPS=reference keeps the
materialised one. Triton is optional: without it (or on a CPU tensor outside the interpreter) the
route answers None.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Tuple

import torch

from forge_dist.ops import attention as fused_op
from forge_dist.ops import autograd, registry

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TRANSFORM, _SHIFT, _DIVIDE, _TPARAM, _GUESS, _OVERFLOW, _POST = range(7)  # the op's ``row`` list


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # found, not imported (seconds)


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, read when the kernels module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton kernel takes these tensors: triton installed, a CUDA tensor (or a CPU one under the
    interpreter), a float dtype shared by q, k, v, and FORGE_OPS is not ``reference``."""
    on_device = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    return (on_device and triton_installed() and q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype
            and registry.mode() != "reference")


def attention(q, k, v, spec, *, mask, scale: float, softcap: Optional[float] = None,
              bias: Optional[torch.Tensor] = None, sink_logit=None) -> Optional[torch.Tensor]:
    """forge_dist.ops.attention.attention's contract on the Triton kernel: (B, Hq, T, Dv), or None."""
    if not usable(q, k, v):
        return None
    return fused_op.run_fwd(torch.ops.forge_triton.attention_fwd, q, k, v, spec, mask=mask, scale=scale,
                            softcap=softcap, bias=bias, sink_logit=sink_logit)


# --- launch -----------------------------------------------------------------------------------------
def _acc(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _launch_config(q, k, v, bias, params, obo, sink, family, kind, consts, row, mask, softcap):
    """The kernels' shared runtime scalars and constexpr codes (the variant's codes as the CPU op reads them)."""
    from forge_dist.ops import scores

    B, Hq, T, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    enabled, causal, window, q_offset, n_sink = (int(m) for m in mask)
    if not enabled:
        causal, window, q_offset, n_sink = 0, -1, 0, 0
    from forge_dist.ops.triton_kernels import NO_WINDOW

    window = NO_WINDOW if window < 0 else window
    square = (kind == scores.ELEM_KINDS["polymax"] and consts[2] == 2.0) or (
        kind == scores.ELEM_KINDS["exppolymax"] and consts[1] == 2.0) or (  # scores.h dispatch_elem
        kind == scores.ELEM_KINDS["pfla_softmax"] and consts[0] != 0.0)  # pfla's quadratic mode
    block_d = max(16, 1 << (max(D, DV) - 1).bit_length())
    # interpreter: small tiles run faster; GPU: 64 x 64 tiles, 32 where the rows are wide enough to
    # pass the shared memory of one block (python -m forge_dist.ops.triton_compile prints it)
    block = 16 if q.device.type == "cpu" else 64 if q.element_size() * block_d <= 256 else 32
    runtime = dict(Hq=Hq, Hkv=Hkv, T=T, S=S, n_params=max(params.shape[0], 1) if params.dim() else 1,
                   p_width=params.shape[1] if params.dim() == 2 else 2,  # [beta, gamma, pfla's knot table]
                   n_obo=max(obo.numel(), 1), q_offset=q_offset, n_sink=n_sink, window=window,
                   bias_heads=0 if bias is None else bias.shape[-3],  # (1 or H, T, S) or (B, 1 or H, T, S)
                   bias_batch=int(bias is not None and bias.dim() == 4 and bias.shape[0] > 1))
    meta = dict(D=D, DV=DV, FAMILY=int(family), KIND=int(kind), SQUARE=bool(square),
                TRANSFORM=int(row[_TRANSFORM]) if family == fused_op.ROWNORM else 0,
                DIVIDE=bool(row[_DIVIDE]), CAUSAL=bool(causal),
                HAS_BIAS=bias is not None, SOFTCAP=softcap != 0.0,
                # fp32 parity over tf32 speed; bf16 / fp16 dots native (upcast in the interpreter: tk.mm)
                PREC="upcast" if q.device.type == "cpu" and q.element_size() == 2 else "ieee",
                BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, 1 << (D - 1).bit_length()),
                BLOCK_DV=max(16, 1 << (DV - 1).bit_length()), num_warps=4, num_stages=2)
    return B, runtime, meta


def _fargs(q, consts, row, scale, softcap) -> torch.Tensor:
    """triton_kernels' float argument tensor [scale, softcap, consts[0..7], tparam, guess, overflow, post]."""
    c = [float(x) for x in consts][:8] + [0.0] * max(0, 8 - len(consts))
    r = [float(x) for x in row] + [0.0] * (7 - len(row))
    return torch.tensor([scale, softcap, *c, r[_TPARAM], r[_GUESS], r[_OVERFLOW], r[_POST]], dtype=_acc(q),
                        device=q.device)


def _or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A real pointer for an absent or empty tensor argument (never read: its flag is off)."""
    return dummy if t is None or t.numel() == 0 else t.contiguous()


@torch.library.custom_op("forge_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  params: torch.Tensor, c: torch.Tensor, obo: torch.Tensor, sink: torch.Tensor, family: int,
                  kind: int, consts: List[float], row: List[float], mask: List[int], scale: float,
                  softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    from forge_dist.ops import triton_kernels as tk

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, rt, meta = _launch_config(q, k, v, bias, params, obo, sink, family, kind, consts, row, mask, softcap)
    rownorm = family == fused_op.ROWNORM
    out = q.new_empty((B, rt["Hq"], rt["T"], v.shape[-1]))
    stats = q.new_empty((B if rownorm or meta["DIVIDE"] else 0, rt["Hq"], rt["T"], 3), dtype=_acc(q))
    if out.numel() == 0:
        return out, stats
    f = _fargs(q, consts, row, scale, softcap)
    grid = (B * rt["Hq"], triton_cdiv(rt["T"], meta["BLOCK_M"]))
    tk.attn_fwd[grid](q, k, v, _or(bias, f), _or(params, f), _or(c, f), _or(obo, f), _or(sink, f), f, out,
                      _or(stats, f), n_sinkp=sink.numel(), SHIFT=int(row[_SHIFT]) if rownorm else 0, **rt, **meta)
    return out, stats


@torch.library.custom_op("forge_triton::attention_bwd", mutates_args=())
def attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  params: torch.Tensor, c: torch.Tensor, obo: torch.Tensor, sink: torch.Tensor, out: torch.Tensor,
                  stats: torch.Tensor, family: int, kind: int, consts: List[float], row: List[float], mask: List[int],
                  scale: float, softcap: float, need_dbias: bool) -> List[torch.Tensor]:
    from forge_dist.ops import triton_kernels as tk

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, rt, meta = _launch_config(q, k, v, bias, params, obo, sink, family, kind, consts, row, mask, softcap)
    acc, Hq, T = _acc(q), rt["Hq"], rt["T"]
    grad = grad.to(q.dtype).contiguous()
    delta = (grad.to(acc) * out.to(acc)).sum(-1).contiguous()  # dO_i . out_i (Dao et al. 2022)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbias = (torch.zeros(bias.shape, dtype=acc, device=q.device) if need_dbias and bias is not None
             else q.new_zeros((0,), dtype=acc))
    parts = q.new_zeros((B, Hq, T, tk.N_ROW_PARTS), dtype=acc)
    dtable = torch.zeros(params.shape, dtype=acc, device=q.device)  # pfla's knots (atomic adds), else unused
    if q.numel() and k.numel():
        f = _fargs(q, consts, row, scale, softcap)
        common = dict(Bias=_or(bias, f), Params=_or(params, f), C=_or(c, f), Obo=_or(obo, f), F=f,
                      Stats=_or(stats, f), Delta=delta, DO=grad)
        tk.attn_bwd_dq[(B * Hq, triton_cdiv(T, meta["BLOCK_M"]))](
            Q=q, K=k, V=v, Sink=_or(sink, f), DQ=dq, DBias=_or(dbias, f), Parts=parts, DParams=_or(dtable, f),
            n_sinkp=sink.numel(),
            NEED_DBIAS=dbias.numel() > 0, **common, **rt, **meta)
        tk.attn_bwd_dkdv[(B * rt["Hkv"], triton_cdiv(rt["S"], meta["BLOCK_N"]))](
            Q=q, K=k, V=v, DK=dk, DV_=dv, **common, **rt, **meta)
    per_head = parts.sum((0, 2))  # (Hq, ROW_PARTS)

    def reduce(col: int, n: int) -> torch.Tensor:  # per-head sums, or one sum for a shared parameter
        return per_head[:, col].sum().reshape(1) if n == 1 else per_head[:, col].contiguous()

    if family == fused_op.ROWNORM:
        dparams, dc = torch.zeros_like(params), per_head[:, 0].sum().reshape(1)
        dobo = reduce(2, obo.numel()) if obo.numel() else torch.zeros_like(obo)
        dsink = reduce(3, sink.numel()) if sink.numel() else torch.zeros_like(sink)
    else:
        n = params.shape[0]
        dparams = torch.cat([torch.stack([reduce(0, n), reduce(1, n)], dim=1), dtable[:, 2:]], dim=1)
        dparams, dc = dparams.reshape(params.shape).to(params.dtype), q.new_zeros((1,), dtype=acc)
        divide = meta["DIVIDE"]  # a row sum of the curve: its addend and the sink have gradients
        dobo = reduce(2, obo.numel()) if divide and obo.numel() else torch.zeros_like(obo)
        dsink = reduce(3, sink.numel()) if divide and sink.numel() else torch.zeros_like(sink)
    return [dq, dk, dv, dbias, dparams, dc, dobo.to(obo.dtype), dsink.to(sink.dtype)]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


attention_fwd.register_fake(autograd._attn_fwd_fake)
attention_bwd.register_fake(autograd._attn_bwd_fake)
attention_fwd.register_autograd(autograd.attention_backward(attention_bwd), setup_context=autograd._attn_setup)
