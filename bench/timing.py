"""The training step the benchmarks time (bench/attention.py, bench/malloc.py), so each measures the
same thing: forward with the loss, backward, the optimizer's step, gradients dropped."""
from __future__ import annotations

import time


def train_step(model, opt, idx) -> None:
    """One step of ``model`` (a GPT: the loss of ``idx`` predicting itself) under ``opt``."""
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_step(model, opt, idx, clock=time.perf_counter) -> float:
    """Seconds of one train_step on ``clock`` (wall, or time.process_time on a shared machine)."""
    t0 = clock()
    train_step(model, opt, idx)
    return clock() - t0
