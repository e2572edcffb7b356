"""The training step the benchmarks time (bench/attention.py, bench/malloc.py), so each measures the
same thing: forward with the loss, backward, the optimizer's step, gradients dropped."""
from __future__ import annotations

import time
from typing import Optional

import torch


def train_step(model, opt, idx, clip: Optional[float] = None) -> None:
    """One step of ``model`` (a GPT: the loss of ``idx`` predicting itself) under ``opt``; with
    ``clip``, the gradients clipped to that global norm first (as forge-train's grad_clip)."""
    _, loss = model(idx, idx)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_step(model, opt, idx, clock=time.perf_counter) -> float:
    """Seconds of one train_step on ``clock`` (wall, or time.process_time on a shared machine)."""
    t0 = clock()
    train_step(model, opt, idx)
    return clock() - t0
