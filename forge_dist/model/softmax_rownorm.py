"""Row-normalised softmax variants (softmax, softermax, strongermax, sigsoftmax): each row divided by
its own sum, so the blocked attention path runs them from a RowSpec. Registered in SOFTMAX on import
(forge_dist.model.softmax imports this module)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from forge_dist import ops
from forge_dist.ops import scores as ops_scores
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import SOFTMAX
from forge_dist.model.score_normalizer import RowSpec, ScoreNormalizer, _log_base, _scalar


# --- row-normalised ---------------------------------------------------------------------------
@SOFTMAX.register("softmax")
class Softmax(ScoreNormalizer):
    """e^{x - max} / sum e^{x - max} over visible keys; a fully hidden row gives zeros."""

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        return ops.softmax(scores, mask)

    def row_spec(self, n_keys: int) -> RowSpec:
        return RowSpec()


@SOFTMAX.register("softermax")
class Softermax(ScoreNormalizer):
    """Base-2 softmax; ``softermax_use_xmax=False`` drops the max subtraction."""

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.subtract_max = config.softermax_use_xmax

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        return ops.softermax(scores, mask, self.subtract_max)

    def row_spec(self, n_keys: int) -> RowSpec:
        return RowSpec(log_scale=math.log(2.0), shift="max" if self.subtract_max else "none")


@SOFTMAX.register("strongermax")
class Strongermax(ScoreNormalizer):
    """Softmax with base S, temperature, max guess, clamp and off-by-one; with the command-line
    defaults (S = e, real max, sum to 1, D = 1) it is softmax.

    ``obo_offset`` is a float, a learned 0-d scalar (strongermax_use_learned_obo) or learned per
    head (n_head, 1, 1) (strongermax_use_learned_obo_per_head, which wins, as upstream);
    ``temperature_factor`` is a float or a learned 0-d scalar.
    """

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.log_strength = math.log(config.strongermax_strength)
        self.subtract_max = config.strongermax_use_xmax
        self.xmax_guess = config.strongermax_xmax_guess
        self.overflow_recompute = config.strongermax_overflow_recompute
        self.overflow_recompute_value = config.strongermax_overflow_recompute_value
        self.clamp_value = config.strongermax_clamp_value if config.strongermax_clamping else None
        self.div_by_sum_of_terms = config.strongermax_div_by_sum_of_terms
        self.divisor = config.strongermax_divisor
        self.temperature_factor = _scalar(config.strongermax_temperature_factor,
                                          config.strongermax_use_learned_temperature_factor)
        if config.strongermax_use_learned_obo_per_head:
            self.obo_offset = nn.Parameter(torch.full((self.n_head, 1, 1), float(config.strongermax_obo)))
        else:
            self.obo_offset = _scalar(config.strongermax_obo, config.strongermax_use_learned_obo)

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        obo = self.obo_offset
        if torch.is_tensor(obo) and obo.dim() == 3:
            obo = self.per_head(obo, scores)
        return ops.strongermax(
            scores, mask, log_strength=self.log_strength,
            temperature=self.temperature_factor, use_xmax=self.subtract_max, xmax_guess=self.xmax_guess,
            overflow_recompute=self.overflow_recompute, overflow_value=self.overflow_recompute_value,
            clamp_value=self.clamp_value, div_by_sum_of_terms=self.div_by_sum_of_terms, obo=obo,
            divisor=self.divisor, seq_len=self.seq_len(scores, mask),
        )

    def row_spec(self, n_keys: int) -> RowSpec:
        if not self.subtract_max:
            shift = "none"
        elif self.xmax_guess:  # upstream tests truthiness: 0 means "use the real max"
            shift = "guess_or_max" if self.overflow_recompute else "guess"
        else:
            shift = "max"
        clamp = self.clamp_value
        obo = self.obo_offset
        if torch.is_tensor(obo) and obo.dim() != 3:
            obo = obo.reshape(())
        return RowSpec(log_scale=self.log_strength / self.temperature_factor,
                       transform=None if clamp is None else (lambda x: x.clamp(max=clamp)),
                       kernel_transform=(ops_scores.IDENTITY, 0.0) if clamp is None else (ops_scores.CLAMP, clamp),
                       shift=shift, guess=float(self.xmax_guess or 0.0), overflow=self.overflow_recompute_value,
                       obo=obo, divide=self.div_by_sum_of_terms, divisor=self.divisor,
                       seq_len=n_keys if self.div_by_seq_len else None)


@SOFTMAX.register("sigsoftmax")
class SigSoftmax(ScoreNormalizer):
    """b^x sigma_b(x) / sum_j b^x_j sigma_b(x_j); b = e, or sigsoftmax_base."""

    def __init__(self, config, n_head: Optional[int] = None):
        super().__init__(config, n_head)
        self.log_base = _log_base(config.sigsoftmax_use_euler_base, config.sigsoftmax_base)

    def forward(self, scores, mask: Optional[MaskSpec] = None):
        return ops.sigsoftmax(scores, mask, self.log_base)

    def row_spec(self, n_keys: int) -> RowSpec:
        b = self.log_base  # z = u + ln sigma(u), u = x ln b (see ref.sigsoftmax)
        return RowSpec(transform=lambda x: x * b + torch.nn.functional.logsigmoid(x * b),
                       kernel_transform=(ops_scores.SIGSOFT, b))

