"""MoE layer throughput with expert parallelism, and the all-to-all bytes against theory.

One gloo world of ``--world`` processes (default 4). Rows, each forward + backward of one MoE layer
(``--n_embd``, ``--n_experts``, top-``--top_k``, dropless, fp32) on ``--tokens`` tokens per rank:

  per-token loop   one process: y_n = sum_j w_nj expert_{e_nj}(x_n) token by token (the definition;
                   timed on --loop_tokens tokens, reported per token)
  grouped EP=1     one process: forge_dist.model.moe.MoELayer (tokens grouped, each expert once)
  dense MLP        one process: the MLP with top_k x the expert hidden size (the same active
                   parameters and FLOPs per token)
  grouped EP=E     every rank of the world, experts placed over E ranks (E = 2, 4, ... dividing
                   the world), tokens/s summed over the ranks
  EP=2 x TP=2      --expert_tensor_parallel_size 1 (whole experts on both TP ranks of a replica):
                   every TP rank routing all of the replica's tokens (the layer before the token
                   split) against the TP rule's split (each routes half, output all-gathered);
                   tokens/s summed over the replicas

Ratios are against the grouped EP=1 row measured in the same run. The all-to-all bytes of one
forward are counted by the communication counter (what this rank sends, its own rows included)
against theory: 2 x tokens x top_k x n_embd x 4 bytes (dispatch and return, fp32; a rank returns
the rows it received, so the figure is the mean over ranks), plus the count exchange (n_experts
int64 per rank). Rows kept by their own rank are counted too, as all_to_all_single sends them.

    python bench/moe.py                      # world 4, 2048 tokens per rank, 8 experts, n_embd 256
    python bench/moe.py --world 2 --tokens 1024
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _config(a):
    from forge_dist import ModelConfig

    return ModelConfig(n_layer=1, n_head=4, n_embd=a.n_embd, block_size=64, vocab_size=64, use_moe=True,
                       n_experts=a.n_experts, moe_top_k=a.top_k, moe_layer_freq=1, bias=False)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _step(module, x):
    def run():
        y = module(x)
        y.square().mean().backward()
    return run


def _per_token(layer, x):
    from forge_dist.testing.ep_parity import per_token_moe

    def run():
        per_token_moe(layer, x).square().mean().backward()
    return run


def measure(rank: int, world: int, a) -> dict:
    import torch.distributed as dist

    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.mlp import build_mlp
    from forge_dist.model.moe import MoELayer
    from forge_dist.parallel.expert import apply_expert_parallel
    from forge_dist.parallel.groups import ProcessGroups

    cfg = _config(a)
    torch.manual_seed(0)
    base = MoELayer(cfg)
    g = torch.Generator().manual_seed(rank + 1)
    x = torch.randn(1, a.tokens, a.n_embd, generator=g)
    rows = {}
    if rank == 0:  # one-process baselines
        rows["per-token loop"] = a.loop_tokens / _timed(_per_token(base, x[:, :a.loop_tokens]), 1)
        rows["grouped EP=1"] = a.tokens / _timed(_step(base, x), a.repeats)
        dense = build_mlp(cfg.replace(mlp_size=a.top_k * cfg.mlp_hidden), 0)
        rows["dense MLP (same active params)"] = a.tokens / _timed(_step(dense, x), a.repeats)
    dist.barrier()
    traffic = {}
    for ep in [e for e in range(2, world + 1) if world % e == 0 and a.n_experts % e == 0]:
        pc = ParallelConfig(expert_parallel_size=ep)
        groups = ProcessGroups.build(pc.topology(world))
        layer = MoELayer(cfg)
        layer.load_state_dict(base.state_dict())
        apply_expert_parallel(layer, groups, pc)
        dist.barrier()
        seconds = _timed(_step(layer, x), a.repeats)
        worst = groups.dp.all_reduce(torch.tensor([seconds]), op=dist.ReduceOp.MAX).item()
        rows[f"grouped EP={ep}"] = world * a.tokens / worst
        with groups.count_collectives() as c, torch.no_grad():
            layer(x)
        rows_bytes = sum(e.nbytes for e in c.events if e.kind == "all_to_all" and e.nbytes > a.n_experts * 8)
        counts = sum(e.nbytes for e in c.events if e.kind == "all_to_all" and e.nbytes <= a.n_experts * 8)
        # a rank returns the rows it received, which depends on the routing: the mean over ranks is exact
        mean = groups.dp.all_reduce(torch.tensor([float(rows_bytes)], dtype=torch.float64)).item() / world
        traffic[ep] = (mean, counts, 2 * a.tokens * a.top_k * a.n_embd * 4)
    if world % 4 == 0 and a.n_experts % 2 == 0:  # whole experts on 2 TP ranks: each runs all tokens, or half
        from forge_dist.parallel.parallelize import parallelize

        pc = ParallelConfig(expert_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=1)
        groups = ProcessGroups.build(pc.topology(world))
        for split in (False, True):
            layer = MoELayer(cfg)
            layer.load_state_dict(base.state_dict())
            apply_expert_parallel(layer, groups, pc)
            if split:  # the TP rule of expert_tensor_parallel_size=1: each TP rank routes 1/TP of the tokens
                parallelize(layer, groups, pc)
            gen = torch.Generator().manual_seed(100 + groups.coord.dp)  # the replica's tokens, alike on its TP ranks
            xr = torch.randn(1, a.tokens, a.n_embd, generator=gen)
            dist.barrier()
            seconds = groups.dp.all_reduce(torch.tensor([_timed(_step(layer, xr), a.repeats)]),
                                           op=dist.ReduceOp.MAX).item()
            name = "tokens split over TP (now)" if split else "every TP rank all tokens (before)"
            rows[f"EP=2 x TP=2, whole experts, {name}"] = (world // 2) * a.tokens / seconds
    return {"rows": rows, "traffic": traffic}


def main(argv=None) -> int:
    from forge_dist.testing.spawn import spawn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--loop_tokens", type=int, default=128, help="tokens timed for the per-token loop")
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    t0 = time.time()
    out = spawn(measure, a.world, a, timeout=600)
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"gloo world {a.world}; MoE layer n_embd {a.n_embd}, {a.n_experts} experts, top-{a.top_k}, "
          f"{a.tokens} tokens per rank, fp32, forward + backward, best of {a.repeats}")
    base = out["rows"]["grouped EP=1"]
    print("| layer | tokens/s | vs grouped EP=1 |\n|---|---|---|")
    for name, rate in out["rows"].items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
    print("\n| EP | all-to-all rows bytes (forward, mean per rank) | theory 2 x tokens x k x C x 4 | ratio | count exchange bytes |"
          "\n|---|---|---|---|---|")
    for ep, (payload, counts, theory) in out["traffic"].items():
        print(f"| {ep} | {payload:,.0f} | {theory:,} | {payload / theory:.3f} | {counts} |")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
