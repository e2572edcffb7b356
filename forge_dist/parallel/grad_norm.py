"""The global 2-norm of a sharded gradient: the one mechanism every engine's clipping calls.

Each rank adds the squares of the gradients it counts, each divided by the number of ranks of the
reducing groups that hold the same value (TP replicas; a pipeline copy is counted by one holder
only, which the caller decides), and the sums are all-reduced over ``over`` (tp, pp). Expert
gradients differ across the expert-parallel group, so their sum is also reduced over ``experts``.
Data-parallel replicas hold the same averaged gradient and are not reduced over.

Precision, as torch's clip_grad_norm_: each tensor's norm in its own dtype (float32 / float64,
no copy of the gradient: a float64 copy of the largest gradients was a rank's memory peak), the
squares of those norms summed in float64. float16 / bfloat16 gradients are normed in float32 a
bounded slab at a time. A non-finite gradient gives a non-finite norm (torch's
error_if_nonfinite=False); the caller's clip coefficient then follows torch's.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch

ROW = 1 << 15  # elements summed in the gradient's own precision before the float64 sum
SLAB = 1 << 20  # elements of a half-precision gradient cast to float32 at a time


def _row_norms(flat: torch.Tensor) -> torch.Tensor:
    """The 2-norms of consecutive ROW-element pieces of a 1-D tensor (one reduction)."""
    n = flat.numel() // ROW * ROW
    parts = [torch.linalg.vector_norm(flat[:n].view(-1, ROW), 2, dim=1)] if n else []
    if n < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[n:], 2).reshape(1))
    return torch.cat(parts) if parts else flat.new_zeros(1)


@torch.no_grad()
def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """||grad||_2 ** 2 as a float64 scalar, without a full-size copy of ``grad``. torch's CPU norm
    accumulates a float32 tensor in float32 (relative error 7e-5 on 4M normal values), so it is
    taken over ROW-element pieces whose squares are summed in float64 (3e-8)."""
    if not grad.is_contiguous():  # a gradient is contiguous in practice; torch's norm, no copy
        return torch.linalg.vector_norm(grad, 2, dtype=None if grad.dtype.itemsize >= 4 else torch.float32
                                        ).double().pow(2)
    flat = grad.view(-1)
    if grad.dtype in (torch.float32, torch.float64):
        return _row_norms(flat).double().pow(2).sum()
    return sum(_row_norms(s.float()).double().pow(2).sum() for s in flat.split(SLAB))


@torch.no_grad()
def global_grad_norm(terms: Iterable[Tuple[torch.Tensor, int, bool]], over: Sequence,
                     experts=None, device: Optional[torch.device] = None) -> torch.Tensor:
    """sqrt of the sum over every rank of ||grad||^2 / copies, for ``terms`` = (grad, copies,
    is_expert). ``over``: the RankGroups every sum is reduced over (in order; None skipped);
    ``experts``: the group the expert sum is reduced over as well. Collective over all of them.
    The norm comes back in float64 if a counted gradient is float64, else float32."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # dense, experts
    dtype = torch.float32
    for grad, copies, is_expert in terms:
        sums[int(is_expert)] += squared_norm(grad.detach()) / copies
        if grad.dtype == torch.float64:
            dtype = torch.float64
    for group in over:
        if group is not None:
            sums = group.all_reduce(sums, phase="grad_sync")
    expert = sums[1:]
    if experts is not None:
        expert = experts.all_reduce(expert, phase="grad_sync")
    return (sums[0] + expert[0]).sqrt().to(dtype)
