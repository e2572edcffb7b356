"""ZeRO-stage resharding: a checkpoint saved by DeepSpeed at ZeRO-1 resumes at ZeRO-3, and that
one without DeepSpeed (forge_dist's ParallelEngine at DP=2, and one process: DP 2 -> 1), each
continuing the uninterrupted ZeRO-1 run in fp32 (losses to 1e-6, weights to 1e-5 relative, the
bounds of test_deepspeed.py's data-parallel resumes).

One DP=2 world: ZeRO-1 for ITERS iterations, checkpoint at SAVE_AT; ZeRO-3 resumed from it,
checkpoint at SAVE_AT + 2, the rest; the native engine resumed from the ZeRO-3 checkpoint (weights
consolidated from DeepSpeed's files without pickle, the AdamW moments from the logical copy:
forge_dist.train.optimizer_state). The ZeRO-3 checkpoint with a pickle payload in every rank's
optimizer partition is refused there too (DeepSpeed's own files at the same layout). Then one
process resumes the ZeRO-3 checkpoint with forge_dist's LocalEngine. The same DP=2 world checks
that ZeRO-3 from a meta-device model (deepspeed_init.py: no rank builds it whole) trains exactly as
from a full build, for the shipped ZeRO-3 configs that run on a CPU."""
import os
import shutil

import pytest
import torch

from forge_dist.testing.spawn import spawn

import test_deepspeed as T  # the DeepSpeed test harness (engines, batches, the learning rate)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SAVE_3 = T.SAVE_AT + 2


def native_engine(checkpoint, groups=None):
    """forge_dist's own engine (no DeepSpeed) with the weights of a DeepSpeed checkpoint and its
    optimizer state: ParallelEngine over ``groups``, else LocalEngine."""
    import torch.distributed as dist

    from forge_dist import ModelConfig
    from forge_dist.io.deepspeed_ckpt import consolidate
    from forge_dist.io.state import load_state
    from forge_dist.model.gpt import GPT
    from forge_dist.train.context import RunContext
    from forge_dist.train.parallel_engine import parallel_engine_factory

    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = RunContext(rank=rank, world_size=world, dp_rank=rank, dp_size=world)
    model = GPT(ModelConfig(**T.TINY))
    state, _, _ = consolidate(os.path.join(checkpoint, "deepspeed"))
    load_state(model, state, "the consolidated DeepSpeed checkpoint")
    if groups is not None:
        from forge_dist.config.parallel import ParallelConfig

        ctx.groups, ctx.parallel_config = groups, ParallelConfig()
    engine = parallel_engine_factory(model, T.train_config(world), {}, ctx)
    engine.load_state(checkpoint)
    return engine, ctx


def run_native(engine, ctx, iters):
    """test_deepspeed.run_iters for forge_dist's engines: losses and the final logical weights."""
    out = {"loss": []}
    for it in iters:
        loss = engine.forward_backward([T.micro_batch(it, m, ctx.dp_rank, ctx.dp_size) for m in range(T.ACCUM)])
        engine.step(T.lr(it))
        out["loss"].append(ctx.mean(loss.item()))
    full = engine.full_state_dict()  # collective under TP; None on data-parallel replicas but the first
    out["weights"] = None if full is None else {k: v.detach().clone() for k, v in full.items()}
    return out


def world2(rank, world, workdir):
    from forge_dist.errors import CheckpointError
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.hostile import plant_payload

    T.quiet()
    z1, z3 = os.path.join(workdir, "z1"), os.path.join(workdir, "z3")
    out = {"z1": T.run_iters(*T.make_engine(1), range(T.ITERS), save_to=z1)}
    engine, ctx = T.make_engine(3)
    engine.load_state(z1)  # ZeRO-1 -> ZeRO-3: re-partitioned from the logical copy
    first = T.run_iters(engine, ctx, range(T.SAVE_AT, SAVE_3))
    T.save(engine, ctx, z3)
    out["z3"] = T.run_iters(engine, ctx, range(SAVE_3, T.ITERS))
    out["z3"]["loss"] = first["loss"] + out["z3"]["loss"]
    engine, ctx = native_engine(z3, ProcessGroups.build(Topology(world)))  # ZeRO-3 -> no ZeRO
    out["native"] = run_native(engine, ctx, range(SAVE_3, T.ITERS))
    poisoned = os.path.join(workdir, "z3_poisoned")
    if rank == 0:
        shutil.copytree(z3, poisoned)
        tag = os.path.join(poisoned, "deepspeed", f"global_step{SAVE_3}")
        for r in range(world):
            plant_payload(os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                          os.path.join(workdir, f"payload_ran_{r}"))
    ctx.barrier()
    engine, ctx = T.make_engine(3)
    try:
        engine.load_state(poisoned)
        out["refused"] = None
    except CheckpointError as e:
        out["refused"] = str(e)
    out["meta"] = {name: (T.run_iters(*T.make_engine(None, precision(name), config=config(name)), range(3))["loss"],
                          T.run_iters(*meta_engine(name), range(3))["loss"]) for name in ZERO3_CONFIGS}
    return out


ZERO3_CONFIGS = ("zero3_fp32.json", "zero3_bf16.json", "zero3_offload_param.json")


def precision(name):
    return "bf16" if "bf16" in name else "fp32"


def config(name):
    return os.path.join(T.CONFIGS, name)


def meta_engine(name):
    """The DeepSpeed engine on GPT(cfg, defer_init=True): drawn into ZeRO-3 partitions (deepspeed_init.py)."""
    import torch.distributed as dist

    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import deepspeed_engine_factory

    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = RunContext(rank=rank, world_size=world, dp_rank=rank, dp_size=world)
    torch.manual_seed(0)
    cfg = T.train_config(world, "bfloat16" if precision(name) == "bf16" else "float32")
    model = GPT(ModelConfig(**T.TINY), defer_init=True)
    return deepspeed_engine_factory(model, cfg, {"deepspeed_config": config(name)}, ctx), ctx


def world1(rank, world, workdir):
    T.quiet()
    engine, ctx = native_engine(os.path.join(workdir, "z3"))  # DP 2 -> 1, ZeRO-3 -> one process
    return run_native(engine, ctx, range(SAVE_3, T.ITERS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("resharding"))
    out = spawn(world2, 2, workdir, timeout=300)
    out["one"] = spawn(world1, 1, workdir, timeout=120)
    out["workdir"] = workdir
    return out


def test_zero1_resumes_at_zero3(runs):
    e = T.errors("ZeRO-1 -> ZeRO-3 (DP=2) vs uninterrupted ZeRO-1", runs["z3"], runs["z1"], offset=T.SAVE_AT)
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, e


def test_zero3_resumes_without_deepspeed(runs):
    for name in ("native", "one"):
        e = T.errors(f"ZeRO-3 -> forge_dist engine ({name}) vs uninterrupted ZeRO-1", runs[name], runs["z1"],
                     offset=SAVE_3)
        assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, (name, e)


def test_zero3_partitions_with_a_payload_are_refused(runs):
    assert runs["refused"] is not None and "refused DeepSpeed checkpoint file" in runs["refused"], runs["refused"]
    assert not any(f.startswith("payload_ran") for f in os.listdir(runs["workdir"]))


def test_zero3_drawn_into_partitions_equals_a_full_build(runs):
    """The model built on meta and drawn parameter by parameter into ZeRO-3 partitions (fp32, bf16,
    parameters offloaded to the CPU) trains exactly as the same config on a fully built model."""
    for name, (full, meta) in runs["meta"].items():
        assert meta == full, name
