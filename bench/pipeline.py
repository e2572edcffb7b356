"""Pipeline bubble of torch.distributed.pipelining's schedules, measured against theory.

One gloo world of ``--world`` processes = P pipeline ranks. Every stage (chunk) is ``--layers``
synthetic layers of uniform cost: a layer's forward sleeps ``--t_f`` ms, its input gradient
``--t_b`` and its weight gradient ``--t_w`` (separate autograd paths, so the zero-bubble
schedules' split backward pays them in separate slots; F = B = W is the zero-bubble paper's
setting), so each rank's busy time is known exactly and CPU noise from other processes matters
less (a sleep yields the core). Per schedule, one step of ``--micro`` (m) micro-batches is timed
on every rank after a warm-up step (median of ``--repeats``):

    busy   = the sleeps of this rank's chunks as timed (m x (t_f + t_b + t_w) x layers x chunks,
             plus however late each sleep woke up: on a loaded machine that is work, not bubble)
    bubble = (wall - busy) / busy, the idle time per unit of work, the worst rank's

against theory: (P - 1) / m for GPipe and 1F1B (Megatron's bubble ratio); for the schedules with
several chunks per rank the bubble of the schedule's own action lists (``pipeline_order``)
simulated with these costs and free communication (``simulate``): (P - 1) / (V m) for interleaved
1F1B, and what torch's zero-bubble and DualPipeV orders leave (0 only with m large enough; the
papers' "zero" assumes the steady state).

    python bench/pipeline.py                        # P=2, m=4, F/B/W = 60/60/60 ms, all six
    python bench/pipeline.py --world 4 --micro 8 --only 1f1b,zbv
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SCHEDULES = (("gpipe", "ScheduleGPipe", 1), ("1f1b", "Schedule1F1B", 1),
             ("interleaved_1f1b", "ScheduleInterleaved1F1B", 2),
             ("interleaved_zero_bubble", "ScheduleInterleavedZeroBubble", 2),
             ("zbv", "ScheduleZBVZeroBubble", 2), ("dualpipev", "ScheduleDualPipeV", 2))


def _work(seconds: float, clock: list) -> None:
    """Sleep as a layer's compute and count the time it took (a sleep that wakes late on a busy
    machine is work done, not bubble)."""
    t0 = time.perf_counter()
    time.sleep(seconds)
    clock[0] += time.perf_counter() - t0


class _InputPath(torch.autograd.Function):
    """h = x; forward sleeps t_f, backward (the input gradient, the schedules' B or I) sleeps t_b."""

    @staticmethod
    def forward(ctx, x, t, clock):
        ctx.t, ctx.clock = t, clock
        _work(t[0], clock)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _work(ctx.t[1], ctx.clock)
        return g, None, None


class _WeightPath(torch.autograd.Function):
    """v = w; backward (the weight gradient, the zero-bubble schedules' W) sleeps t_w."""

    @staticmethod
    def forward(ctx, w, t, clock):
        ctx.t, ctx.clock = t, clock
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        _work(ctx.t[2], ctx.clock)
        return g, None, None


class SyntheticStage(nn.Module):
    """``layers`` layers y = x * w of costs (t_f, t_b, t_w): the input gradient g * w goes through
    _InputPath only and the weight gradient (g * x).sum() through _WeightPath only, so a split
    backward (torch's stage_backward_input / stage_backward_weight) pays t_b and t_w in separate
    slots, and a full backward t_b + t_w."""

    def __init__(self, layers: int, t, clock: list):
        super().__init__()
        self.w = nn.Parameter(torch.ones(layers))
        self.t, self.clock = t, clock

    def forward(self, x):
        if not x.requires_grad:  # the first stage: give its input path a backward too (uniform stages)
            x = x.detach().requires_grad_()
        for i in range(self.w.numel()):
            x = _InputPath.apply(x, self.t, self.clock) * _WeightPath.apply(self.w[i:i + 1], self.t, self.clock)
        return x


def simulate(order, n_stages: int, t) -> dict:
    """The ideal makespan and busy time per rank of a schedule's action lists (``pipeline_order``:
    rank -> [F/I/W/B/OVERLAP_F_B actions or None]) with per-chunk costs t = (F, I, W) and free
    communication: each rank runs its list in order, an action waiting for its inputs (F after the
    previous stage's F, I/B after the next stage's I/B and its own F, W after its I). As torch 2.13
    runs them: the first stage's split backward does nothing in its I (no input gradient to send)
    and the full backward, B + W, in its W (PipelineStage.backward_one_chunk); an OVERLAP_F_B runs
    its forward and backward one after the other, and its sends are issued once both are done
    (schedules._add_send_recv), so another rank sees its results at the end of the pair."""
    f, b, w = t
    cost = {"F": f, "I": b, "W": w, "B": b + w}
    first = {"I": 0.0, "W": b + w}
    done, clock, busy = {}, {}, {}
    lists = {r: [tuple(a.sub_actions) if a.sub_actions else (a,) for a in acts if a is not None]
             for r, acts in order.items()}
    pos = {r: 0 for r in lists}
    for r in lists:
        clock[r], busy[r] = 0.0, 0.0

    def deps_of(a):
        kind, s, i = str(a.computation_type.value), a.stage_index, a.microbatch_index
        deps = []
        if kind == "F" and s > 0:
            deps.append(("F", s - 1, i))
        if kind in ("I", "B"):
            deps.append(("F", s, i))
            if s < n_stages - 1:
                deps.append(("I", s + 1, i))
        if kind == "W":
            deps.append(("I", s, i))
        return kind, s, i, deps

    progress = True
    while progress:
        progress = False
        for r, groups in lists.items():
            while pos[r] < len(groups):
                group = groups[pos[r]]
                if any(d not in done for a in group for d in deps_of(a)[3]):
                    break
                end = clock[r]
                for a in group:
                    kind, s, i, deps = deps_of(a)
                    c = first.get(kind, cost[kind]) if s == 0 else cost[kind]
                    end = max([end] + [done[d] for d in deps]) + c
                    busy[r] += c
                clock[r] = end
                for a in group:
                    kind, s, i, _ = deps_of(a)
                    done[("I" if kind == "B" else kind, s, i)] = end
                pos[r] += 1
                progress = True
    if any(pos[r] < len(lists[r]) for r in lists):
        raise RuntimeError("the schedule's action lists deadlock in the simulation")
    span = max(clock.values())
    return {r: (span - busy[r]) / busy[r] for r in lists}


def theory(name: str, sched, world: int, v: int, a, t_chunk) -> float:
    """Megatron's (P - 1) / m for GPipe and 1F1B; the simulated bubble of the schedule's own action
    lists for the others ((P - 1) / (V m) for interleaved 1F1B with uniform costs)."""
    if v == 1:
        return (world - 1) / a.micro
    return max(simulate(sched.pipeline_order, world * v, t_chunk).values())


def _run(rank: int, world: int, a) -> dict:
    import torch.distributed as dist
    from torch.distributed import pipelining

    from forge_dist.parallel.pipeline.split import stage_ranks

    t = (a.t_f / 1000, a.t_b / 1000, a.t_w / 1000)
    out = {}
    for name, cls_name, v in SCHEDULES:
        if a.only and name not in a.only.split(","):
            continue
        n_stages = world * v
        clock = [0.0]
        ranks = stage_ranks(name, world, v)
        stages = []
        for s in range(n_stages):
            if ranks[s] != rank:
                continue
            meta = torch.empty(a.rows, 8, device="meta", requires_grad=True)
            stages.append(pipelining.PipelineStage(SyntheticStage(a.layers, t, clock), s, n_stages,
                                                   torch.device("cpu"), input_args=meta, output_args=meta))
        cls = getattr(pipelining, cls_name)
        sched = cls(stages if v > 1 else stages[0], n_microbatches=a.micro, loss_fn=lambda o, _: o.sum())
        x = torch.randn(a.rows * a.micro, 8)
        walls, busys = [], []
        for rep in range(a.repeats + 1):
            for st in stages:
                st.submod.zero_grad(set_to_none=True)
            dist.barrier()
            clock[0] = 0.0
            t0 = time.perf_counter()
            kwargs = {"target": x} if n_stages - 1 in [s.stage_index for s in stages] else {}
            sched.step(*((x,) if 0 in [s.stage_index for s in stages] else ()), return_outputs=False, **kwargs)
            wall = time.perf_counter() - t0
            if rep:  # the first step is the warm-up
                walls.append(wall)
                busys.append(clock[0])
        wall, busy = statistics.median(walls), statistics.median(busys)
        worst = torch.tensor([(wall - busy) / busy])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        t_chunk = tuple(a.layers * c for c in t)
        out[name] = (float(worst), theory(name, sched, world, v, a, t_chunk), v, wall)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--layers", type=int, default=1, help="synthetic layers per stage (per chunk)")
    p.add_argument("--t_f", type=float, default=60.0, help="forward ms of one layer")
    p.add_argument("--t_b", type=float, default=60.0, help="input-gradient ms of one layer (B / I)")
    p.add_argument("--t_w", type=float, default=60.0, help="weight-gradient ms of one layer (W)")
    p.add_argument("--only", default="", help="comma-separated schedules (default: all six)")
    p.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    from forge_dist.testing.spawn import spawn

    res = spawn(_run, a.world, a, timeout=300)
    print(f"# pipeline bubble, P={a.world}, m={a.micro}, {a.layers} layer(s) per chunk of F/B/W = "
          f"{a.t_f}/{a.t_b}/{a.t_w} ms "
          f"({datetime.date.today()}, {platform.machine()}, torch {torch.__version__})")
    print("| schedule | V | measured bubble | theory | measured / theory | measured - theory | step wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, (measured, ideal, v, wall) in res.items():
        print(f"| {name} | {v} | {measured:.3f} | {ideal:.3f} | {measured / ideal:.2f} | {measured - ideal:+.3f} "
              f"| {wall:.2f} |")


if __name__ == "__main__":
    main()
