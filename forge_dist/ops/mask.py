"""Which keys each query may see, described by a few numbers instead of a mask tensor.

Fused kernels apply the same description inside the kernel (no mask read from memory); the
reference turns it into a boolean matrix with ``keep`` (or an additive one with ``additive``).

Query i (absolute position i + q_offset) sees key j when
    causal:  j <= i                                  (never a later token)
    window:  j >= i - window                         (window + 1 keys at most, as upstream)
    sink:    always, for the first n_sink columns    (attention sink / flash-LOBO)
Key columns after the sinks are absolute positions 0..S-1 (a KV cache holds every earlier key).
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

    def keep(self, n_q: int, n_k: int, device=None, k_start: int = 0) -> torch.Tensor:
        """(n_q, n_k) bool, True where query i may attend key column k_start + j (k_start: a key block)."""
        i = torch.arange(n_q, device=device).unsqueeze(1) + self.q_offset
        j = torch.arange(k_start, k_start + n_k, device=device).unsqueeze(0) - self.n_sink
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
        if self.causal:
            keep &= j <= i
        if self.window is not None:
            keep &= j >= i - self.window
        if self.n_sink:
            keep |= j < 0
        return keep

    def block_hidden(self, n_q: int, k_start: int, k_end: int) -> bool:
        """True when no query of n_q sees any key column in [k_start, k_end) (a block to skip)."""
        if k_start < self.n_sink:
            return False
        lo, hi = k_start - self.n_sink, k_end - 1 - self.n_sink  # absolute key positions
        after = self.causal and lo > self.q_offset + n_q - 1
        before = self.window is not None and hi < self.q_offset - self.window
        return after or before

    def additive(self, n_q: int, n_k: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """(n_q, n_k): 0 where visible, -inf where hidden (for an additive attention mask)."""
        hidden = ~self.keep(n_q, n_k, device)
        return torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))

    def hides_nothing(self, n_q: int, n_k: int) -> bool:
        """True when every query sees every key (e.g. one decoded token over its whole cache)."""
        last_key = n_k - 1 - self.n_sink
        causal_ok = not self.causal or self.q_offset >= last_key
        window_ok = self.window is None or self.q_offset + n_q - 1 - self.window <= 0
        return causal_ok and window_ok

    def is_plain_causal(self, n_q: int, n_k: int) -> bool:
        """True when this is the square lower-triangular mask (a kernel's built-in causal mode)."""
        return self.causal and self.window is None and self.q_offset == 0 and self.n_sink == 0 and n_q == n_k


NO_MASK = MaskSpec(causal=False)
