"""Per-rank peak resident memory of building and stepping a GPT at TP=1 or TP=N, for
bench/memory.py and tests/dist/test_memory.py (run it on every rank of a spawned world)."""
from __future__ import annotations

import resource

import torch


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure(rank: int, world_size: int, cfg_kwargs: dict, steps: int, block: int) -> dict:
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.materialize import materialize_shards
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import tp_grad_sync
    from forge_dist.parallel.topology import Topology

    cfg = ModelConfig(**cfg_kwargs)
    groups = ProcessGroups.build(Topology(world_size, tp=world_size)) if world_size > 1 else None
    torch.empty(2, device="meta").normal_()  # meta ops import torch._dynamo once: library, not model, memory
    base = _peak_mb()
    torch.manual_seed(0)
    if groups is None:
        model = GPT(cfg)
    else:
        model = GPT(cfg, defer_init=True)
        parallelize(model, groups, ParallelConfig(tensor_parallel_size=world_size))
        materialize_shards(model, groups)
    out = {"init": _peak_mb() - base,
           "local_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (1, block), generator=g)
        _, loss = model(x, x)
        loss.backward()
        if groups is not None:
            tp_grad_sync(model, groups)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["step"] = _peak_mb() - base
    return out
