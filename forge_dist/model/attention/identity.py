"""attention_variant=identity: the attention branch returns its input (so with pre-LN the
residual adds LN(x)), as upstream's AttnIdentity. No parameters, nothing to cache; the input and
output activation-quant points still apply (both to the same tensor)."""
from __future__ import annotations

from forge_dist.model.attention.common import AttentionModule
from forge_dist.variants import ATTENTION


@ATTENTION.register("identity")
class AttnIdentity(AttentionModule):
    def __init__(self, config, layer_idx: int = 0, shared=None):
        super().__init__(config)

    def transform(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        return x
