"""Per-rank peak resident memory of building (and stepping) a GPT at TP=1 and TP=N.

Each configuration runs in a fresh gloo world (forge_dist.testing.spawn). A rank records its
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) once torch and forge_dist are imported
and the process groups exist (the idle baseline; a first meta-device op, which imports
torch._dynamo, is run before it in every layout), then:

  init   GPT(cfg, defer_init=True), parallelize, materialize_shards (TP=1: GPT(cfg), the full
         build every single process does)
  step   AdamW steps on a batch of one short sequence (weights + gradients + moments)

and prints the peak above the baseline after each phase, with the ratio to the TP=1 figure and
the target 1/N + 15%. Activations are kept small (batch 1, --block tokens) so that model state
dominates, as the issue's proof asks.

    python bench/memory.py                           # 8 x 1024 GPT (~0.4 GB fp32 weights), TP 1 and 2
    python bench/memory.py --tp 2 4 --n_layer 4 --n_embd 512 --steps 2
    python bench/memory.py --tp --zero3 2            # DeepSpeed ZeRO-3 at DP=2 (partitioned init)
    python bench/memory.py --tp --ep 2 4             # an MoE GPT at EP=2 and EP=4 (ep_rows)
    python bench/memory.py --tp --zero3 2 --prev_run # ZeRO-3 from --init_from prev_run's weights

ZeRO-3 rows (forge_dist.testing.measure_zero3) add ``built`` (the model drawn into this rank's
partitions, before deepspeed.initialize; ratio to the TP=1 init) and ``backward``; their init
includes the fp32 partitions, gradient partitions and AdamW moments DeepSpeed allocates there
(ratio to the TP=1 step, which holds the same kinds of state); ``first step`` is the peak through
the first step, ``step`` through all of them (from the second on, AdamW's moments are held during
the forward and backward too), ``save`` through forge-train's sharded checkpoint save, ``resume`` through a
fresh world building the engine, loading that checkpoint and taking one more step. A 1 x 48 GPT run the same way gives the runtime's own memory (DeepSpeed, gloo groups, code
pages), which does not grow with the model. ``--prev_run`` adds ZeRO-3 rows starting from a saved
model.safetensors (each rank reading its partitions: ``built`` is the peak RSS, ``anon`` the
anonymous memory (RssAnon) once read, a current value, not a peak; they differ by the file pages
a rank maps, none since the readers pread: io/safetensors_file.py). Every layout pins glibc's
mmap threshold as
train/launch.py does (forge_dist.dist.malloc).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile


def main() -> None:
    from forge_dist.testing.memory import measure, measure_zero3
    from forge_dist.testing.spawn import spawn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="*", default=[2])
    ap.add_argument("--zero3", type=int, nargs="*", default=[], help="DeepSpeed ZeRO-3 data-parallel sizes")
    ap.add_argument("--prev_run", action="store_true", help="ZeRO-3 rows also from a saved model's weights")
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--n_embd", type=int, default=1024)
    ap.add_argument("--n_head", type=int, default=16)
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--ep", type=int, nargs="*", default=[], help="expert-parallel sizes (an MoE GPT: ep_rows)")
    ap.add_argument("--ep_dp", type=int, default=1, help="data-parallel replicas of each EP group (world EP x this)")
    ap.add_argument("--ep_zero", type=int, nargs="*", default=[0], help="native --zero_stage values at EP")
    ap.add_argument("--moe", type=int, nargs=3, default=[4, 384, 8], metavar=("LAYERS", "EMBD", "EXPERTS"))
    args = ap.parse_args()
    if args.ep:
        ep_rows(args)
        if not args.tp and not args.zero3:
            return
    cfg = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
               block_size=args.block, dropout=0.0, bias=False)
    weights_mb = None
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}; GPT {cfg}")
    single = spawn(measure, 1, cfg, args.steps, args.block, timeout=600)
    weights_mb = single["local_params"] * 4 / 2 ** 20
    print(f"fp32 weights {weights_mb:.0f} MB (+ AdamW state {2 * weights_mb:.0f} MB)")
    print(f"{'layout':>8} {'rank':>4} {'init MB':>9} {'ratio':>6} {'step MB':>9} {'ratio':>6} {'target':>7}")
    print(f"{'TP=1':>8} {0:>4} {single['init']:>9.0f} {1:>6.2f} {single['step']:>9.0f} {1:>6.2f} {1:>7.2f}")
    for tp in args.tp:
        for rank, r in enumerate(spawn(measure, tp, cfg, args.steps, args.block, timeout=600, return_all=True)):
            print(f"{'TP=%d' % tp:>8} {rank:>4} {r['init']:>9.0f} {r['init'] / single['init']:>6.2f} "
                  f"{r['step']:>9.0f} {r['step'] / single['step']:>6.2f} {1 / tp + 0.15:>7.2f}")
        tp_checkpoint_rows(cfg, tp, args, single)
    tiny = dict(cfg, n_layer=1, n_embd=48, n_head=4, vocab_size=256)
    for dp in args.zero3:
        if args.prev_run:
            zero3_prev_run_rows(cfg, dp, args, single)
        runtime = spawn(measure_zero3, dp, tiny, args.steps, args.block, timeout=600)
        print(f"ZeRO-3 runtime (a 1 x 48 GPT, the memory that does not grow with the model): step "
              f"{runtime['step']:.0f} MB ({runtime['step'] / single['step']:.2f} of the TP=1 step)")
        with tempfile.TemporaryDirectory() as tmp:
            per_rank = spawn(measure_zero3, dp, cfg, args.steps, args.block, tmp, timeout=600, return_all=True)
            resumed = spawn(measure_zero3, dp, cfg, 1, args.block, None, None, per_rank[0]["path"], timeout=600,
                            return_all=True)  # a fresh world: the model built into partitions, then loaded
        for r, again in zip(per_rank, resumed):
            r["resume"], r["resume_step"] = again["resume"], again["step"]
        for rank, r in enumerate(per_rank):
            print(f"{'ZeRO3x%d' % dp:>8} {rank:>4} built {r['built']:.0f} MB ({r['built'] / single['init']:.2f}); "
                  f"init {r['init']:.0f} MB ({r['init'] / single['step']:.2f}); backward {r['backward']:.0f} MB; "
                  f"first step {r['first_step']:.0f} MB ({r['first_step'] / single['step']:.2f}); "
                  f"step {r['step']:>.0f} MB ({r['step'] / single['step']:.2f}); "
                  f"save {r['save']:.0f} MB ({r['save'] / single['step']:.2f}); "
                  f"resume {r['resume']:.0f} MB ({r['resume'] / single['step']:.2f}), its next step "
                  f"{r['resume_step']:.0f} MB ({r['resume_step'] / single['step']:.2f}); target {1 / dp + 0.15:.2f}")


def tp_checkpoint_rows(cfg: dict, tp: int, args, single: dict) -> None:
    """TP=tp through forge-train's own path (build_model on meta, the parallel engine, the sharded
    checkpoint): the save after the steps, and a fresh world resuming it (this rank's pieces only),
    as ratios to ``single``'s step (the one-process peak); the one-process save through LocalEngine
    beside them."""
    from forge_dist.testing.ep_memory import measure_ep
    from forge_dist.testing.spawn import spawn

    with tempfile.TemporaryDirectory() as tmp:
        one = spawn(measure_ep, 1, cfg, args.steps, args.block, 1, os.path.join(tmp, "one"), timeout=600)
        per_rank = spawn(measure_ep, tp, cfg, args.steps, args.block, 1, os.path.join(tmp, "tp"), None, 0, tp,
                         timeout=600, return_all=True)
        resumed = spawn(measure_ep, tp, cfg, 1, args.block, 1, None, per_rank[0]["path"], 0, tp, timeout=600,
                        return_all=True)  # a fresh world: built on meta, then this rank's pieces loaded
    print(f"{'TP=1':>8} {0:>4} forge-train path: step {one['step']:.0f} MB ({one['step'] / single['step']:.2f}); "
          f"save {one['save']:.0f} MB ({one['save'] / single['step']:.2f})")
    for rank, (r, again) in enumerate(zip(per_rank, resumed)):
        print(f"{'TP=%d' % tp:>8} {rank:>4} forge-train path: built {r['built']:.0f} MB "
              f"({r['built'] / single['init']:.2f}); step {r['step']:.0f} MB ({r['step'] / single['step']:.2f}); "
              f"save {r['save']:.0f} MB ({r['save'] / single['step']:.2f}); resume {again['resume']:.0f} MB "
              f"({again['resume'] / single['step']:.2f}), its next step {again['step']:.0f} MB "
              f"({again['step'] / single['step']:.2f}); target {1 / tp + 0.15:.2f}")


def zero3_prev_run_rows(cfg: dict, dp: int, args, single: dict) -> None:
    """ZeRO-3 at DP=``dp`` from --init_from prev_run's weights (a saved model.safetensors)."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.io import save_pretrained
    from forge_dist.model.gpt import GPT
    from forge_dist.testing.memory import measure_zero3
    from forge_dist.testing.spawn import spawn

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(GPT(ModelConfig(**cfg)), tmp)
        per_rank = spawn(measure_zero3, dp, cfg, args.steps, args.block, None, None, None, tmp, timeout=600,
                         return_all=True)
    for rank, r in enumerate(per_rank):
        print(f"{'ZeRO3x%d' % dp:>8} {rank:>4} prev_run built {r['built']:.0f} MB ({r['built'] / single['init']:.2f}; "
              f"anon {r['built_anon']:.0f} MB, {r['built_anon'] / single['init']:.2f}); init {r['init']:.0f} MB "
              f"({r['init'] / single['step']:.2f}); step {r['step']:.0f} MB ({r['step'] / single['step']:.2f}); "
              f"target {1 / dp + 0.15:.2f}")


def ep_rows(args) -> None:
    """Expert parallelism (forge_dist.testing.ep_memory): an MoE GPT whose experts hold most of the
    parameters, through forge-train's build_model, native engine and sharded checkpoint, at each
    EP size x --ep_dp against one process. Dense parameters are replicated over the EP ranks, so a
    rank's expected share of one process's model state is (dense + experts / EP) / all (ZeRO-1:
    the moments also / DP): the target is that share + 0.15. ``built`` and ``init`` are ratios to the
    one-process build (fp32 weights; init also holds DDP's dense gradient buckets), the other phases
    to the one-process step; ``resume`` builds a fresh world that loads the saved checkpoint."""
    from forge_dist.testing.ep_memory import expected_share, measure_ep, moe_config, parameter_split
    from forge_dist.testing.spawn import spawn

    layers, embd, experts = args.moe
    cfg = moe_config(layers, embd, experts, args.vocab_size, args.block)
    dense, expert = parameter_split(cfg)
    print(f"# MoE GPT {cfg}: {dense / 1e6:.1f}M dense + {expert / 1e6:.1f}M expert parameters "
          f"({16 * (dense + expert) / 2 ** 20:.0f} MB of fp32 weights, gradients and AdamW moments)")
    one = spawn(measure_ep, 1, cfg, args.steps, args.block, timeout=600)
    print(f"{'one process':>14}: built {one['built']:.0f} MB; first step {one['first_step']:.0f} MB; "
          f"step {one['step']:.0f} MB")
    phases = ("built", "init", "first_step", "step", "save", "resume", "resume_step")
    print(f"{'layout':>14} {'rank':>4} " + " ".join(f"{p:>15}" for p in phases) + f" {'expected':>8} {'target':>6}")
    for ep in args.ep:
        for zero in args.ep_zero:
            world = ep * args.ep_dp
            with tempfile.TemporaryDirectory() as tmp:
                per_rank = spawn(measure_ep, world, cfg, args.steps, args.block, ep, tmp, None, zero, timeout=600,
                                 return_all=True)
                resumed = spawn(measure_ep, world, cfg, 1, args.block, ep, None, per_rank[0]["path"], zero,
                                timeout=600, return_all=True)
            share = expected_share(cfg, ep, world, zero)
            name = f"EP{ep}" + (f"xDP{args.ep_dp}" if args.ep_dp > 1 else "") + (f" z{zero}" if zero else "")
            for rank, (r, again) in enumerate(zip(per_rank, resumed)):
                r["resume"], r["resume_step"] = again["resume"], again["step"]
                cells = [f"{r[p]:>6.0f} ({r[p] / one['built' if p in ('built', 'init') else 'step']:.2f})"
                         for p in phases]
                print(f"{name:>14} {rank:>4} " + " ".join(f"{c:>15}" for c in cells) + f" {share:>8.2f} "
                      f"{share + 0.15:>6.2f}")


if __name__ == "__main__":
    main()
