"""Vocab-parallel token embedding, LM head and cross-entropy.

The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron's rule:
equal shards whose size is a friendly multiple), and rank t owns rows [t V_p/tp, (t+1) V_p/tp).
Padded rows are zeros that no token id reaches and whose logits are -inf before the softmax, so
they are never predicted, never sampled and get zero gradient; gather_full_state_dict strips them.

The cross-entropy never forms the full logits: per token it all-reduces the max logit, the target
logit (only its owner contributes) and the sum of exp (Megatron's vocab-parallel cross-entropy),
3 all-reduces of (B*T) floats instead of gathering (B*T*V).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.model.gpt import loss_precision
from forge_dist.parallel.groups import RankGroup
from forge_dist.parallel.tensor import mappings
from forge_dist.parallel.tensor.layers import sharded_parameter
from forge_dist.parallel.tensor.metadata import ShardInfo

IGNORE_INDEX = -1


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """vocab_size rounded up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def vocab_info(weight: torch.Tensor, group: RankGroup, divisible_by: int) -> ShardInfo:
    V = weight.shape[0]
    return ShardInfo(tuple(weight.shape), 0, group.size, padded_size=padded_vocab_size(V, group.size, divisible_by))


class VocabParallelEmbedding(nn.Module):
    """Rows of the (padded) token table split over ``group``; each rank looks up the ids it owns,
    zeros the others, and the outputs are all-reduced (forward), gradients pass unchanged."""

    def __init__(self, weight: torch.Tensor, group: RankGroup, divisible_by: int = 128):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = weight.shape  # logical
        self.weight = sharded_parameter(weight, vocab_info(weight, group, divisible_by), group)
        self.vocab_start = group.rank * self.weight.shape[0]
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: RankGroup, divisible_by: int = 128):
        return cls(embedding.weight, group, divisible_by)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        if self.group.size == 1:
            return F.embedding(idx, self.weight)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}) "
                f"of {self.weight.shape[0] * self.group.size} (padded)")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from vocab-sharded float32 logits (N, V_local); targets (N,) global ids."""

    @staticmethod
    def forward(ctx, logits, target, group: RankGroup, vocab_start: int, vocab_size: int):
        n_local = logits.shape[-1]
        columns = torch.arange(vocab_start, vocab_start + n_local, device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, float("-inf"))  # padding is never predicted
        lmax = group.all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        shifted = logits - lmax.unsqueeze(-1)
        valid = target != IGNORE_INDEX
        owned = valid & (target >= vocab_start) & (target < vocab_start + n_local)
        local_t = (target - vocab_start).clamp(0, n_local - 1)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
        target_logit = group.all_reduce(torch.where(owned, picked, torch.zeros_like(picked)))
        exp = shifted.exp()
        sum_exp = group.all_reduce(exp.sum(dim=-1))
        loss = torch.where(valid, sum_exp.log() - target_logit, torch.zeros_like(target_logit))
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), owned, local_t, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, owned, local_t, valid = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= owned.to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: RankGroup,
                                 vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over tokens whose target is not -1, from logits (.., V_local) holding
    the columns [vocab_start, vocab_start + V_local) of a (padded) vocabulary of ``vocab_size``
    real entries. Equals F.cross_entropy(full_logits.float(), targets, ignore_index=-1)."""
    flat = loss_precision(logits).reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    per_token = _VocabParallelCrossEntropy.apply(flat, t, group, vocab_start, vocab_size)
    return per_token.sum() / (t != IGNORE_INDEX).sum()


class VocabParallelLMHead(nn.Module):
    """Drop-in for forge_dist.model.gpt.LMHead: forward(x, targets) -> (logits, loss).

    The input is replicated (copy_to_tp_region: its gradient is all-reduced). With targets the loss
    comes from the vocab-parallel cross-entropy and logits are None (the full logits are exactly
    what is never gathered); without targets the logits are gathered and the padding cut off, for
    sampling. ``weight`` may be the embedding's sharded Parameter itself (weight tying).
    """

    def __init__(self, weight: torch.Tensor, group: RankGroup, vocab_size: int,
                 softcap: Optional[float] = None, divisible_by: int = 128, tied: bool = False):
        super().__init__()
        self.group, self.vocab_size, self.softcap = group, vocab_size, softcap
        if tied:
            self.weight = weight  # the VocabParallelEmbedding's Parameter: same shard, same rows
        else:
            self.weight = sharded_parameter(weight, vocab_info(weight, group, divisible_by), group)
        self.vocab_start = group.rank * self.weight.shape[0]

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        logits = F.linear(mappings.copy_to_tp_region(x, self.group), self.weight)  # (B, T, V_local)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return mappings.gather_from_tp_region(logits, self.group)[..., : self.vocab_size], None
        if self.group.size == 1:  # exactly the plain head's loss
            logits = loss_precision(logits[..., : self.vocab_size])
            return None, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=IGNORE_INDEX)
        return None, vocab_parallel_cross_entropy(logits, targets, self.group, self.vocab_start, self.vocab_size)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, local rows={self.weight.shape[0]}, softcap={self.softcap}"
