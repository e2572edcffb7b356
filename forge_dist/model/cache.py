"""Decoding state for KV-cached sampling.

``KVCache.offset`` counts the positions already processed; each layer keeps its own state dict
(keys/values, or a recurrent state for linear/ssm attention). Layers that share one attention
module still get separate state, because the cache is indexed by layer, not by module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class LayerCache:
    offset: int
    state: Dict = field(default_factory=dict)


class KVCache:
    def __init__(self, n_layer: int):
        self.offset = 0
        self.layers: List[Dict] = [dict() for _ in range(n_layer)]

    def layer(self, idx: int) -> LayerCache:
        return LayerCache(self.offset, self.layers[idx])

    def advance(self, n: int) -> None:
        self.offset += n
