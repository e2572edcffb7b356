"""attention_variant=identity: the attention branch returns its input (so with pre-LN the
residual adds LN(x)), as upstream's AttnIdentity. No parameters, nothing to cache."""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.registries import ATTENTION


@ATTENTION.register("identity")
class AttnIdentity(nn.Module):
    def __init__(self, config=None, layer_idx: int = 0, shared=None):
        super().__init__()

    def forward(self, x, cache=None):  # (B, T, C) -> (B, T, C)
        return x
