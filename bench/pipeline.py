"""Pipeline bubble of torch.distributed.pipelining's schedules, measured against theory.

One gloo world of ``--world`` processes = P pipeline ranks. Every stage (chunk) is ``--layers``
synthetic layers of uniform cost: a layer's forward sleeps ``--t_f`` ms, its input gradient
``--t_b`` and its weight gradient ``--t_w`` (separate autograd paths, so the zero-bubble
schedules' split backward pays them in separate slots; F = B = W is the zero-bubble paper's
setting). A sleep yields the core, so four ranks on two loaded cores are timed fairly. Per
schedule, ``--repeats`` steps of ``--micro`` (m) micro-batches are timed on every rank after a
warm-up step:

    busy   = the time this rank spends inside its stages' compute calls (TimedStage: the sleeps,
             and the Python, autograd and late wake-ups around them: work, not waiting)
    bubble = (wall - busy) / busy of the worst rank: waiting for a peer's activations or
             gradients, plus posting the messages; reported for the shortest step (the one other
             processes on a shared machine disturbed least), the median step next to it

against theory, the bubble of the schedule's own action lists (torch's ``pipeline_order``, or
1F1B's and GPipe's orders) simulated with these costs and free communication (``simulate``):
(P - 1) / m for GPipe and 1F1B, (P - 1) / (V m) for interleaved 1F1B, (P - 1) / (3 V m) for
torch's interleaved zero-bubble (ZB-H1 / "ZB1P") and what its ZB-V and DualPipeV orders leave in
one step. A second theory column adds the latency of a message between ranks measured in the
same step (``message_latency``: from a stage's result to the waiting rank's next action) to every
message: the zero-bubble orders have no slack, so each message's latency lands on the critical
path, and on a loaded machine a waiting thread's wake-up costs milliseconds. ``replay`` runs the
same action lists with the durations each action took in that step and that latency: what the
schedule's dependencies alone make of this step's actual costs. Measured close to replay means
nothing outside the action lists (no hidden wait in torch's runtime or in our stage) adds idle
time, and the gap between replay and theory is the machine's (late wake-ups, slow messages).
``action spread`` is the standard deviation of the actions' durations around their nominal cost
in that step (late wake-ups): on an order without slack every late action makes its successors
on the other ranks wait. ``bubble (sleeps)`` is the earlier definition (busy = the sleeps
alone), which counts each action's Python and autograd time as bubble.

    python bench/pipeline.py                        # P=2, m=4, F/B/W = 60/60/60 ms, all six
    python bench/pipeline.py --world 4 --micro 8 --only 1f1b,zbv
    python bench/pipeline.py --world 4 --micro 8 --t_f 250 --t_b 250 --t_w 250 --nice -10
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
from torch.distributed import pipelining

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from forge_dist.parallel.pipeline.schedule import ForgeStage  # noqa: E402

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


class TimedStage(ForgeStage):
    """forge_dist's pipeline stage (schedule.ForgeStage, torch's PipelineStage underneath), adding
    the time of each compute call (forward, input or full backward, weight backward) to ``clock``,
    the rank's busy time, and logging it in ``log`` as (kind, stage, micro-batch, start, end)."""

    clock: list
    log: list

    def _timed(self, kind: str, call, mb: int, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(mb, *args, **kwargs)
        finally:
            t1 = time.perf_counter()
            self.clock[0] += t1 - t0
            self.log.append((kind, self.stage_index, mb, t0, t1))

    def forward_one_chunk(self, mb, *args, **kwargs):
        return self._timed("F", super().forward_one_chunk, mb, *args, **kwargs)

    def backward_one_chunk(self, mb, *args, **kwargs):
        kind = "B" if kwargs.get("full_backward", True) else "I"
        return self._timed(kind, super().backward_one_chunk, mb, *args, **kwargs)

    def backward_weight_one_chunk(self, mb, *args, **kwargs):
        return self._timed("W", super().backward_weight_one_chunk, mb, *args, **kwargs)


def message_latency(logs, order, rank_of) -> float:
    """The median delay between a stage's result and the next rank starting the action that waited
    for it (a rank whose previous action had ended before the result was ready), from every rank's
    ``TimedStage.log`` of one step: the time a message takes here, gloo's hand-shake and the waiting
    thread's wake-up on this machine's load, as the schedule runs it. Times are CLOCK_MONOTONIC
    (perf_counter), one clock for every process of one machine. Within an OVERLAP_F_B both results
    leave at the end of the pair (schedules._add_send_recv)."""
    end, pair_end = {}, {}
    for acts in (order or {}).values():
        for a in acts:
            if a is not None and a.sub_actions:
                pair_end.update({(str(x.computation_type.value), x.stage_index, x.microbatch_index): a
                                 for x in a.sub_actions})
    for log in logs:
        for kind, s, i, t0, t1 in log:
            end[("I" if kind == "B" else kind, s, i)] = t1
    for key, a in pair_end.items():  # the pair's results are sent once both halves are done
        halves = [("I" if str(x.computation_type.value) == "B" else str(x.computation_type.value), x.stage_index,
                   x.microbatch_index) for x in a.sub_actions]
        if all(h in end for h in halves):
            end[("I" if key[0] == "B" else key[0], key[1], key[2])] = max(end[h] for h in halves)
    samples, n_stages = [], len(rank_of)
    for r, log in enumerate(logs):
        for j, (kind, s, i, t0, _) in enumerate(log):
            dep = ("F", s - 1, i) if kind == "F" and s > 0 else \
                ("I", s + 1, i) if kind in ("I", "B") and s < n_stages - 1 else None
            if dep is None or rank_of[dep[1]] == r or dep not in end:
                continue
            if j == 0 or log[j - 1][4] < end[dep]:  # this rank was waiting for the message
                samples.append(t0 - end[dep])
    return statistics.median(samples) if samples else 0.0


def single_stage_order(name: str, world: int, m: int) -> dict:
    """GPipe's and 1F1B's per-rank orders as torch 2.13 runs them (_step_microbatches: GPipe all
    forwards then all backwards; 1F1B P - r forwards of warm-up, then one backward and one
    forward, then the remaining backwards), as (kind, stage, micro-batch)."""
    order = {}
    for r in range(world):
        if name == "gpipe":
            order[r] = [("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)]
            continue
        warm = min(m, world - r)
        acts = [("F", r, i) for i in range(warm)]
        for i in range(m):
            acts.append(("B", r, i))
            if warm + i < m:
                acts.append(("F", r, warm + i))
        order[r] = acts
    return order


def _as_tuples(order) -> dict:
    """torch's action lists (rank -> [_Action or None]) as rank -> [groups of (kind, stage, mb)]:
    an OVERLAP_F_B is one group, communication and bookkeeping actions are dropped."""
    out = {}
    for r, acts in order.items():
        out[r] = []
        for a in acts:
            if a is None:
                continue
            if isinstance(a, tuple) and isinstance(a[0], str):
                out[r].append((a,))
                continue
            subs = a.sub_actions or (a,)
            group = tuple((str(x.computation_type.value), x.stage_index, x.microbatch_index) for x in subs)
            if all(k in ("F", "I", "W", "B") for k, _, _ in group):
                out[r].append(group)
    return out


def simulate(order, n_stages: int, t, latency: float = 0.0, rank_of=None, measured=None) -> dict:
    """The bubble per rank of a schedule's action lists (rank -> actions, torch's ``pipeline_order``
    or ``single_stage_order``) with per-chunk costs t = (F, I, W) and messages between ranks
    arriving ``latency`` seconds after they are sent (``rank_of``: stage -> rank): each rank runs
    its list in order, an action waiting for its inputs (F after the previous stage's F, I/B after
    the next stage's I/B and its own F, W after its I). As torch 2.13 runs them: the first stage's
    split backward does nothing in its I (no input gradient to send) and the full backward, B + W,
    in its W (PipelineStage.backward_one_chunk); an OVERLAP_F_B runs its forward and backward one
    after the other, and its sends are issued once both are done (schedules._add_send_recv), so
    another rank sees its results at the end of the pair. ``measured`` ((kind, stage, mb) -> seconds)
    replaces the costs with the ones a step took (``replay``)."""
    f, b, w = t
    cost = {"F": f, "I": b, "W": w, "B": b + w}
    first = {"I": 0.0, "W": b + w}
    lists = _as_tuples(order)
    done, clock, busy, pos = {}, {}, {}, {}
    for r in lists:
        clock[r], busy[r], pos[r] = 0.0, 0.0, 0

    def deps_of(kind, s, i):
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if kind in ("I", "B"):
            return [("F", s, i)] + ([("I", s + 1, i)] if s < n_stages - 1 else [])
        return [("I", s, i)]

    def ready_at(d, r):
        hop = latency if rank_of is not None and rank_of[d[1]] != r else 0.0
        return done[d] + hop

    progress = True
    while progress:
        progress = False
        for r, groups in lists.items():
            while pos[r] < len(groups):
                group = groups[pos[r]]
                if any(d not in done for a in group for d in deps_of(*a)):
                    break
                end = clock[r]
                for kind, s, i in group:
                    c = first.get(kind, cost[kind]) if s == 0 else cost[kind]
                    c = measured[(kind, s, i)] if measured is not None else c
                    end = max([end] + [ready_at(d, r) for d in deps_of(kind, s, i)]) + c
                    busy[r] += c
                clock[r] = end
                for kind, s, i in group:
                    done[("I" if kind == "B" else kind, s, i)] = end
                pos[r] += 1
                progress = True
    if any(pos[r] < len(lists[r]) for r in lists):
        raise RuntimeError("the schedule's action lists deadlock in the simulation")
    span = max(clock.values())
    return {r: (span - busy[r]) / busy[r] for r in lists}


def nominal(kind: str, stage: int, t) -> float:
    """An action's cost as ``simulate`` counts it (the first stage's I empty, its W the full backward)."""
    f, b, w = t
    if stage == 0 and kind in ("I", "W"):
        return 0.0 if kind == "I" else b + w
    return {"F": f, "I": b, "W": w, "B": b + w}[kind]


def paper(name: str, world: int, v: int, m: int) -> float:
    """The papers' bubble with F = B = W: Megatron's (P - 1) / m and (P - 1) / (V m); ZB-H1
    interleaved (torch's ZB1P) (P - 1) / (3 V m); ZB-V and DualPipe(V) 0, which assumes the
    steady state of consecutive steps (the parallelogram of one step filled by the next one, with
    the zero-bubble paper's optimizer post-validation)."""
    if name in ("gpipe", "1f1b", "interleaved_1f1b"):
        return (world - 1) / (v * m)
    if name == "interleaved_zero_bubble":
        return (world - 1) / (3 * v * m)
    return 0.0


def _run(rank: int, world: int, a) -> dict:
    import torch.distributed as dist

    from forge_dist.parallel.pipeline.split import stage_ranks

    t = (a.t_f / 1000, a.t_b / 1000, a.t_w / 1000)
    out = {}
    for name, cls_name, v in SCHEDULES:
        if a.only and name not in a.only.split(","):
            continue
        n_stages = world * v
        clock, sleeps, log = [0.0], [0.0], []
        ranks = stage_ranks(name, world, v)
        stages = []
        for s in range(n_stages):
            if ranks[s] != rank:
                continue
            meta = torch.empty(a.rows, 8, device="meta", requires_grad=True)
            stage = TimedStage(SyntheticStage(a.layers, t, sleeps), s, n_stages, torch.device("cpu"),
                               input_args=meta, output_args=meta)
            stage.clock, stage.log = clock, log
            stages.append(stage)
        cls = getattr(pipelining, cls_name)
        sched = cls(stages if v > 1 else stages[0], n_microbatches=a.micro, loss_fn=lambda o, _: o.sum())
        x = torch.randn(a.rows * a.micro, 8)
        steps, logs = [], []
        for rep in range(a.repeats + 1):
            for st in stages:
                st.submod.zero_grad(set_to_none=True)
            dist.barrier()
            clock[0] = sleeps[0] = 0.0
            log.clear()
            t0 = time.perf_counter()
            kwargs = {"target": x} if n_stages - 1 in [s.stage_index for s in stages] else {}
            sched.step(*((x,) if 0 in [s.stage_index for s in stages] else ()), return_outputs=False, **kwargs)
            wall = time.perf_counter() - t0
            if rep:  # the first step is the warm-up
                steps.append([(wall - clock[0]) / clock[0], (wall - sleeps[0]) / sleeps[0], wall])
                logs.append(list(log))
        worst = torch.tensor(steps)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # per step, the worst rank
        best = int(worst[:, 2].argmin())  # the least disturbed step: the shortest
        t_chunk = tuple(a.layers * c for c in t)
        order = sched.pipeline_order if v > 1 else single_stage_order(name, world, a.micro)
        every = [None] * world
        dist.all_gather_object(every, logs[best])
        latency = message_latency(every, sched.pipeline_order if v > 1 else None, ranks)
        ideal = max(simulate(order, n_stages, t_chunk).values())
        with_lat = max(simulate(order, n_stages, t_chunk, latency, ranks).values())
        took = {(k, s, i): t1 - t0 for log in every for k, s, i, t0, t1 in log}
        spread = statistics.pstdev(d - nominal(k, s, t_chunk) for (k, s, _), d in took.items())
        replay = max(simulate(order, n_stages, t_chunk, latency, ranks, measured=took).values())
        out[name] = dict(v=v, bubble=float(worst[best, 0]), median=float(worst[:, 0].median()),
                         sleeps=float(worst[best, 1]), wall=float(worst[best, 2]), theory=ideal,
                         paper=paper(name, world, v, a.micro), latency=latency, with_latency=with_lat,
                         replay=replay, spread=spread)
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
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the ranks (e.g. -10 on a shared machine, so a sleeping rank wakes on time "
                        "while other users' processes load the cores; below 0 needs CAP_SYS_NICE)")
    a = p.parse_args(argv)
    if a.nice:
        os.nice(a.nice)  # before the ranks start: their threads (gloo's too) inherit it
    from forge_dist.testing.spawn import spawn

    res = spawn(_run, a.world, a, timeout=900)
    print(f"# pipeline bubble, P={a.world}, m={a.micro}, {a.layers} layer(s) per chunk of F/B/W = "
          f"{a.t_f}/{a.t_b}/{a.t_w} ms, shortest of {a.repeats} steps, nice {os.nice(0)} "
          f"({datetime.date.today()}, {platform.machine()}, torch {torch.__version__})")
    print("| schedule | V | paper | theory (torch's order) | measured bubble | measured / theory | median step "
          "| message latency (ms) | theory + latency | action spread (ms) | replay | measured / replay "
          "| bubble (sleeps) | step wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['v']} | {r['paper']:.3f} | {r['theory']:.3f} | {r['bubble']:.3f} "
              f"| {r['bubble'] / r['theory']:.2f} | {r['median']:.3f} | {r['latency'] * 1000:.2f} "
              f"| {r['with_latency']:.3f} | {r['spread'] * 1000:.1f} | {r['replay']:.3f} "
              f"| {r['bubble'] / r['replay']:.2f} | {r['sleeps']:.3f} | {r['wall']:.2f} |")


if __name__ == "__main__":
    main()
