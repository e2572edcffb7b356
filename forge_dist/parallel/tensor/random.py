"""RNG regions for dropout under tensor parallelism.

Dropout masks must be identical on the TP ranks where activations are replicated (otherwise the
replicas drift apart) and different where activations are sharded (head shards, sequence shards:
otherwise head h and head h + H/tp get the same mask). Megatron keeps two named CUDA generator
states and swaps them; here a region derives its seed from the *synced* stream instead:

    enter(kind): seed = draw from the synced stream (same on every TP rank);
                 kind "sharded" mixes in the TP rank; the global generator is reseeded with it.
    exit():      the generator state of the enclosing region is restored.

The synced stream is the global torch generator as it stands outside every region, which must be
seeded identically on the ranks of a TP group (``seed_everything``). Regions nest (a replicated
residual dropout inside a sharded attention body), and because every seed is a function of the
synced stream's position, activation checkpointing, which restores the global generator before
recomputing a block, replays exactly the same masks.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.parallel.groups import ProcessGroups

KINDS = ("replicated", "sharded")
_SEED_RANGE = 2 ** 62
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates the per-rank seeds


def _get_state() -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


class RNGTracker:
    """Region stack of one model on one rank; ``tp_rank`` distinguishes the sharded seeds."""

    def __init__(self, tp_rank: int):
        self.tp_rank = tp_rank
        self._stack: List[object] = []  # state to restore at exit (None for the outermost region)
        self._synced = None  # the synced stream's state while any region is open

    @property
    def depth(self) -> int:
        return len(self._stack)

    def enter(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"RNG region kind {kind!r}; choose one of {KINDS}")
        outer = None if not self._stack else _get_state()
        if self._stack:
            _set_state(self._synced)
        seed = int(torch.randint(0, _SEED_RANGE, (1,)).item())
        self._synced = _get_state()
        self._stack.append(outer)
        if kind == "sharded":
            seed = (seed + _MIX * (self.tp_rank + 1)) % _SEED_RANGE
        torch.manual_seed(seed)

    def exit(self) -> None:
        outer = self._stack.pop()
        if outer is None:  # leaving the outermost region: back to the synced stream
            _set_state(self._synced)
            self._synced = None
        else:
            _set_state(outer)

    @contextlib.contextmanager
    def fork(self, kind: str):
        self.enter(kind)
        try:
            yield
        finally:
            self.exit()

    def attach(self, module: nn.Module, kind: str) -> None:
        """Run ``module``'s forward inside a region of ``kind`` (forward hooks)."""
        module.register_forward_pre_hook(lambda m, args: self.enter(kind))
        module.register_forward_hook(lambda m, args, out: self.exit(), always_call=True)


def seed_everything(seed: int, groups: ProcessGroups) -> int:
    """Seed the global generators for dropout: equal on a TP group, different across pipeline
    stages and data-parallel replicas (they see different data and layers). Returns the seed.

    Build the full model *before* this, from a seed equal on every rank, so every rank slices the
    same initial weights."""
    c = groups.coord
    s = seed + 100 * c.pp + 10007 * c.dp
    torch.manual_seed(s)
    return s
