"""The single-device GPT of the ReaLLM-Forge family.

Module names follow ReaLLM-Forge's state dict (``transformer.wte``, ``transformer.h.{i}.attn...``,
``lm_head.weight``), so checkpoints convert by name. Never imports torch.distributed: tensor,
pipeline and expert parallelism are applied to this model from outside (forge_dist.parallel).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge_dist.config.model_config import ModelConfig
from forge_dist.model.attention import build_attention
from forge_dist.model.block import Block
from forge_dist.model.cache import KVCache
from forge_dist.model.deferred import deferred_weights, drawn, is_meta_default, materialize
from forge_dist.model.init import draw_init_seed, init_rules
from forge_dist.model.moe import build_ffn, collect_moe_aux_loss, reset_moe_state
from forge_dist.model.norm import build_norm
from forge_dist.model.quantize import build_embedding
from forge_dist.model.sharing import SharedModules, SharingPlan
from forge_dist.model.steering import attach_steering, steer


def loss_precision(t: torch.Tensor) -> torch.Tensor:
    """Cross-entropy runs in at least float32 (bf16/fp16 logits are upcast; float64 stays)."""
    return t if t.dtype == torch.float64 else t.float()


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
        loss = F.cross_entropy(loss_precision(logits).view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def build_blocks(config: ModelConfig) -> nn.ModuleList:
    """One Block per layer; layers tied by shared_{attn,mlp}_* hold the same module objects
    (forge_dist.model.sharing), and the MLP slot is an MoE layer where use_moe places one."""
    shared: dict = {}  # model-wide modules reused across layers (shared FIRE, ...)
    attn = SharedModules(config, "attn", lambda cfg, p: build_attention(cfg, p, shared))
    mlp = SharedModules(config, "mlp", build_ffn)
    return nn.ModuleList(Block(config.for_layer(i), attn[i], mlp[i]) for i in range(config.n_layer))


class GPT(nn.Module):
    """``GPT(config)`` is ready to train. ``GPT(config, defer_init=True)`` leaves the drawn weights
    (linears, embeddings, the head) on the meta device, for a parallel build to materialise only
    its shards (forge_dist.parallel.materialize); either way the values are those of
    ``init_rules`` drawn from per-parameter streams seeded by ``init_seed`` (forge_dist.model.init)."""

    def __init__(self, config: ModelConfig, defer_init: bool = False):
        super().__init__()
        self.config = config
        self.init_seed = draw_init_seed()  # before anything else draws: see model/deferred.py
        with deferred_weights(LMHead):
            self._build(config)
        self.tie_weights()
        self.init_rules = init_rules(self, config)  # by name, decided on the plain model
        if not defer_init and not is_meta_default():
            self.materialize()

    def materialize(self, keep=None, after=None) -> int:
        """Draw the weights still on the meta device (``keep(name, param)`` says which part this
        process keeps: model/deferred.py; ``after(name, param)`` runs once each has its value)."""
        return materialize(self, drawn(self.init_rules, self.config, self.init_seed), keep, after)

    def _build(self, config: ModelConfig) -> None:
        self.transformer = nn.ModuleDict(dict(
            wte=build_embedding(config, "wte", config.vocab_size, config.wte_dim),  # quantize_wte
            drop=nn.Dropout(config.dropout),
            h=build_blocks(config),
            ln_f=build_norm(config.norm_variant_output, config, option="norm_variant_output"),
        ))
        if config.use_abs_pos_embeddings:
            self.transformer["wpe"] = build_embedding(config, "wpe", config.block_size, config.n_embd)
        if config.n_embd_wte is not None:
            # factorised embeddings: wte and lm_head live in the small n_embd_wte space; both
            # adapters hold a (n_embd, n_embd_wte) weight: scale_up(x) = x W^T, scale_down = x W
            self.transformer["scale_up"] = nn.Linear(config.n_embd_wte, config.n_embd, bias=False)
            self.transformer["scale_down"] = nn.Linear(config.n_embd_wte, config.n_embd, bias=False)
        if config.use_embedding_scale:
            # learnable scalar on the token embeddings, init sqrt(n_embd); shape (1,), top level
            init = config.embedding_scale_init
            self.embedding_scale = nn.Parameter(torch.sqrt(torch.tensor([float(config.n_embd)]))
                                                if init is None else torch.tensor([float(init)]))
        attach_steering(self, config)  # self.steering, and self.lsv_matrix with use_lsv
        self.lm_head = LMHead(config)

    def tie_weights(self) -> None:
        """Re-establish weight tying (call again after replacing tied modules): lm_head shares
        wte's table (wte_weight_tying) and scale_down shares scale_up's (n_embd_wte_scale_tying)."""
        if self.config.wte_weight_tying:
            self.lm_head.weight = self.transformer.wte.weight
        if self.config.n_embd_wte is not None and self.config.n_embd_wte_scale_tying:
            self.transformer.scale_down.weight = self.transformer.scale_up.weight

    # --- forward pieces (pipeline stages call these separately) ---------------------------------
    def embed(self, idx: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, T) -> (B, T, C)
        x = self.transformer.wte(idx)  # (B, T, wte_dim)
        if self.config.n_embd_wte is not None:
            x = self.transformer.scale_up(x)  # (B, T, n_embd_wte) -> (B, T, C)
        if self.config.use_embedding_scale:
            x = x * self.embedding_scale
        if "wpe" in self.transformer:
            pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    @property
    def sharing_plan(self) -> SharingPlan:
        """Module index of each layer's attention and MLP; equal indices are one tied module."""
        return SharingPlan.from_config(self.config)

    def run_blocks(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The blocks, with the steering points between them (0 = the input, k = after block k)."""
        x = steer(self, x, 0)
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache.layer(i) if cache is not None else None
            if self.config.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, layer_cache, use_reentrant=False)
            else:
                x = block(x, cache=layer_cache)
            x = steer(self, x, i + 1)
        return x

    def head(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        x = self.transformer.ln_f(x)
        if self.config.n_embd_wte is not None:
            x = x @ self.transformer.scale_down.weight  # (.., n_embd) -> (.., n_embd_wte)
        if targets is None:
            x = x[:, -1:, :]  # inference: only the last position's logits
        return self.lm_head(x, targets)

    last_ce_loss: Optional[torch.Tensor] = None  # the last forward's cross-entropy, without aux losses

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None):
        """idx (B, T) -> (logits, loss): logits (B, T, V) and mean cross-entropy (ignore_index=-1)
        with targets; without, logits (B, 1, V) of the last position and loss None."""
        offset = cache.offset if cache is not None else 0
        if offset + idx.shape[1] > self.config.block_size and "wpe" in self.transformer:
            raise ValueError(f"sequence of {offset + idx.shape[1]} tokens exceeds block_size="
                             f"{self.config.block_size} of learned absolute positions")
        if self.config.use_moe:
            reset_moe_state(self)
        x = self.run_blocks(self.embed(idx, offset), cache)
        if cache is not None:
            cache.advance(idx.shape[1])
        logits, loss = self.head(x, targets)
        self.last_ce_loss = None if loss is None else loss.detach()  # the plain CE, before aux losses
        if loss is not None and self.training and self.config.use_moe:
            loss = loss + collect_moe_aux_loss(self)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters; with non_embedding, minus the position table (as upstream)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n
