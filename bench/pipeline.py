"""Pipeline bubble of torch.distributed.pipelining's schedules, measured against theory.

One gloo world of ``--world`` processes = P pipeline ranks. Every stage is ``--layers`` synthetic
layers of uniform cost: a layer's forward sleeps ``--t_f`` ms and its backward 2 x t_f (the usual
backward = 2 x forward), so each rank's busy time is known exactly and CPU noise from other
processes matters little (a sleep yields the core). Per schedule, one step of ``--micro`` (m)
micro-batches is timed on every rank after a warm-up step (median of ``--repeats``):

    busy   = the sleeps of this rank's stages (m x (t_f + 2 t_f) x layers x chunks)
    bubble = (wall - busy) / busy, the idle time per unit of work, the worst rank's

against theory (Megatron's bubble ratio): (P - 1) / m for GPipe and 1F1B, (P - 1) / (V m) for the
interleaved 1F1B with V chunks per rank. The zero-bubble schedules and DualPipeV need a backward
whose input and weight parts cost separately; this synthetic layer computes both in one step, so
they are not benchmarked here (their exactness is tests/dist/test_pp_parity.py's).

    python bench/pipeline.py                       # P=4, m=8, 2 layers of 5 ms per stage
    python bench/pipeline.py --world 2 --micro 4
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
             ("interleaved_1f1b", "ScheduleInterleaved1F1B", 2))


class _Sleep(torch.autograd.Function):
    """y = x * w; forward sleeps t, backward 2t (and counts them as busy time)."""

    @staticmethod
    def forward(ctx, x, w, t, clock):
        ctx.save_for_backward(x, w)
        ctx.t, ctx.clock = t, clock
        time.sleep(t)
        clock[0] += t
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        time.sleep(2 * ctx.t)
        ctx.clock[0] += 2 * ctx.t
        return g * w, (g * x).sum().reshape(1), None, None


class SyntheticStage(nn.Module):
    def __init__(self, layers: int, t: float, clock: list):
        super().__init__()
        self.w = nn.Parameter(torch.ones(layers))
        self.t, self.clock = t, clock

    def forward(self, x):
        for i in range(self.w.numel()):
            x = _Sleep.apply(x, self.w[i:i + 1], self.t, self.clock)
        return x


def _run(rank: int, world: int, a) -> dict:
    import torch.distributed as dist
    from torch.distributed import pipelining

    from forge_dist.parallel.pipeline.split import stage_ranks

    out = {}
    for name, cls_name, v in SCHEDULES:
        n_stages = world * v
        clock = [0.0]
        ranks = stage_ranks(name, world, v)
        stages = []
        for s in range(n_stages):
            if ranks[s] != rank:
                continue
            meta = torch.empty(a.rows, 8, device="meta", requires_grad=True)
            stages.append(pipelining.PipelineStage(SyntheticStage(a.layers, a.t_f / 1000, clock), s, n_stages,
                                                   torch.device("cpu"), input_args=meta, output_args=meta))
        cls = getattr(pipelining, cls_name)
        sched = cls(stages if v > 1 else stages[0], n_microbatches=a.micro, loss_fn=lambda o, t: o.sum())
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
        out[name] = (float(worst), (world - 1) / (v * a.micro), v, wall)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--layers", type=int, default=2, help="synthetic layers per stage (per chunk)")
    p.add_argument("--t_f", type=float, default=5.0, help="forward ms of one layer (backward: 2x)")
    p.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    from forge_dist.testing.spawn import spawn

    res = spawn(_run, a.world, a, timeout=300)
    print(f"# pipeline bubble, P={a.world}, m={a.micro}, {a.layers} layers x {a.t_f} ms forward per stage "
          f"({datetime.date.today()}, {platform.machine()}, torch {torch.__version__})")
    print("| schedule | V | measured bubble | theory | measured / theory | step wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, (measured, theory, v, wall) in res.items():
        print(f"| {name} | {v} | {measured:.3f} | {theory:.3f} | {measured / theory:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
