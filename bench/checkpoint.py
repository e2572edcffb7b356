"""Save and load time of sharded checkpoints (forge_dist.train.sharded_checkpoint) at TP=1, 2, 4,
with the bytes each rank wrote, against the gathered single-file save of the same state
(``torch.save``-free: safetensors of the logical model + moments, written by rank 0) measured in
the same run, and the async save (--async_checkpoint): how long it blocks training (the copy to
CPU memory) and how long until its files are all written.

    python bench/checkpoint.py                         # 4 x 512 GPT, TP 1 2 4
    python bench/checkpoint.py --tp 2 --n_layer 8 --n_embd 1024
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

import torch


def run(rank: int, world_size: int, cfg_kwargs: dict, root: str) -> dict:
    from safetensors.torch import save_file

    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.materialize import materialize_shards
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import full_tensor, shard_info
    from forge_dist.parallel.topology import Topology
    from forge_dist.train.sharded_checkpoint import async_save_sharded, load_sharded, save_sharded

    cfg = ModelConfig(**cfg_kwargs)
    groups = ProcessGroups.build(Topology(world_size, tp=world_size))
    torch.manual_seed(0)
    model = GPT(cfg, defer_init=True)
    if world_size > 1:
        parallelize(model, groups, ParallelConfig(tensor_parallel_size=world_size))
    materialize_shards(model, groups)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    path = os.path.join(root, f"tp{world_size}")
    torch.distributed.barrier()
    t = time.perf_counter()
    files = save_sharded(path, model, opt, groups)
    torch.distributed.barrier()
    save_s = time.perf_counter() - t
    written = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    async_group = torch.distributed.new_group(backend="gloo")  # as forge-train: not training's group
    torch.distributed.barrier()
    t = time.perf_counter()
    future, _ = async_save_sharded(path + "-async", model, opt, groups, process_group=async_group)
    blocked_s = time.perf_counter() - t
    future.result()
    torch.distributed.barrier()
    async_s = time.perf_counter() - t
    t = time.perf_counter()
    load_sharded(path, model, opt, groups)
    torch.distributed.barrier()
    load_s = time.perf_counter() - t
    # baseline: gather the logical state and write it from rank 0 (what a rank-0 checkpoint does)
    t = time.perf_counter()
    state = {}
    for name, p in model.named_parameters():
        info = shard_info(p)
        for key, value in (("w", p.detach()), ("m", opt.state[p]["exp_avg"]), ("v", opt.state[p]["exp_avg_sq"])):
            state[f"{name}.{key}"] = full_tensor(value, info, groups).contiguous()
    if rank == 0:
        save_file(state, os.path.join(root, f"gathered{world_size}.safetensors"))
    torch.distributed.barrier()
    gathered_s = time.perf_counter() - t
    return {"save": save_s, "load": load_s, "bytes": written, "gathered": gathered_s, "blocked": blocked_s,
            "async": async_s}


def main() -> None:
    from forge_dist.testing.spawn import spawn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=512)
    ap.add_argument("--n_head", type=int, default=8)
    ap.add_argument("--vocab_size", type=int, default=4096)
    args = ap.parse_args()
    cfg = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
               block_size=64, dropout=0.0, bias=False)
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}; GPT {cfg}")
    print(f"{'layout':>7} {'rank':>4} {'save s':>7} {'load s':>7} {'MB written':>10} {'gathered save s':>15} "
          f"{'async: blocks s':>15} {'async: done s':>13} {'blocked/sync':>12}")
    root = tempfile.mkdtemp(prefix="forge_ckpt_bench_")
    try:
        for tp in args.tp:
            for rank, r in enumerate(spawn(run, tp, cfg, root, timeout=600, return_all=True)):
                print(f"{'TP=%d' % tp:>7} {rank:>4} {r['save']:>7.2f} {r['load']:>7.2f} "
                      f"{r['bytes'] / 2 ** 20:>10.1f} {r['gathered']:>15.2f} {r['blocked']:>15.3f} "
                      f"{r['async']:>13.2f} {r['blocked'] / r['save']:>12.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
