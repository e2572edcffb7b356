"""Restoring the RNG streams of a resumed run, exactly on the saved layout, deterministically on another."""
from __future__ import annotations

from typing import Optional

from forge_dist.train import checkpoint as ckpt
from forge_dist.train.context import RunContext


def restore_rng(saved: dict, ctx: RunContext, seed: int, notes: Optional[list] = None) -> None:
    """Each rank's RNG streams as saved, when the layout is the one saved (an exact continuation,
    dropout masks included). On another layout the saved streams cannot give the same masks: rank
    0's python/numpy/torch states are restored and, in a parallel run, the torch stream is then
    reseeded like a fresh start (equal on a TP group, different across data-parallel replicas)
    at seed + iteration, so the continuation is still deterministic."""
    per_rank, layout = saved.get("rng_ranks"), saved.get("layout")
    same = layout == ctx.layout() if layout is not None else not ctx.distributed
    if same and per_rank is not None and len(per_rank) == ctx.world_size:
        ckpt.set_rng_state(per_rank[ctx.rank])
        return
    ckpt.set_rng_state(saved["rng"])
    if ctx.distributed or (layout is not None and layout.get("world_size", 1) > 1):
        if ctx.groups is not None:
            from forge_dist.parallel.tensor.random import seed_everything as seed_parallel

            seed_parallel(seed + int(saved["iteration"]), ctx.groups)
        if notes is not None:
            notes.append(f"the checkpoint was written by {_fmt_layout(layout)}, this run is {_fmt_layout(ctx.layout())}: "
                         f"weights and optimizer state are resharded; dropout streams restart from seed + iteration")


def _fmt_layout(layout: Optional[dict]) -> str:
    if not layout:
        return "a run of unknown layout"
    sp = " with sequence parallelism" if layout.get("sequence_parallel") else ""
    return (f"{layout['world_size']} process(es) (tensor_parallel_size={layout['tensor_parallel_size']}, "
            f"{layout['dp_size']} data-parallel replica(s){sp})")
