"""The CUDA route of the fused score-normaliser attention: FlexAttention. UNVERIFIED ON GPU (written
compile-ready; no GPU was lent to the session that wrote it; bench/gpu_check.sh times it).

FlexAttention computes o = sum_j e^{g(s_ij)} v_j / sum_j e^{g(s_ij)} and lse_i = ln sum_j e^{g(s_ij)}
for a score_mod g. With g = ln f(s) (elementwise f >= 0) or g = c t(s) (row-normalised, t the
variant's transform), sum_j f(s_ij) v_j = o_i e^{lse_i}, so:
- elementwise: out = o e^{lse} (f carries its constant or learned denominator);
- row-normalised: out = post o e^{lse} / (e^{lse} + e^{c t(sink)}) when dividing (the row shift m
  cancels: flash-LOBO's sink is one more term), or post o e^{lse - c m} for a fixed shift m.
An off-by-one addend with the row-max shift, or no division with the row-max shift, needs the max:
those return None (the blocked path runs). Masks go in the block mask (skipped blocks cost nothing);
soft-capping, FIRE bias and per-head parameters in the score_mod; GQA through enable_gqa.
"""
from __future__ import annotations

from typing import Optional

import torch

from forge_dist.ops.mask import MaskSpec
from forge_dist.ops.scores import ElemSpec


def _per_head(p, h):
    if not torch.is_tensor(p) or p.numel() == 1:
        return p.reshape(()) if torch.is_tensor(p) else p
    return p.reshape(-1)[h]


def flex_attend(q, k, v, spec, *, mask: MaskSpec, scale: float, softcap=None, bias=None,
                sink_logit=None) -> Optional[torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, T, _ = q.shape
    S = k.shape[-2]
    row = not isinstance(spec, ElemSpec)
    if not row and (spec.table is not None or spec.divide):  # a knot table (pfla_softmax): not a score_mod
        return None
    if row:
        fixed = spec.shift in ("none", "guess")
        has_obo = torch.is_tensor(spec.obo) or spec.obo != 0
        if (spec.transform is not None and spec.kernel_transform is None) or torch.is_tensor(spec.divisor):
            return None
        if (has_obo or not spec.divide) and not fixed:
            return None
    if bias is not None:
        bias = bias.reshape((-1,) + tuple(bias.shape[-2:])).expand(-1, T, S)

    def score_mod(s, b, h, qi, kj):
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if bias is not None:
            s = s + bias[0 if bias.shape[0] == 1 else h, qi, kj]
        if row:
            t = s if spec.transform is None else spec.transform(s)
            return t * spec.log_scale
        f = spec.reference(s, None, _per_head(spec.beta, h), _per_head(spec.gamma, h))
        return torch.log(f)

    def mask_mod(b, h, qi, kj):
        pos, key = qi + mask.q_offset, kj - mask.n_sink
        ok = torch.ones_like(qi, dtype=torch.bool) if not mask.causal else key <= pos
        if mask.window is not None:
            ok = ok & (key >= pos - mask.window)
        return ok | (kj < mask.n_sink)

    block_mask = create_block_mask(mask_mod, None, None, T, S, device=q.device)
    o, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                            enable_gqa=Hq != k.shape[1], return_lse=True)
    lse = lse.unsqueeze(-1).to(torch.float32)
    if not row:
        return (o.float() * torch.exp(lse)).to(q.dtype)
    post = 1.0 / float(spec.divisor) / (spec.seq_len or 1)
    if spec.divide:
        den = torch.exp(lse)
        if sink_logit is not None:
            sink = torch.as_tensor(sink_logit, device=q.device, dtype=torch.float32).reshape(-1, 1, 1)
            t = sink if spec.transform is None else spec.transform(sink)
            den = den + torch.exp(t * spec.log_scale)
        if has_obo:  # fixed shift m: obo e^{c m} in the units of e^{c t}
            m = 0.0 if spec.shift == "none" else spec.guess
            obo = torch.as_tensor(spec.obo, device=q.device, dtype=torch.float32).reshape(-1, 1, 1)
            den = den + obo * torch.exp(torch.as_tensor(m * spec.log_scale, dtype=torch.float32))
        return (post * o.float() * torch.exp(lse) / den).to(q.dtype)
    m = 0.0 if spec.shift == "none" else spec.guess
    return (post * o.float() * torch.exp(lse - m * spec.log_scale)).to(q.dtype)

