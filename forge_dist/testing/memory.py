"""Per-rank peak resident memory of building and stepping a GPT at TP=1 or TP=N (``measure``), or
under DeepSpeed ZeRO-3 at DP=N built with partitioned initialisation (``measure_zero3``), for
bench/memory.py and tests/dist/test_memory.py (run it on every rank of a spawned world)."""
from __future__ import annotations

import resource

import torch

from forge_dist.dist.malloc import pin_mmap_threshold


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

    pin_mmap_threshold()  # as train/launch.py does in every run
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


def _anon_mb() -> float:
    """This process's anonymous resident memory now (RssAnon: not the file pages it has mapped)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:")) / 1024.0


def measure_zero3(rank: int, world_size: int, cfg_kwargs: dict, steps: int, block: int, save_dir=None,
                  zero: dict = None, resume_from: str = None, prev_run: str = None) -> dict:
    """``measure`` for forge-train's DeepSpeed engine at ZeRO-3 over ``world_size`` data-parallel
    ranks (fp32, torch AdamW), the model drawn into partitions (train/deepspeed_init.py); with
    ``save_dir`` also the peak through forge-train's sharded checkpoint save into it (its path in
    ``path``); with ``resume_from`` (such a path) the peak after loading it (``resume``), before the steps;
    ``zero``: entries of zero_optimization to override; ``prev_run``: a model directory whose
    weights are read into the partitions (--init_from prev_run), ``built_anon`` then says how much
    of ``built`` is anonymous memory (RssAnon once read: a current value, not a peak; the rest: file
    pages mapped; the readers pread, so a few MB)."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.train.context import RunContext
    from forge_dist.train import deepspeed_engine as dse
    from forge_dist.train.options import TrainConfig

    import deepspeed  # noqa: F401  (library memory belongs to the baseline)

    dse.skip_shm_build()
    pin_mmap_threshold()
    cfg = ModelConfig(**cfg_kwargs)
    torch.empty(2, device="meta").normal_()
    base, anon = _peak_mb(), _anon_mb()
    torch.manual_seed(0)
    ctx = RunContext(rank=rank, world_size=world_size, dp_rank=rank, dp_size=world_size)
    train_cfg = TrainConfig(batch_size=1, gradient_accumulation_steps=1, device="cpu", dtype="float32",
                            learning_rate=1e-4, grad_clip=1.0)
    ds_config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10 ** 6,
                 "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                       "stage3_prefetch_bucket_size": "auto",
                                       "stage3_param_persistence_threshold": "auto", **(zero or {})}}
    out = {}
    real = dse.partitioned_materialize

    def recorded(*args):  # the model drawn into partitions, before deepspeed.initialize
        drawn = real(*args)
        out["built"], out["built_anon"] = _peak_mb() - base, _anon_mb() - anon
        return drawn

    dse.partitioned_materialize = recorded
    try:
        engine = _engine(dse, cfg, train_cfg, ds_config, ctx, prev_run)
    finally:
        dse.partitioned_materialize = real
    unique = {id(p): p for p in engine.model.parameters()}.values()
    out.update({"init": _peak_mb() - base, "local_params": sum(p.ds_tensor.numel() for p in unique)})
    del unique
    if resume_from is not None:  # a fresh world resuming a sharded checkpoint: this rank's pieces only
        from forge_dist.train.sharded_save import load_engine_state

        load_engine_state(engine, resume_from, engine.groups)
        out["resume"] = _peak_mb() - base
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (1, block), generator=g)
        engine.forward_backward([(x, x)])
        out.setdefault("backward", _peak_mb() - base)
        engine.step(1e-4)
        out.setdefault("first_step", _peak_mb() - base)  # later steps: AdamW's moments are held throughout
    out["step"] = _peak_mb() - base
    if save_dir is not None:  # forge-train's sharded checkpoint (train/sharded_save.py)
        from forge_dist.train.sharded_save import ShardedCheckpointer

        out["path"] = ShardedCheckpointer(ctx).save(save_dir, steps, engine.model, engine, {"iter_num": steps})
        out["save"] = _peak_mb() - base
    return out


def _engine(dse, cfg, train_cfg, ds_config, ctx, prev_run=None):
    from forge_dist.io.slice_read import SafetensorsSlices
    from forge_dist.model.gpt import GPT

    model = GPT(cfg, defer_init=True)
    if prev_run is not None:  # what build_model hands the engine for --init_from prev_run
        model.prev_run_weights = SafetensorsSlices(prev_run)
    return dse.deepspeed_engine_factory(model, train_cfg, {"deepspeed_config": ds_config}, ctx)
