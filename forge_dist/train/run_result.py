"""What a training run leaves behind: the files of its out_dir that the loop writes, the
TrainResult the loop returns, and the summary forge-train prints from it (train/trainer.py runs
the loop)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from forge_dist.config.arguments import runnable
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.build import Run
from forge_dist.train.metrics import TENSORBOARD_DIR
from forge_dist.train.progress import fmt_time

CONFIG_FILE = "config.yaml"
PLOT_FILE = "loss.png"
NAN_FILE = "nan_iter_num.txt"  # upstream's name


@dataclass
class TrainResult:
    out_dir: str
    iteration: int
    stop_reason: str  # "max_iters" | "patience" | "nan" | "spike" | "preempted" | "rollback"
    best_val_loss: float
    checkpoint: Optional[str]
    wall_s: float
    nan_iter: Optional[int] = None
    sample: Optional[str] = None
    stopped_by: Optional[str] = None  # the preemption signal
    bad_step: Optional[str] = None  # why the last bad step was bad


def summary(result: TrainResult, run: Run) -> str:
    """What the CLI prints at the end: the sample, why it stopped, and where everything is."""
    out, lines = result.out_dir, []
    if result.sample is not None:
        lines += ["--- sample ---", result.sample.strip("\n"), "--------------"]
    best = f"best val loss {result.best_val_loss:.4f}" if math.isfinite(result.best_val_loss) else "no evaluation"
    if result.stop_reason in ("nan", "spike"):
        lines.append(f"stopped: bad step at iteration {result.nan_iter}: {result.bad_step}"
                     + (f" (recorded in {os.path.join(out, NAN_FILE)})" if result.stop_reason == "nan" else "")
                     + f"; last good checkpoint: {result.checkpoint or 'none saved'}")
    elif result.stop_reason == "preempted":
        lines.append(f"preempted ({result.stopped_by}): stopped at iteration "
                     f"{result.iteration} after {fmt_time(result.wall_s)}; checkpoint "
                     f"{result.checkpoint or 'not saved (--never_save_checkpoint)'}")
    else:
        why = "patience exhausted" if result.stop_reason == "patience" else "max_iters reached"
        lines.append(f"stopped at iteration {result.iteration} ({why}) after {fmt_time(result.wall_s)}; {best}")
    written = [f for f in (CONFIG_FILE, "metrics.jsonl", PLOT_FILE, TENSORBOARD_DIR, ckpt.ROOT)
               if os.path.exists(os.path.join(out, f))]
    latest = f" (latest checkpoint: {os.path.basename(result.checkpoint)})" if result.checkpoint else ""
    lines.append(f"wrote {os.path.join(out, '')}: {', '.join(written)}{latest}")
    if result.checkpoint:
        lines.append(f"next: {runnable('forge-sample')} --out_dir {out}   |   {runnable('forge-train')} --out_dir "
                     f"{out} --init_from resume --max_iters {2 * max(run.train_cfg.max_iters, 1)}")
    return "\n".join(lines)
