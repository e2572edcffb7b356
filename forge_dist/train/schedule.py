"""Learning-rate schedules as pure functions of the iteration.

A schedule holds no state besides its settings, so resuming at iteration k gives exactly the
learning rate of an uninterrupted run, whatever engine steps the optimizer. With w = warmup_iters,
lr = learning_rate:

  none         lr                                       (constant; ReaLLM-Forge's default)
  warm-up      lr (it + 1) / (w + 1)                     for it < w, every schedule but none
  cosine       min_lr + (lr - min_lr) (1 + cos(pi r)) / 2,   r = (it - w) / (lr_decay_iters - w),
               then min_lr after lr_decay_iters          (nanoGPT's get_lr; upstream never runs it)
  step         lr step_lr_gamma ^ floor((it - w) / step_lr_size)
  exponential  lr exponential_gamma ^ (it - w)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LRSchedule:
    name: str
    learning_rate: float
    warmup_iters: int = 0
    lr_decay_iters: int = 0
    min_lr: float = 0.0
    step_lr_size: int = 1
    step_lr_gamma: float = 1.0
    exponential_gamma: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "LRSchedule":
        return cls(name=cfg.lr_scheduler, learning_rate=cfg.learning_rate, warmup_iters=cfg.warmup_iters,
                   lr_decay_iters=cfg.resolved_lr_decay_iters, min_lr=cfg.min_lr, step_lr_size=cfg.step_lr_size,
                   step_lr_gamma=cfg.step_lr_gamma, exponential_gamma=cfg.exponential_gamma)

    def __call__(self, it: int) -> float:
        lr, w = self.learning_rate, self.warmup_iters
        if self.name == "none":
            return lr
        if it < w:
            return lr * (it + 1) / (w + 1)
        if self.name == "cosine":
            if it >= self.lr_decay_iters:
                return self.min_lr
            ratio = (it - w) / max(1, self.lr_decay_iters - w)
            return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - self.min_lr)
        if self.name == "step":
            return lr * self.step_lr_gamma ** ((it - w) // self.step_lr_size)
        if self.name == "exponential":
            return lr * self.exponential_gamma ** (it - w)
        raise ValueError(f"unknown lr_scheduler {self.name!r}")  # TrainConfig validates the name

    def state_dict(self) -> dict:
        """Recorded in checkpoints for the record; resuming needs only the iteration."""
        return asdict(self)
