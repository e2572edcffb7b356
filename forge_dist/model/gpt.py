"""The single-device GPT of the ReaLLM-Forge family.

Module names follow ReaLLM-Forge's state dict (``transformer.wte``, ``transformer.h.{i}.attn...``,
``lm_head.weight``), so checkpoints convert by name. Never imports torch.distributed: tensor,
pipeline and expert parallelism are applied to this model from outside (forge_dist.parallel).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge_dist.config.model_config import ModelConfig
from forge_dist.model.attention import build_attention
from forge_dist.model.block import Block
from forge_dist.model.cache import KVCache
from forge_dist.model.init import init_weights
from forge_dist.model.mlp import build_mlp
from forge_dist.model.norm import build_norm


class LMHead(nn.Module):
    """logits = x W^T (optionally soft-capped, c tanh(z / c)), and the mean cross-entropy.

    A module of its own so tensor parallelism can swap in a vocab-parallel head whose loss never
    gathers the full logits. ``weight`` is (vocab, width), tied to ``transformer.wte.weight``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.wte_dim))
        self.softcap = config.final_logit_softcapping

    def forward(self, x, targets: Optional[torch.Tensor] = None):  # (B, T, D) -> (B, T, V)
        logits = F.linear(x, self.weight)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def build_blocks(config: ModelConfig) -> nn.ModuleList:
    shared: dict = {}  # model-wide modules reused across layers (shared FIRE, ...)
    blocks = []
    for i in range(config.n_layer):
        layer_cfg = config.for_layer(i)
        blocks.append(Block(layer_cfg, build_attention(layer_cfg, i, shared), build_mlp(layer_cfg, i)))
    return nn.ModuleList(blocks)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.wte_dim),
            drop=nn.Dropout(config.dropout),
            h=build_blocks(config),
            ln_f=build_norm(config.norm_variant_output, config, option="norm_variant_output"),
        ))
        if config.use_abs_pos_embeddings:
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.n_embd_wte is not None:  # factorised embeddings: wte lives in the small space
            self.transformer["scale_up"] = nn.Linear(config.n_embd_wte, config.n_embd, bias=False)
            self.transformer["scale_down"] = nn.Linear(config.n_embd_wte, config.n_embd, bias=False)
        self.lm_head = LMHead(config)
        init_weights(self, config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Re-establish weight tying (call again after replacing tied modules)."""
        if self.config.wte_weight_tying:
            self.lm_head.weight = self.transformer.wte.weight
        if self.config.n_embd_wte is not None and self.config.n_embd_wte_scale_tying:
            self.transformer.scale_down.weight = self.transformer.scale_up.weight

    # --- forward pieces (pipeline stages call these separately) ---------------------------------
    def embed(self, idx: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, T) -> (B, T, C)
        x = self.transformer.wte(idx)
        if self.config.n_embd_wte is not None:
            x = self.transformer.scale_up(x)
        if "wpe" in self.transformer:
            pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def run_blocks(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache.layer(i) if cache is not None else None
            if self.config.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, layer_cache, use_reentrant=False)
            else:
                x = block(x, cache=layer_cache)
        return x

    def head(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        x = self.transformer.ln_f(x)
        if self.config.n_embd_wte is not None:
            x = x @ self.transformer.scale_down.weight  # (.., n_embd) -> (.., n_embd_wte)
        if targets is None:
            x = x[:, -1:, :]  # inference: only the last position's logits
        return self.lm_head(x, targets)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None):
        """idx (B, T) -> (logits, loss): logits (B, T, V) and mean cross-entropy (ignore_index=-1)
        with targets; without, logits (B, 1, V) of the last position and loss None."""
        offset = cache.offset if cache is not None else 0
        if offset + idx.shape[1] > self.config.block_size and "wpe" in self.transformer:
            raise ValueError(f"sequence of {offset + idx.shape[1]} tokens exceeds block_size="
                             f"{self.config.block_size} of learned absolute positions")
        x = self.run_blocks(self.embed(idx, offset), cache)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.head(x, targets)

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters; with non_embedding, minus the position table (as upstream)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n
