"""The training driver: build, fit, and after a rollback (--on_bad_step rollback, bad_steps.py)
rebuild the run from the last checkpoint exactly as ``--init_from resume`` would, then fit on.

The rebuild goes through the resume path (weights, optimizer, data position, RNG, counters from
the checkpoint), so whatever layout or checkpoint format a resume supports, a rollback does too.
The BadSteps policy lives across the rebuilds: it carries the batches to skip.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Callable

from forge_dist.train.bad_steps import BadStepOptions, BadSteps
from forge_dist.train.trainer import Trainer


def rollback_options(parsed, checkpoint: str):
    """The parsed options of a rebuild that resumes from ``checkpoint`` (a rollback)."""
    changes = {"init_from": "resume", "init_from_ckpt": checkpoint}
    return dataclasses.replace(parsed, values={**parsed.values, **changes}, explicit={**parsed.explicit, **changes})


def train(build: Callable, parsed, ctx, write: Callable[[str], None] = print):
    """Build and fit; after a rollback, rebuild from the last checkpoint and go on. ``build(parsed)``
    returns a Run. Returns (TrainResult, the last Run)."""
    run = build(parsed)
    policy = BadSteps(BadStepOptions.from_values(run.values), run.train_cfg.out_dir, ctx.is_main)
    while True:
        result = Trainer(run, bad_steps=policy).fit()
        if result.stop_reason != "rollback":
            return result, run
        checkpoint = result.checkpoint
        del run
        gc.collect()
        run = build(rollback_options(parsed, checkpoint))
        if ctx.is_main:
            write(f"rolled back to {checkpoint}; skipping iteration(s) {sorted(policy.skip_iters)}")

