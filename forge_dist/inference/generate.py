"""Autoregressive sampling with a KV cache (ReaLLM-Forge has none) that gives the uncached tokens.

The model sees at most ``block_size`` tokens. The uncached path feeds the last ``block_size``
tokens every step (nanoGPT's crop). The cached path prefills the prompt once and then feeds one
token per step; when the window is full it restarts the cache from the last ``block_size`` tokens,
which is exactly what the uncached path computes, so both paths draw the same tokens for the same
seed (learned absolute positions could not go past ``block_size`` anyway, and RoPE models would
otherwise see positions they were never trained on).

Next-token distribution: logits / temperature, then softmax, or the model's
``softmax_variant_output`` as upstream applies it; top-k keeps the k largest logits (ties kept);
temperature 0 is greedy decoding.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn

from forge_dist.model.cache import KVCache


def output_normalizer(config) -> Optional[nn.Module]:
    """The sampling-time normaliser named by softmax_variant_output (None: plain softmax)."""
    if config.softmax_variant_output == "softmax":
        return None
    from forge_dist.model.softmax import build_softmax

    return build_softmax(config.softmax_variant_output, config, option="softmax_variant_output")


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                     normalizer: Optional[nn.Module] = None) -> torch.Tensor:
    """(B, V) logits -> (B, V) non-negative weights for torch.multinomial."""
    logits = logits.float() / temperature
    if normalizer is None:
        probs = torch.softmax(logits, dim=-1)
    else:  # variants take (B, H, T_q, T_k) scores
        probs = normalizer(logits[:, None, None, :], None)[:, 0, 0, :].float()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(logits < kth, 0.0)
    return probs


def pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], normalizer, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits, temperature, top_k, normalizer)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _Window:
    """Logits of the next token for a growing sequence, with or without a KV cache."""

    def __init__(self, model: nn.Module, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.block_size = model.config.block_size
        self.cache: Optional[KVCache] = None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, V)
        window = idx[:, -self.block_size:]
        if not self.use_cache:
            logits, _ = self.model(window)
        elif self.cache is not None and self.cache.offset < self.block_size:
            logits, _ = self.model(idx[:, -1:], cache=self.cache)
        else:  # first call, or the window is full: (re)start from the cropped context
            self.cache = KVCache(self.model.config.n_layer)
            logits, _ = self.model(window, cache=self.cache)
        return logits[:, -1, :]


@torch.no_grad()
def generate(model: nn.Module, prompt: List[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: Optional[int] = None, use_cache: bool = True, generator: Optional[torch.Generator] = None,
             stop: Optional[Callable[[List[int]], bool]] = None, device: Optional[str] = None) -> List[int]:
    """The new token ids after ``prompt`` (not including it); ``stop(new_ids)`` ends early."""
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    window, normalizer = _Window(model, use_cache), output_normalizer(model.config)
    new: List[int] = []
    try:
        for _ in range(max_new_tokens):
            nxt = pick(window(idx), temperature, top_k, normalizer, generator)
            idx = torch.cat([idx, nxt.to(idx.device)], dim=1)
            new.append(int(nxt.item()))
            if stop is not None and stop(new):
                break
    finally:
        model.train(was_training)
    return new


def stop_on_strings(decode: Callable[[List[int]], str], stop_strings: List[str]) -> Callable[[List[int]], bool]:
    """A ``stop`` callback: true once the decoded new text contains any of ``stop_strings``."""
    def stop(new_ids: List[int]) -> bool:
        text = decode(new_ids)
        return any(s and s in text for s in stop_strings)

    return stop


def cut_at_stop(text: str, stop_strings: List[str]) -> str:
    """The text before the first stop string."""
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]
