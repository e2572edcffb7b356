"""Weight initialisation (ReaLLM-Forge's _init_weights) and the token-embedding init variants.

Every linear weight ~ N(linear_mean_init, linear_std_init), biases 0; every embedding ~
N(embedding_mean_init, embedding_std_init), except that ``init_variant`` decides the token table;
finally residual output projections (names ending in ``c_proj.weight``) are redrawn with std
0.02/sqrt(2 n_layer) (GPT-2's scaled init).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from forge_dist.model.registries import EMBED_INIT


@EMBED_INIT.register("gaussian")
def gaussian_init(config, shape, generator=None) -> torch.Tensor:
    return torch.empty(shape).normal_(config.embedding_mean_init, config.embedding_std_init, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, config) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=config.linear_mean_init, std=config.linear_std_init)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=config.embedding_mean_init, std=config.embedding_std_init)
    wte = model.transformer.wte.weight
    wte.copy_(EMBED_INIT.build(config.init_variant, config, tuple(wte.shape), option="init_variant"))
    if model.lm_head.weight is not wte:
        nn.init.normal_(model.lm_head.weight, mean=config.linear_mean_init, std=config.linear_std_init)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
