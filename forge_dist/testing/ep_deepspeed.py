"""Expert parallelism under DeepSpeed ZeRO against one process (forge_dist.train.deepspeed_moe).

In one world of 4, each layout of DS_EP_LAYOUTS at each ZeRO stage (top-2 dropless; top-1 with a
capacity factor at ZeRO-2 only: capacity is counted before the exchange, whatever the stage) trains ITERS iterations of
ACCUM micro-batches with the DeepSpeed engine (experts placed by shard_model, as forge-train does),
and one process trains the same global batches with LocalEngine (plain GPT, same seed, MoE layers
counting capacity per data-parallel row block). Compared at every iteration: the loss (mean over
data-parallel ranks) and DeepSpeed's gradient norm (clipping acts at every step); after the last:
the fp32 master weights by one-process name (every expert gathered). A checkpoint of the EP=4
ZeRO-2 run is resumed at EP=4 (the same layout: exact) and at EP=1 (ZeRO-2 over 4 ranks); its
sharded checkpoint (forge-train's format) at other EP layouts and by the native engine, and a
native EP=2 x DP=2 ZeRO-1 one by DeepSpeed (sharded_resumes). The control: the same run with the experts left undeclared to DeepSpeed must fail the comparison.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from forge_dist.testing.ep_parity import ep_model_kwargs

RESHARD_LAYOUTS = {  # name -> ParallelConfig options: layouts only ep_resharding resumes at, in a world of 4
    "TP2xDP2": dict(tensor_parallel_size=2),
    "EP2xTP2_ETP1": dict(expert_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=1),
}
DS_EP_LAYOUTS = {  # name -> ParallelConfig options, in a world of 4
    "EP4": dict(expert_parallel_size=4),  # expert_dp of one rank
    "EP2xDP2": dict(expert_parallel_size=2),  # expert_dp of two ranks
    "EP2xTP2": dict(expert_parallel_size=2, tensor_parallel_size=2),  # EP=2 over DP=2, experts TP-split
    "EP2xTP2_ETP1": dict(expert_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=1),  # whole
    # experts, the TP ranks splitting the tokens: router and expert gradients partial over TP
}
CASES = ("top2", "top1_capacity")
STAGES = (1, 2)
RUNS = [(layout, stage, case) for layout in DS_EP_LAYOUTS for stage in STAGES for case in CASES
        if stage == 2 or case == "top2"]  # capacity is counted before the exchange, whatever the stage
ITERS, ACCUM, GLOBAL_MICRO, SAVE_AT = 3, 2, 8, 2
CLIP = 0.05  # below the gradient norms here: DeepSpeed's norm (expert partitions included) scales every step


def lr(it: int) -> float:
    return 1e-2 * (it + 1) / ITERS


def micro_batch(it: int, m: int, vocab: int, block: int, dp_rank: int = 0, dp_size: int = 1):
    g = torch.Generator().manual_seed(1000 * it + m)
    x = torch.randint(0, vocab, (GLOBAL_MICRO, block), generator=g)
    y = torch.randint(0, vocab, (GLOBAL_MICRO, block), generator=g)
    rows = GLOBAL_MICRO // dp_size
    return x[dp_rank * rows:(dp_rank + 1) * rows], y[dp_rank * rows:(dp_rank + 1) * rows]


def _model(case: str, capacity_groups: int = 1):
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.model.moe import MoELayer

    torch.manual_seed(0)
    # no biases: a key bias has no gradient (softmax is shift-invariant), and AdamW turns the
    # rounding noise standing in for it into full steps of either sign
    model = GPT(ModelConfig(**dict(ep_model_kwargs(case), bias=False))).train()
    for m in model.modules():  # a wider router than the 0.02 init: distinct, unbalanced choices
        if isinstance(m, MoELayer):
            torch.nn.init.normal_(m.router.route_linear.weight, std=0.5)
            m.capacity_groups = capacity_groups
    return model


def _train_config(dp_size: int):
    from forge_dist.train.options import TrainConfig

    return TrainConfig(batch_size=GLOBAL_MICRO // dp_size, gradient_accumulation_steps=ACCUM, device="cpu",
                       dtype="float32", grad_clip=CLIP, learning_rate=1e-2)


def ds_config(stage: int) -> dict:
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "steps_per_print": 10 ** 6,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"}}


def layout_options(layout: str) -> dict:
    """ParallelConfig options of a layout name (DS_EP_LAYOUTS, ep_resharding's; "DP4": none)."""
    return {**RESHARD_LAYOUTS, **DS_EP_LAYOUTS}.get(layout, {})


def make_engine(case: str, layout: str, stage: int, world: int, declare: bool = True):
    """The DeepSpeed engine over the placed model, as forge-train builds it (shard_model);
    ``declare`` False (the control): experts left undeclared, so DeepSpeed treats them as dense."""
    import torch.distributed as dist

    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import deepspeed_engine_factory, preflight
    from forge_dist.train.model_build import shard_model

    pc = ParallelConfig(**layout_options(layout))
    groups = ProcessGroups.build(pc.topology(world))
    model = _model(case)
    cfg, values = _train_config(groups.topology.dp), {"deepspeed_config": ds_config(stage)}
    pc.validate(model.config, world)
    preflight(values, cfg, model.config, pc, world)  # what forge-train checks before launching
    ctx = RunContext(rank=dist.get_rank(), world_size=world, dp_rank=groups.coord.dp, dp_size=groups.topology.dp,
                     groups=groups, parallel_config=pc)
    shard_model(model, ctx, 0)
    for p in model.parameters() if not declare else ():
        for attr in ("allreduce", "group_name"):
            if hasattr(p, attr):
                delattr(p, attr)
    return deepspeed_engine_factory(model, cfg, values, ctx), ctx


def make_native(case: str, layout: str, world: int, zero_stage: int = 1):
    """forge_dist's own engine (ParallelEngine) over the same placed model and layout, with
    --zero_stage 1 by default (dense moments over dp, experts' over expert_dp: parallel/expert/zero.py)."""
    import torch.distributed as dist

    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.train.context import RunContext
    from forge_dist.train.model_build import shard_model
    from forge_dist.train.parallel_engine import parallel_engine_factory

    pc = ParallelConfig(**layout_options(layout))
    groups = ProcessGroups.build(pc.topology(world))
    ctx = RunContext(rank=dist.get_rank(), world_size=world, dp_rank=groups.coord.dp, dp_size=groups.topology.dp,
                     groups=groups, parallel_config=pc)
    model = shard_model(_model(case), ctx, 0)
    return parallel_engine_factory(model, _train_config(groups.topology.dp), {"zero_stage": zero_stage}, ctx), ctx


def run(engine, ctx, iters, save_to=None, sharded_to=None) -> Dict:
    """Losses, grad norms and final weights; at SAVE_AT the gathered checkpoint (``save_to``: the
    engine's own save_state) and forge-train's sharded one (``sharded_to``: its path in out["sharded"])."""
    from forge_dist.train.sharded_save import ShardedCheckpointer

    cfg = engine.model.config
    out = {"loss": [], "grad_norm": []}
    for it in iters:
        if save_to is not None and it == SAVE_AT:
            os.makedirs(save_to, exist_ok=True)
            ctx.barrier()
            engine.save_state(save_to, ctx)
        if sharded_to is not None and it == SAVE_AT:
            out["sharded"] = ShardedCheckpointer(ctx).save(sharded_to, it, engine.model, engine, {"iteration": it})
        batches = [micro_batch(it, m, cfg.vocab_size, cfg.block_size, ctx.dp_rank, ctx.dp_size) for m in range(ACCUM)]
        loss = engine.forward_backward(batches)
        out["grad_norm"].append(engine.step(lr(it))["grad_norm"])
        out["loss"].append(ctx.mean(loss.item()))
    out["weights"] = engine.full_state_dict()
    return out


def reference(case: str, blocks: int) -> Dict:
    """One process, the global batch; capacity counted per block of each of ``blocks`` routing
    ranks (the data-parallel ranks, times TP when the TP ranks split the tokens)."""
    from forge_dist.testing.local_run import local_engine, run_local

    model = _model(case, capacity_groups=blocks)
    v, b = model.config.vocab_size, model.config.block_size
    return run_local(local_engine(model, _train_config(1), CLIP), model, range(ITERS),
                     lambda it: [micro_batch(it, m, v, b) for m in range(ACCUM)], lr)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def errors(run_out: Dict, ref: Dict, offset: int = 0) -> Dict[str, float]:
    """Worst relative errors: losses and grad norms per iteration (from ``offset`` of ref), weights."""
    n = len(run_out["loss"])
    out = {"loss": max(_rel(a, b) for a, b in zip(run_out["loss"], ref["loss"][offset:offset + n])),
           "grad_norm": max(_rel(a, b) for a, b in zip(run_out["grad_norm"], ref["grad_norm"][offset:offset + n]))}
    assert set(run_out["weights"]) == set(ref["weights"]), "the gathered weights are not one process's names"
    per = {k: _rel(run_out["weights"][k], ref["weights"][k]) for k in ref["weights"]}
    out["weights"] = max(per.values())
    out["worst_weight"] = max(per, key=per.get)  # a name, for the failure message
    return out


def run_ds_ep(rank: int, world: int, workdir: str) -> Dict:
    """On every rank of a spawned world of 4, the DeepSpeed EP parity runs and their checkpoints'
    resumes (ep_resharding.run_ds_ep_world adds the EP2 x TP2 resharding); rank 0's dict is the result."""
    import logging
    import warnings

    os.environ["FORGE_OPS"] = "reference"
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    refs = {(case, blocks): reference(case, blocks) for case in CASES for blocks in (2, 4)}
    out: Dict = {"parity": {}, "ds_groups": {}}
    for layout, stage, case in RUNS:
        engine, ctx = make_engine(case, layout, stage, world)
        ckpt = os.path.join(workdir, f"{layout}_z{stage}_{case}")
        save = layout == "EP4" and stage == 2 and case == "top2"
        sharded = save or (layout, stage, case) == ("EP2xTP2", 2, "top2")  # resumed by ep_resharding
        got = run(engine, ctx, range(ITERS), save_to=ckpt if save else None,
                  sharded_to=ckpt + "_s" if sharded else None)
        if sharded and not save:
            out["ds_EP2xTP2"] = got
        blocks = ctx.dp_size * (2 if DS_EP_LAYOUTS[layout].get("expert_tensor_parallel_size") == 1 else 1)
        out["parity"][(layout, stage, case)] = errors(got, refs[(case, blocks)])
        opt = engine.ds.optimizer
        moe = [g for g in opt.optimizer.param_groups if g.get("moe")]
        out["ds_groups"][(layout, stage)] = (
            engine.ds.has_moe_layers, len(moe),
            sorted({torch.distributed.get_world_size(opt.real_dp_process_group[i])
                    for i, g in enumerate(opt.optimizer.param_groups) if g.get("moe")}))
        if save:
            out["uninterrupted"] = got
            out["saved"] = ckpt
            out["saved_sharded"] = got["sharded"]
            out["holds"] = [None] * world
            torch.distributed.all_gather_object(out["holds"], local_experts(engine.model))
    # the control: undeclared experts are averaged with other ranks' experts; the comparison sees it
    out["undeclared"] = errors(run(*make_engine("top2", "EP2xDP2", 1, world, declare=False), range(ITERS)),
                               refs[("top2", 4)])
    for layout in ("EP4", "DP4"):  # the EP=4 ZeRO-2 checkpoint resumed at EP=4 and at EP=1
        engine, ctx = make_engine("top2", layout, 2, world)
        engine.load_state(out["saved"])
        out[f"resumed_{layout}"] = errors(run(engine, ctx, range(SAVE_AT, ITERS)), out["uninterrupted"], SAVE_AT)
    out.update(sharded_resumes(out, world, workdir))
    return out


def local_experts(model) -> list:
    """The global names of this rank's expert tensors (parameters and buffers)."""
    return sorted(n for n in model.state_dict() if ".experts." in n)


def sharded_resumes(out: Dict, world: int, workdir: str) -> Dict:
    """forge-train's sharded checkpoint with experts: the EP=4 ZeRO-2 one resumed by DeepSpeed at
    EP=2 x DP=2 ZeRO-1 and EP=1 x DP=4, and by the native engine at EP=2 x DP=2 ZeRO-1; a native EP=2
    x DP=2 ZeRO-1 one resumed by DeepSpeed at EP=4 ZeRO-1 and EP=1 x DP=4 ZeRO-2; each against its
    uninterrupted run. What each rank wrote of the EP=4 and the native EP=2 checkpoints (DCP's index), and which
    experts each rank holds there."""
    import torch.distributed as dist

    res: Dict = {}
    saved, uninterrupted = out["saved_sharded"], out["uninterrupted"]
    for name, (layout, stage) in {"s_EP2xDP2_z1": ("EP2xDP2", 1), "s_DP4_z2": ("DP4", 2)}.items():
        engine, ctx = make_engine("top2", layout, stage, world)
        engine.load_state(saved)
        res[name] = errors(run(engine, ctx, range(SAVE_AT, ITERS)), uninterrupted, SAVE_AT)
    engine, ctx = make_native("top2", "EP2xDP2", world)
    engine.load_state(saved)
    got = run(engine, ctx, range(SAVE_AT, ITERS))
    res["s_native_EP2xDP2"] = errors(got, uninterrupted, SAVE_AT) if got["weights"] is not None else None
    engine, ctx = make_native("top2", "EP2xDP2", world)  # native -> DeepSpeed
    native = run(engine, ctx, range(ITERS), sharded_to=os.path.join(workdir, "native_EP2xDP2_s"))
    holds = [None] * world
    dist.all_gather_object(holds, local_experts(engine.model))
    native["weights"] = native["weights"] if native["weights"] is not None else {}
    for name, (layout, stage) in {"n_EP4_z1": ("EP4", 1), "n_DP4_z2": ("DP4", 2)}.items():
        engine, ctx = make_engine("top2", layout, stage, world)
        engine.load_state(native["sharded"])
        got = run(engine, ctx, range(SAVE_AT, ITERS))
        res[name] = errors(got, native, SAVE_AT) if native["weights"] else None
    res["written"] = {"EP4_z2": (written_chunks(saved), out.pop("holds")),
                      "native_EP2xDP2": (written_chunks(native["sharded"]), holds)}
    return res


def written_chunks(checkpoint: str) -> Dict[str, list]:
    """{entry: (its elements, [(writing rank, elements of the chunk)])} of every weight and moment
    of a sharded checkpoint."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from forge_dist.io.dcp_storage import read_index

    index = read_index(os.path.join(checkpoint, "model", "dcp"))
    return {fqn: (entry.size.numel(),
                  [(int(index.storage_data[MetadataIndex(fqn, c.offsets)].relative_path.split("_")[2]),
                    c.sizes.numel()) for c in entry.chunks])
            for fqn, entry in index.state_dict_metadata.items() if not fqn.endswith("/step")}
