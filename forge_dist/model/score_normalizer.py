"""What every softmax variant shares (forge_dist.model.softmax): the ScoreNormalizer base (keep
matrix, L for div_by_seq_len, per-head views) and RowSpec, the blocked attention path's description
of a row-normalised variant."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from forge_dist.ops import scores as ops_scores
from forge_dist.ops.mask import MaskSpec


@dataclass
class RowSpec:
    """A row-normalised variant as the blocked attention path computes it (mirrors the csrc rownorm
    kernel): w = transform(x), e = exp(log_scale (w - m)), y = e / (obo + sum_j e) (if divide),
    then / divisor (/ seq_len). m: the row max of w ("max"), 0 ("none"), the fixed guess ("guess"),
    or the max where it exceeds the guess by more than overflow ("guess_or_max")."""

    log_scale: Union[float, torch.Tensor] = 1.0
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    shift: str = "max"
    guess: float = 0.0
    overflow: float = 0.0
    obo: Union[float, torch.Tensor] = 0.0
    divide: bool = True
    divisor: Union[float, torch.Tensor] = 1.0
    seq_len: Optional[int] = None
    # the same transform as the fused kernels' (RowTransform code, its parameter) in
    # csrc/include/forge/scores.h; None with a transform: no kernel has it
    kernel_transform: Optional[tuple] = (ops_scores.IDENTITY, 0.0)


def _scalar(value: float, learnable: bool = True, shape=(1,)):
    """A per-layer scalar: a Parameter of upstream's shape ((1,) for beta, gamma, obo_offset and
    temperature_factor; 0-d for pfla's raw values), or a plain float kept out of the state dict."""
    return nn.Parameter(torch.full(shape, float(value))) if learnable else float(value)


def _log_base(use_euler: bool, base: float) -> float:
    """ln b for b^x = e^{x ln b}."""
    return 1.0 if use_euler else math.log(base)


class ScoreNormalizer(nn.Module):
    """What every variant shares: the keep matrix, L for div_by_seq_len, per-head views."""

    elementwise = False  # y_ij depends on s_ij alone: the blocked attention path normalises key blocks apart

    def __init__(self, config=None, n_head: Optional[int] = None):
        super().__init__()
        self.n_head = n_head if n_head is not None else getattr(config, "n_head", 1)
        self.div_by_seq_len = bool(getattr(config, "div_by_seq_len", False))
        self.total_keys: Optional[int] = None  # L while the blocked path feeds one key block at a time

    def row_spec(self, n_keys: int) -> Optional[RowSpec]:
        """How the blocked attention path computes a row-normalised variant over n_keys real keys
        (None: it cannot, the materialised path runs)."""
        return None

    def elem_spec(self, seq_len: Optional[int], scores: Optional[torch.Tensor] = None):
        """An elementwise variant's formula and parameters (forge_dist.ops.scores.ElemSpec) for L =
        seq_len (None: no division by L); per-head parameters shaped against ``scores`` if given,
        else (H, 1, 1). None for a variant that is not elementwise."""
        return None

    def forward_elementwise(self, scores, mask: Optional[MaskSpec]):
        return ops_scores.elementwise(scores, mask, self.elem_spec(self.seq_len(scores, mask), scores))

    @staticmethod
    def keep(scores: torch.Tensor, mask: Optional[MaskSpec]) -> Optional[torch.Tensor]:  # (Tq, Tk)
        return None if mask is None else mask.keep(scores.shape[-2], scores.shape[-1], scores.device)

    def seq_len(self, scores: torch.Tensor, mask: Optional[MaskSpec]) -> Optional[int]:
        if not self.div_by_seq_len:
            return None
        if self.total_keys is not None:
            return self.total_keys
        return scores.shape[-1] - (mask.n_sink if mask is not None else 0)

    @staticmethod
    def per_head(p: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(H, 1, 1) against (B, H, Tq, Tk) or (B, T, V); (H, 1) against logits (B, V)."""
        return p.reshape(p.shape[0], *([1] * (min(scores.dim(), 3) - 1)))

