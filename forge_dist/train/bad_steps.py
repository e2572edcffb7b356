"""Bad steps: a NaN/inf loss or gradient, or a loss spike, and what the run does about it.

Checked after the backward pass and before the update, identically on every rank (one MAX
all-reduce of the local verdict, which the trainer already paid for its NaN stop; a second one,
the global mean loss, only with --loss_spike_factor):

  nonfinite loss      the loss of this rank's micro-batches is NaN or inf
  nonfinite gradient  a gradient norm (torch._foreach_norm over this rank's gradients) is NaN/inf
  loss spike          the mean loss over ranks exceeds --loss_spike_factor x the mean of the
                      last SPIKE_WINDOW good steps, once there are SPIKE_MIN_HISTORY (off by default)

--on_bad_step decides:

  skip (default)  drop the gradients (no update) and the batch; the iteration counter, the
                  learning-rate schedule and the data stream move on as if the step had run
  rollback        reload the last checkpoint (weights, optimizer, data position, RNG) and replay
                  from it, skipping the offending batches: the replay is exact, so the run
                  equals a skip run unless the damage began before the detected step
  stop            stop; nothing is saved, the last checkpoint is the last good state
                  (nan_iter_num.txt for a NaN/inf, as upstream)

More than --max_bad_steps bad steps in a row (skip, rollback) stops the run the same way. Every
event goes to stderr, to metrics.jsonl (``bad_step``, ``action``) and to ``out_dir/events.jsonl``,
which a resume or a rollback never rewinds. The DeepSpeed engine keeps its own step bookkeeping:
there every bad step stops the run (float16's overflow skipping is DeepSpeed's own).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from forge_dist.errors import ConfigError

MODES = ("skip", "rollback", "stop")
SPIKE_WINDOW = 10  # good steps whose mean loss a spike is measured against
SPIKE_MIN_HISTORY = 3  # good steps needed before spikes are checked
EVENTS_FILE = "events.jsonl"


@dataclass
class BadStepOptions:
    on_bad_step: str = "skip"
    max_bad_steps: int = 5  # bad steps in a row before skip/rollback give up and stop
    loss_spike_factor: Optional[float] = None  # a loss above this x the recent mean is a bad step

    def __post_init__(self):
        if self.on_bad_step not in MODES:
            raise ConfigError(f"on_bad_step={self.on_bad_step!r} is not valid; valid values: {', '.join(MODES)}")
        if isinstance(self.max_bad_steps, bool) or not isinstance(self.max_bad_steps, int) or self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps={self.max_bad_steps!r} must be a positive integer")
        f = self.loss_spike_factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 1):
            raise ConfigError(f"loss_spike_factor={f!r} must be a number above 1 (or none to disable)")

    @classmethod
    def from_values(cls, values) -> "BadStepOptions":
        return cls(**{k: values[k] for k in ("on_bad_step", "max_bad_steps", "loss_spike_factor") if k in values})


BAD_STEP_HELP = {
    "on_bad_step": "what a NaN/inf loss or gradient (or a loss spike) does: skip drops the update and the batch; "
                   "rollback reloads the last checkpoint and replays, skipping the offending batches; stop ends "
                   "the run (docs/reliability.md).",
    "max_bad_steps": "bad steps in a row that skip/rollback tolerate before stopping the run.",
    "loss_spike_factor": "a step whose loss exceeds this x the mean of the last 10 good steps is a bad step "
                         "(none: spikes are not checked).",
}


def _gradients_finite(engine) -> bool:
    model = getattr(engine, "model", None)
    grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all())


@dataclass
class BadSteps:
    """The bad-step policy of one training run (kept across the rebuilds of a rollback)."""
    options: BadStepOptions
    out_dir: str
    is_main: bool
    skip_iters: set = field(default_factory=set)  # batches a rollback dropped
    consecutive: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))
    last_reason: Optional[str] = None

    def mode_for(self, engine) -> str:
        return "stop" if getattr(engine, "name", "") == "deepspeed" else self.options.on_bad_step

    def check(self, loss: torch.Tensor, engine, ctx) -> Optional[str]:
        """The reason this step is bad (the same on every rank), or None. A collective."""
        loss_bad = not bool(torch.isfinite(loss))
        grad_bad = not loss_bad and not _gradients_finite(engine)
        if ctx.any(loss_bad or grad_bad):
            return "nonfinite loss" if ctx.any(loss_bad) else "nonfinite gradient"
        factor = self.options.loss_spike_factor
        if factor is None:
            return None
        mean = ctx.mean(float(loss))
        if len(self.recent) >= SPIKE_MIN_HISTORY and mean > factor * (sum(self.recent) / len(self.recent)):
            return f"loss spike ({mean:.4g} > {factor:g} x recent mean {sum(self.recent) / len(self.recent):.4g})"
        self.recent.append(mean)
        return None

    def good(self) -> None:
        self.consecutive = 0

    def decide(self, it: int, reason: str, engine, write: Callable[[str], None], metrics,
               checkpoint: Optional[str]) -> str:
        """The action for a bad step at ``it``: stop, skip or rollback; logs the event."""
        self.consecutive += 1
        mode = self.mode_for(engine)
        action = mode
        if mode == "rollback" and checkpoint is None:
            action, reason = "skip", reason + " (no checkpoint to roll back to yet)"
        if mode != "stop" and self.consecutive > self.options.max_bad_steps:
            action = "stop"
            reason += f" ({self.consecutive} bad steps in a row, more than --max_bad_steps {self.options.max_bad_steps})"
        if action == "skip":
            discard_gradients(engine)
        elif action == "rollback":
            self.skip_iters.add(it)
        self.last_reason = reason
        self.log(it, reason, action, write, metrics)
        return action

    def log(self, it: int, reason: str, action: str, write: Callable[[str], None], metrics) -> None:
        verb = {"skip": "skipped (no update, batch dropped)", "stop": "stopping",
                "rollback": "rolling back to the last checkpoint", "skipped": "skipped (dropped by a rollback)"}
        write(f"bad step at iter {it}: {reason}: {verb.get(action, action)}")
        metrics.log({"iter": it, "bad_step": reason, "action": action})
        if self.is_main:
            with open(os.path.join(self.out_dir, EVENTS_FILE), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"time": time.time(), "iter": it, "event": "bad_step", "reason": reason,
                                     "action": action}) + "\n")

    def stop_reason(self) -> str:
        return "nan" if (self.last_reason or "").startswith("nonfinite") else "spike"

    def state_dict(self) -> dict:
        return {"skip_iters": sorted(self.skip_iters)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.skip_iters |= set((state or {}).get("skip_iters", []))


def discard_gradients(engine) -> None:
    """Drop this step's gradients (the update is skipped)."""
    engine.optimizer.zero_grad(set_to_none=True)
