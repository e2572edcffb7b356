"""Which keys each query may see, described by a few numbers instead of a mask tensor.

Fused kernels apply the same description inside the kernel (no mask read from memory); the
reference turns it into a boolean matrix with ``keep``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class MaskSpec:
    causal: bool = True
    window: Optional[int] = None  # keys with i - window <= j <= i (window + 1 keys), as upstream
    q_offset: int = 0  # absolute position of query 0 (KV-cached decoding)
    n_sink: int = 0  # leading always-visible key columns (attention sink / flash-LOBO)

    def keep(self, n_q: int, n_k: int, device=None) -> torch.Tensor:
        """(n_q, n_k) bool, True where query i may attend key j."""
        i = torch.arange(n_q, device=device).unsqueeze(1) + self.q_offset
        j = torch.arange(n_k, device=device).unsqueeze(0) - self.n_sink
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
        if self.causal:
            keep &= j <= i
        if self.window is not None:
            keep &= j >= i - self.window
        if self.n_sink:
            keep[:, : self.n_sink] = True
        return keep


NO_MASK = MaskSpec(causal=False)
