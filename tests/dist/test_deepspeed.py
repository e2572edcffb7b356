"""The DeepSpeed engine (forge_dist.train.deepspeed_engine) against the single-process trainer.

Few spawned worlds, many checks each (a DeepSpeed world costs ~8 s of imports per process):

  world 1  DeepSpeed at DP=1 for ZeRO 0-3 (saves the checkpoints the DP=2 world resumes: 1 -> 2)
  world 2  fp32 ZeRO 0-3, 10 iterations each, checkpoint at 5; resume at the same layout; resume
           of the DP=1 checkpoints; bf16 at every stage; every runnable shipped config
  world 1  resume of the DP=2 checkpoints (2 -> 1), logical optimizer state round trips
  world 4  TP=2 x DP=2 with sequence parallelism and a replicated KV head (partial gradients):
           ZeRO 0-3 against the single-process run, and the same without the TP gradient hooks
           (which must then fail: the test can tell); the sharded ZeRO-1 checkpoint resumed at
           ZeRO-3 and at TP=1 x DP=4 ZeRO-2 (train/deepspeed_sharded.py)

The reference is forge_dist's LocalEngine (run in the DP=1 world), at the same global batch
(8 sequences: 4 per micro-batch, 2 micro-batches) and the same learning rate at every iteration.
ZeRO-1/2 must equal stage 0 bit for bit where DeepSpeed adds in the same order (see the test),
ZeRO-3 to 1e-6, everything the reference to 1e-5. Checkpoints are then consolidated with
zero_to_fp32 and forge-convert in this process. Last, forge-train itself under DeepSpeed's launcher
(the sharded checkpoint, each rank its partitions), torchrun (its resume, bit for bit, writing the
gathered format on), one process (resume on one replica) and mpirun (no MPI discovery).
"""
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
TP_MODEL = dict(TINY, n_kv_group=1)  # one KV head, replicated on both TP ranks: partial gradients
GLOBAL_MICRO, ACCUM, ITERS, SAVE_AT = 4, 2, 10, 5
CLIP = 2.0  # gradient norms here stay near 1: clipping never triggers, so ZeRO-1/2 can be bit-exact
CLIP_TP = 0.5  # the TP world clips at every step (clipping and its norm against the reference)
STAGES = (0, 1, 2, 3)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed")


def shipped_configs(runnable_here: bool = False):
    """configs/deepspeed/*.json; ``runnable_here``: without the *_gpu.json ones (fp16, DeepSpeed's CPU
    Adam), which a CPU run refuses (tests/unit/test_deepspeed_config.py checks the refusal)."""
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".json"))
    if runnable_here:
        names = [n for n in names if not n.endswith("_gpu.json")]
    return names


def lr(it: int) -> float:
    """Our schedule, not DeepSpeed's: a different rate every iteration."""
    return 1e-2 * (it + 1) / ITERS


def micro_batch(it: int, m: int, dp_rank: int = 0, dp_size: int = 1):
    """This data-parallel rank's rows of global micro-batch m of iteration it."""
    g = torch.Generator().manual_seed(1000 * it + m)
    x = torch.randint(0, TINY["vocab_size"], (GLOBAL_MICRO, TINY["block_size"]), generator=g)
    y = torch.randint(0, TINY["vocab_size"], (GLOBAL_MICRO, TINY["block_size"]), generator=g)
    rows = GLOBAL_MICRO // dp_size
    return x[dp_rank * rows:(dp_rank + 1) * rows], y[dp_rank * rows:(dp_rank + 1) * rows]


def train_config(dp_size: int, dtype: str = "float32", clip: float = CLIP, accum: int = ACCUM):
    from forge_dist.train.options import TrainConfig

    return TrainConfig(batch_size=GLOBAL_MICRO // dp_size, gradient_accumulation_steps=accum, device="cpu",
                       dtype=dtype, grad_clip=clip, learning_rate=1e-2)


def ds_config(stage: int, precision: str = "fp32") -> dict:
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 10 ** 6,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"}}


# --- workers (run inside spawned worlds) ------------------------------------------------------------
def quiet():
    """Spawned ranks do not inherit pytest's warning filters; DeepSpeed logs every init at INFO;
    the pure-PyTorch numerics (no kernel build inside a test)."""
    os.environ["FORGE_OPS"] = "reference"
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def make_engine(stage, precision="fp32", groups=None, model_kwargs=TINY, parallel=None, clip=CLIP, accum=ACCUM,
                config=None):
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import deepspeed_engine_factory

    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = (rank, world) if groups is None else (groups.coord.dp, groups.topology.dp)
    ctx = RunContext(rank=rank, world_size=world, dp_rank=dp_rank, dp_size=dp_size)
    torch.manual_seed(0)  # the same full model on every rank
    model = GPT(ModelConfig(**model_kwargs))
    if groups is not None:
        from forge_dist.parallel.parallelize import parallelize

        ctx.groups = groups
        model = parallelize(model, groups, parallel)
    cfg = train_config(dp_size, "bfloat16" if precision == "bf16" else "float32", clip, accum)
    values = {"deepspeed_config": config or ds_config(stage, precision)}  # a dict, or a file's path
    return deepspeed_engine_factory(model, cfg, values, ctx), ctx


def run_iters(engine, ctx, iters, save_to=None, fixed_batch=False, sharded_to=None, sharded_at=SAVE_AT,
              asynchronous=False):
    """Train over ``iters``; checkpoint before iteration SAVE_AT into ``save_to`` (and a sharded
    checkpoint before ``sharded_at`` under ``sharded_to``: its path in out["sharded"]; with
    ``asynchronous``, DCP's async save: written while the next iterations train, waited for at the
    end); rank 0 gets the losses, grad norms and final logical weights."""
    from forge_dist.train.sharded_save import ShardedCheckpointer

    out = {"loss": [], "grad_norm": []}
    checkpointer = ShardedCheckpointer(ctx, asynchronous)
    for it in iters:
        if save_to is not None and it == SAVE_AT:
            save(engine, ctx, save_to)
        if sharded_to is not None and it == sharded_at:
            out["sharded"] = checkpointer.save(sharded_to, it, engine.model, engine, {"iteration": it})
            out["published_at_return"] = os.path.isdir(out["sharded"])  # async: usually not yet
        batches = [micro_batch(0 if fixed_batch else it, m, ctx.dp_rank, ctx.dp_size) for m in range(engine.gas)]
        loss = engine.forward_backward(batches)
        stats = engine.step(lr(it))
        out["loss"].append(ctx.mean(loss.item()))
        out["grad_norm"].append(stats["grad_norm"])
    checkpointer.wait()  # collective: an async save in flight is published
    checkpointer.close()
    out["weights"] = engine.full_state_dict()
    out["skipped_steps"] = stats["skipped_steps"]
    return out


def save(engine, ctx, directory):
    if ctx.is_main:
        os.makedirs(directory, exist_ok=True)
    ctx.barrier()
    engine.save_state(directory, ctx)


def sharded_save(engine, ctx, root, iteration):
    """forge-train's sharded checkpoint (train/sharded_save.py) of ``engine`` under ``root``: its path."""
    from forge_dist.train.sharded_save import ShardedCheckpointer

    return ShardedCheckpointer(ctx).save(root, iteration, engine.model, engine, {"iteration": iteration})


def written_per_rank(checkpoint):
    """{rank: elements of the weights and moments it wrote}, and their total, from DCP's index."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from forge_dist.io.dcp_storage import read_index

    index = read_index(os.path.join(checkpoint, "model", "dcp"))
    per_rank, total = {}, 0
    for fqn, entry in index.state_dict_metadata.items():
        if fqn.endswith("/step"):
            continue
        for chunk in entry.chunks:
            rank = int(index.storage_data[MetadataIndex(fqn, chunk.offsets)].relative_path.split("_")[2])
            per_rank[rank] = per_rank.get(rank, 0) + chunk.sizes.numel()
        total += entry.size.numel()
    return per_rank, total


def world1_save(rank, world, workdir):
    """The single-process references (forge_dist's LocalEngine), and DP=1 DeepSpeed runs of every
    stage checkpointed at SAVE_AT for the DP=2 world (1 -> 2)."""
    quiet()
    out = {"ref": reference(), "ref_tp": reference(TP_MODEL, CLIP_TP)}
    out.update({stage: run_iters(*make_engine(stage), range(ITERS), save_to=os.path.join(workdir, f"dp1_z{stage}"))
                for stage in STAGES})
    return out


def world2(rank, world, workdir):
    quiet()
    out = {"parity": {}, "resume": {}, "from_dp1": {}, "bf16": {}, "gas1": {}}
    for stage in (0, 1, 2):  # one micro-batch: ZeRO-2 reduces the same sums as stage 0
        out["gas1"][stage] = run_iters(*make_engine(stage, accum=1), range(ITERS))
    for stage in STAGES:
        ckpt = os.path.join(workdir, f"dp2_z{stage}")
        out["parity"][stage] = run_iters(*make_engine(stage), range(ITERS), save_to=ckpt)
        engine, ctx = make_engine(stage)
        engine.load_state(ckpt)  # same layout: DeepSpeed's own files
        out["resume"][stage] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
        engine, ctx = make_engine(stage)
        engine.load_state(os.path.join(workdir, f"dp1_z{stage}"))  # DP 1 -> 2: the logical copy
        out["from_dp1"][stage] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    for stage in STAGES:
        engine, ctx = make_engine(stage, "bf16")
        out["bf16"][stage] = run_iters(engine, ctx, range(8), fixed_batch=True)
        save(engine, ctx, os.path.join(workdir, f"dp2_bf16_z{stage}"))
        out["bf16"][stage]["logical"] = engine.logical_optimizer_state()
    out["clip"] = {stage: run_iters(*make_engine(stage, model_kwargs=TP_MODEL, clip=CLIP_TP), range(ITERS))
                   for stage in (1, 2, 3)}  # ZeRO's own clipping, acting at every step, pure DP
    out["configs"] = {}
    for name in shipped_configs(runnable_here=True):  # every shipped config trains (2 steps)
        precision = "bf16" if "bf16" in name else "fp32"
        engine, ctx = make_engine(None, precision, config=os.path.join(CONFIGS, name))
        out["configs"][name] = run_iters(engine, ctx, range(2))["loss"]
    return out


def world1_resume(rank, world, workdir):
    """DP 2 -> 1: the continuation, and the re-partitioned state read back (fp32 and bf16)."""
    quiet()
    out = {"fp32": {}, "bf16_logical": {}}
    for stage in STAGES:
        engine, ctx = make_engine(stage)
        engine.load_state(os.path.join(workdir, f"dp2_z{stage}"))
        out["fp32"][stage] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
        engine, ctx = make_engine(stage, "bf16")
        engine.load_state(os.path.join(workdir, f"dp2_bf16_z{stage}"))
        out["bf16_logical"][stage] = engine.logical_optimizer_state()
    return out


def world4_tp(rank, world, workdir):
    quiet()
    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.topology import Topology
    from forge_dist.train import deepspeed_engine
    from forge_dist.train.context import RunContext

    groups = ProcessGroups.build(Topology(world, tp=2))
    pc = ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)
    out = {}
    for stage in STAGES:
        engine, ctx = make_engine(stage, groups=groups, model_kwargs=TP_MODEL, parallel=pc, clip=CLIP_TP)
        sharded_to = os.path.join(workdir, "tp2_s") if stage == 1 else None
        out[stage] = run_iters(engine, ctx, range(ITERS), sharded_to=sharded_to)
        if stage == 1:  # a ZeRO-1 partition (weights and 2 moments): this TP rank's parameters over 2 DP ranks
            out["s_partition"] = 3 * sum(p.numel() for _, p in engine._named) / 2
        out[stage]["ds_sizes"] = (engine.ds.dp_world_size, engine.ds.mp_world_size)
        if stage == 2:
            save(engine, ctx, os.path.join(workdir, "tp2_dp2_z2"))
            out["tp2_z2_saved"] = engine.full_state_dict()
        out[stage]["tp_sums"] = engine.tp_sums
    sharded = out[1]["sharded"]  # the sharded ZeRO-1 checkpoint at TP=2 x DP=2 (train/deepspeed_sharded.py)
    engine, ctx = make_engine(3, groups=groups, model_kwargs=TP_MODEL, parallel=pc, clip=CLIP_TP)
    engine.load_state(sharded)
    out["s_zero3"] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    engine, ctx = make_engine(2, model_kwargs=TP_MODEL, clip=CLIP_TP)  # TP 2 -> 1, DP 2 -> 4, ZeRO-1 -> 2
    engine.load_state(sharded)
    out["s_tp1_dp4"] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    out["s_written"] = written_per_rank(sharded)
    ctx = RunContext(rank=rank, world_size=world, dp_rank=groups.coord.dp, dp_size=groups.topology.dp)
    ctx.groups = groups  # ZeRO-3 from the meta device: TP shards drawn into partitions (deepspeed_init.py)
    torch.manual_seed(0)
    meta = parallelize(GPT(ModelConfig(**TP_MODEL), defer_init=True), groups, pc)
    meta_engine = deepspeed_engine.deepspeed_engine_factory(meta, train_config(2, clip=CLIP_TP),
                                                            {"deepspeed_config": ds_config(3)}, ctx)
    out["zero3_meta"] = run_iters(meta_engine, ctx, range(ITERS))
    real = deepspeed_engine.sum_partial_grads
    deepspeed_engine.sum_partial_grads = lambda *args: 0
    try:  # the control: without summing partial gradients over TP the run must diverge
        out["no_hooks"] = run_iters(*make_engine(1, groups=groups, model_kwargs=TP_MODEL, parallel=pc, clip=CLIP_TP),
                                    range(3))
    finally:
        deepspeed_engine.sum_partial_grads = real
    out["tp_counts"] = {}  # TP collectives of the partial-gradient sums per step, 1 and 3 layers
    for n_layer in (1, 3):
        engine, ctx = make_engine(2, groups=groups, model_kwargs=dict(TP_MODEL, n_layer=n_layer), parallel=pc,
                                  clip=CLIP_TP)
        with groups.count_collectives() as counter:
            engine.forward_backward([micro_batch(0, m, ctx.dp_rank, ctx.dp_size) for m in range(engine.gas)])
        engine.step(lr(0))
        out["tp_counts"][n_layer] = counter.count(phase="grad_sync")
    return out


# --- the single-process reference -----------------------------------------------------------------
def reference(model_kwargs=TINY, clip=CLIP):
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.train.engine import LocalEngine
    from forge_dist.train.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kwargs))
    cfg = train_config(1, clip=clip)
    engine = LocalEngine(model, build_optimizer(model, cfg, "cpu"), "cpu", "float32", clip)
    out = {"loss": [], "grad_norm": []}
    for it in range(ITERS):
        out["loss"].append(engine.forward_backward([micro_batch(it, m) for m in range(ACCUM)]).item())
        out["grad_norm"].append(float(engine.step(lr(it))["grad_norm"]))
    out["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def worst_weight_error(weights, ref_weights) -> float:
    assert set(weights) == set(ref_weights)
    return max(rel(weights[k], ref_weights[k]) for k in ref_weights if ref_weights[k].is_floating_point())


def errors(label, run, ref, offset=0):
    """Worst relative errors of ``run`` against ``ref`` (losses from iteration ``offset`` of ref),
    printed for the record (pytest -s shows them)."""
    n = len(run["loss"])
    out = {"loss": max(rel(a, b) for a, b in zip(run["loss"], ref["loss"][offset:offset + n])),
           "weights": worst_weight_error(run["weights"], ref["weights"])}
    if offset == 0 and "grad_norm" in ref:
        out["grad_norm"] = max(rel(a, b) for a, b in zip(run["grad_norm"], ref["grad_norm"]))
    print(f"\n{label}: " + ", ".join(f"{k} {v:.2g}" for k, v in out.items()), end="")
    return out


# --- fixtures: the worlds, in dependency order ------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("deepspeed"))


@pytest.fixture(scope="module")
def dp1(workdir):
    return spawn(world1_save, 1, workdir, timeout=240)


@pytest.fixture(scope="module")
def dp2(workdir, dp1):
    return spawn(world2, 2, workdir, timeout=400)


@pytest.fixture(scope="module")
def dp1_resumed(workdir, dp2):
    return spawn(world1_resume, 1, workdir, timeout=240)


@pytest.fixture(scope="module")
def tp_dp(workdir):
    return spawn(world4_tp, 4, workdir, timeout=400)


# --- data parallel ---------------------------------------------------------------------------------
def test_zero_1_2_equal_stage_0_bit_for_bit(dp2):
    """Exact wherever DeepSpeed adds the same numbers in the same order: ZeRO-1 always; ZeRO-2 with
    one micro-batch per step (with accumulation it reduces every micro-batch, so its sum is
    (a1 + b1) + (a2 + b2) instead of stage 0's (a1 + a2) + (b1 + b2): within 1e-6)."""
    for runs, stages in ((dp2["gas1"], (1, 2)), (dp2["parity"], (1,))):
        base = runs[0]
        for stage in stages:
            assert max(runs[stage]["grad_norm"]) < CLIP  # no clipping: the precondition of bit-exactness
            assert runs[stage]["loss"] == base["loss"], f"ZeRO-{stage} losses differ from stage 0"
            for k, v in base["weights"].items():
                assert torch.equal(runs[stage]["weights"][k], v), f"ZeRO-{stage}: {k} differs from stage 0"
    e = errors("ZeRO-2 vs stage 0 with 2 accumulated micro-batches", dp2["parity"][2], dp2["parity"][0])
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-6


def test_zero_3_matches_stage_0(dp2):
    e = errors("ZeRO-3 vs stage 0 (DP=2)", dp2["parity"][3], dp2["parity"][0])
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-6


def test_every_stage_matches_single_process(dp1, dp2):
    for name, runs in (("DP=2", dp2["parity"]), ("DP=1", dp1)):
        for stage in STAGES:
            e = errors(f"{name} ZeRO-{stage} vs one process", runs[stage], dp1["ref"])
            assert max(e.values()) <= 1e-5, (name, stage, e)


def test_resume_at_the_same_layout_is_exact(dp2):
    for stage in STAGES:
        full, resumed = dp2["parity"][stage], dp2["resume"][stage]
        assert resumed["loss"] == full["loss"][SAVE_AT:], f"ZeRO-{stage}"
        for k, v in full["weights"].items():
            assert torch.equal(resumed["weights"][k], v), f"ZeRO-{stage}: {k}"


def test_resume_on_another_data_parallel_size(dp1, dp2, dp1_resumed):
    for stage in STAGES:
        for name, resumed, full in (("1 -> 2", dp2["from_dp1"][stage], dp1[stage]),
                                    ("2 -> 1", dp1_resumed["fp32"][stage], dp2["parity"][stage])):
            e = errors(f"resume DP {name} ZeRO-{stage} vs uninterrupted", resumed, full, offset=SAVE_AT)
            assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, (name, stage, e)


def test_repartitioned_optimizer_state_is_the_saved_one(dp2, dp1_resumed):
    """bf16 (fp32 master weights and Adam moments) saved at DP=2, loaded at DP=1, read back."""
    for stage in STAGES:
        saved, loaded = dp2["bf16"][stage]["logical"], dp1_resumed["bf16_logical"][stage]
        assert saved["step"] == loaded["step"] == 8
        assert saved["params"].keys() == loaded["params"].keys()
        for name, tensors in saved["params"].items():
            assert tensors.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
            for key, t in tensors.items():
                assert torch.equal(loaded["params"][name][key], t), (stage, name, key)


def test_every_shipped_config_trains(dp2):
    assert sorted(dp2["configs"]) == shipped_configs(runnable_here=True)
    assert len(dp2["configs"]) == 11  # 4 stages x (fp32, bf16), 3 offload variants
    for name, losses in dp2["configs"].items():
        assert all(torch.isfinite(torch.tensor(losses))), name


def test_bf16_trains_at_every_stage(dp2):
    for stage in STAGES:
        losses = dp2["bf16"][stage]["loss"]
        assert losses[-1] < losses[0] - 0.3, f"ZeRO-{stage} bf16: {losses}"
        assert dp2["bf16"][stage]["skipped_steps"] == 0


# --- tensor x data parallel ------------------------------------------------------------------------
def test_tp2_dp2_matches_single_process(tp_dp, dp1):
    ref = dp1["ref_tp"]
    assert min(ref["grad_norm"]) > CLIP_TP  # clipped at every step
    for stage in STAGES:
        run = tp_dp[stage]
        assert run["ds_sizes"] == (2, 2), stage  # ZeRO partitions over the 2 DP replicas; TP x PP = 2
        e = errors(f"TP=2 x DP=2 ZeRO-{stage} vs one process", run, ref)  # grad norm: TP shards counted once
        assert max(e.values()) <= 1e-5, (stage, e)
    assert [tp_dp[stage]["tp_sums"] for stage in STAGES] == ["no_sync", "coalesce", "coalesce", "coalesce"]
    control = tp_dp["no_hooks"]
    assert max(rel(a, b) for a, b in zip(control["grad_norm"], ref["grad_norm"])) > 1e-4


def test_tp2_dp2_zero3_drawn_into_partitions_equals_a_full_build(tp_dp):
    """No rank builds the TP=2 x DP=2 ZeRO-3 model whole (meta device, TP shards drawn into ZeRO-3
    partitions), and it trains exactly as the fully built one."""
    assert tp_dp["zero3_meta"]["loss"] == tp_dp[3]["loss"]
    for k, v in tp_dp[3]["weights"].items():
        assert torch.equal(tp_dp["zero3_meta"]["weights"][k], v), k


def test_tp2_dp2_sharded_checkpoint_resumes_at_zero3_and_at_tp1_dp4(tp_dp):
    """The sharded ZeRO-1 checkpoint of TP=2 x DP=2 (each rank its ZeRO partition of its TP shard,
    cut at the TP boundaries into logical boxes) resumed at ZeRO-3 on the same layout and at ZeRO-2
    on TP=1 x DP=4 continues the uninterrupted run; every value was written once, each rank at most
    its ZeRO partition (half of its TP shard)."""
    for name, bound in (("s_zero3", 1e-6), ("s_tp1_dp4", 1e-5)):
        e = errors(f"TP=2 x DP=2 ZeRO-1 sharded -> {name} vs uninterrupted", tp_dp[name], tp_dp[1], offset=SAVE_AT)
        assert e["loss"] <= bound and e["weights"] <= 1e-5, (name, e)
    per_rank, total = tp_dp["s_written"]
    print(f"\nTP=2 x DP=2 sharded: elements written per rank {per_rank} of {total}", end="")
    assert sum(per_rank.values()) == total and sorted(per_rank) == [0, 1, 2, 3], (per_rank, total)
    assert max(per_rank.values()) <= tp_dp["s_partition"] + 64, (per_rank, tp_dp["s_partition"])  # + alignment


def test_tp_partial_gradient_sums_do_not_grow_with_the_parameters(tp_dp):
    """One bucketed all-reduce per step (2 micro-batches) for the partial gradients of 1 or 3 layers,
    where a hook per parameter would issue one per parameter and micro-batch."""
    assert tp_dp["tp_counts"] == {1: 1, 3: 1}


def test_zero_clipping_in_a_pure_data_parallel_world(dp1, dp2):
    ref = dp1["ref_tp"]  # one process, the same model and clip
    assert min(ref["grad_norm"]) > CLIP_TP  # clipped at every step
    for stage, run in dp2["clip"].items():
        e = errors(f"DP=2 ZeRO-{stage} clipping vs one process", run, ref)
        assert max(e.values()) <= 1e-5, (stage, e)


# --- checkpoints in our format ----------------------------------------------------------------------
def test_zero_checkpoints_consolidate_to_the_saved_weights(dp2, workdir, tmp_path):
    """zero_to_fp32 per model-parallel rank, TP shards joined: the weights at SAVE_AT (fp32), the
    fp32 master weights (bf16), and TP=2 x DP=2."""
    from forge_dist.io.deepspeed_ckpt import consolidate

    for stage in STAGES:
        state, cfg, meta = consolidate(os.path.join(workdir, f"dp2_z{stage}", "deepspeed"))
        assert meta["layout"]["zero_stage"] == stage and cfg.n_layer == TINY["n_layer"]
        saved = _logical_fp32(os.path.join(workdir, f"dp2_z{stage}"))
        for name, t in saved.items():
            assert torch.equal(state[name], t), (stage, name)
        bf16_state, _, _ = consolidate(os.path.join(workdir, f"dp2_bf16_z{stage}"))
        for name, tensors in dp2["bf16"][stage]["logical"]["params"].items():
            assert torch.equal(bf16_state[name], tensors["fp32"]), ("bf16", stage, name)


def _safetensors_parts(file):
    """(parsed header, data bytes): safetensors orders its __metadata__ keys at random."""
    with open(file, "rb") as fh:
        raw = fh.read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_forge_convert_streams_zero_checkpoints_one_tensor_at_a_time(dp2, workdir, tmp_path, monkeypatch):
    """forge-convert --to forge reads ZeRO 0-3 checkpoints (fp32, and bf16's fp32 masters) from
    memory-mapped partitions one logical tensor at a time: no tensor it made is alive when it makes
    the next, every value equals consolidate's (zero_to_fp32), and the files are those the whole-model
    path (load_deepspeed + save_pretrained) writes, byte for byte."""
    import weakref

    from forge_dist.io import deepspeed_stream
    from forge_dist.io.convert import convert
    from forge_dist.io.deepspeed_ckpt import consolidate, load_deepspeed
    from forge_dist.io.forge_format import WEIGHTS_NAME, save_pretrained

    made = []
    assembled = deepspeed_stream.DeepSpeedReader.tensor

    def one_at_a_time(reader, name):
        assert all(ref() is None for ref in made), f"a logical tensor is still alive when {name} is read"
        t = assembled(reader, name)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(deepspeed_stream.DeepSpeedReader, "tensor", one_at_a_time)
    for stage in STAGES:
        for src in (os.path.join(workdir, f"dp2_z{stage}"), os.path.join(workdir, f"dp2_bf16_z{stage}")):
            made.clear()
            out = tmp_path / f"stream_{len(os.listdir(tmp_path))}"
            assert convert(src, str(out / "streamed"), "forge") == str(out / "streamed")
            model, training = load_deepspeed(src)
            save_pretrained(model, str(out / "whole"), training=training)
            state, _, meta = consolidate(src)
            header, data = _safetensors_parts(out / "streamed" / WEIGHTS_NAME)
            assert (header, data) == _safetensors_parts(out / "whole" / WEIGHTS_NAME), src
            assert len(made) == len(header) - 1 == len(state) - len(meta.get("aliases", {}))
            with open(out / "streamed" / "config.json") as a, open(out / "whole" / "config.json") as b:
                assert a.read() == b.read()
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    dtype = {v: k for k, v in deepspeed_stream._ST_DTYPES.items()}[entry["dtype"]]
                    value = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(entry["shape"])
                    assert torch.equal(value, state[name].to(dtype)), (src, name)


def test_forge_convert_streams_zero_checkpoints_to_reallm_forge(dp2, workdir, tmp_path):
    """--to reallm-forge from ZeRO 0-3 checkpoints (fp32 and bf16) is planned on the meta device and
    filled one block at a time (io/stream_export.py): each logical tensor read once, and the ckpt.pt
    holds the records torch.save writes for the whole-model path (load_deepspeed + save_ckpt)."""
    import zipfile

    from forge_dist.io import stream_export
    from forge_dist.io.deepspeed_ckpt import load_deepspeed
    from forge_dist.io.reallm_forge import save_ckpt

    def records(file):
        with zipfile.ZipFile(file) as z:
            return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}

    for stage in STAGES:
        for src in (os.path.join(workdir, f"dp2_z{stage}"), os.path.join(workdir, f"dp2_bf16_z{stage}")):
            out = tmp_path / os.path.basename(src)
            source = stream_export.open_source(src)
            streamed = stream_export.save_ckpt_streamed(source, str(out / "s" / "ckpt.pt"))
            assert len(source.reads) == len(set(source.reads)) == len(source.names) - 1  # the tied head: once
            model, training = load_deepspeed(src)
            assert records(streamed) == records(save_ckpt(model, str(out / "w" / "ckpt.pt"), training=training)), src


def _logical_fp32(checkpoint):
    from forge_dist.io.deepspeed_ckpt import LOGICAL_NAME
    from forge_dist.io.statefile import load_state

    return {n: t["fp32"] for n, t in load_state(checkpoint, LOGICAL_NAME)["params"].items()}


def test_tp_checkpoint_consolidates_and_converts(tp_dp, workdir, tmp_path):
    from forge_dist.io import from_pretrained
    from forge_dist.io.convert import main as convert_main

    src = os.path.join(workdir, "tp2_dp2_z2")
    assert convert_main([src, str(tmp_path / "model"), "--to", "forge"]) == 0
    model = from_pretrained(str(tmp_path / "model"))
    for name, t in model.state_dict().items():
        assert torch.equal(t, tp_dp["tp2_z2_saved"][name]), name
    with open(os.path.join(src, "deepspeed", "forge_layout.json")) as fh:
        assert json.load(fh)["layout"] == {"dp_size": 2, "tp_size": 2, "pp_size": 1, "zero_stage": 2,
                                           "precision": "fp32"}


# --- forge-train --deepspeed_config under the launchers ----------------------------------------------
CLI = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--dropout", "0.0",
       "--batch_size", "2", "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1",
       "--device", "cpu", "--dtype", "float32", "--no-tensorboard_log", "--no-progress", "--max_sample_tokens", "8",
       "--always_save_checkpoint", "--lr_scheduler", "cosine", "--warmup_iters", "2", "--lr_decay_iters", "6"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")


def _bin(name):
    return os.path.join(os.path.dirname(sys.executable), name)  # the venv's own script


def _launch(cmd, extra_env=None, timeout=180, check=True):
    from forge_dist.testing.spawn import free_port

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(FORGE_OPS="reference", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_PORT=str(free_port()), **(extra_env or {}))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 or not check, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _losses(out_dir, key="loss"):
    from forge_dist.train.metrics import read_metrics

    return {r["iter"]: r[key] for r in read_metrics(str(out_dir)) if key in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from forge_dist.data.prepare import prepare_default_dataset

    return str(prepare_default_dataset(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def ds_launch(corpus, tmp_path_factory):
    """DeepSpeed's launcher, 2 ranks, ZeRO-2 fp32, 6 iterations, checkpoints at 3 and 6: the sharded
    format (``auto`` for a launched run: each rank writes its ZeRO partitions)."""
    from forge_dist.testing.spawn import free_port

    out = tmp_path_factory.mktemp("dslaunch") / "out"
    _launch([_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "forge_dist.train",
             "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"), *CLI, "--dataset", corpus,
             "--out_dir", str(out)])
    return out


def test_deepspeed_launcher_trains_and_checkpoints(ds_launch):
    losses = _losses(ds_launch)
    assert sorted(losses) == list(range(6)) and losses[5] < losses[0]
    ckpt_dir = os.path.join(ds_launch, "checkpoints", "iter_0000003")
    assert {"model", "manifest.json", "optimizer.json", "trainer_state.json"} <= set(os.listdir(ckpt_dir))
    assert not {"deepspeed", "deepspeed_logical.json"} & set(os.listdir(ckpt_dir))  # nothing gathered
    files = sorted(os.listdir(os.path.join(ckpt_dir, "model", "dcp")))
    assert files == [".metadata.json", "__0_0.distcp", "__1_0.distcp"], files  # each rank its partitions
    with open(os.path.join(ckpt_dir, "optimizer.json")) as fh:
        assert json.load(fh)["engine"] == "deepspeed"


@pytest.fixture(scope="module")
def ds_resumed(ds_launch, tmp_path_factory):
    """torchrun resuming ds_launch's sharded iteration 3 at the same layout, writing the gathered
    format from there (DeepSpeed's own files at iteration 6, which the hostile tests poison)."""
    from forge_dist.testing.spawn import free_port

    out = tmp_path_factory.mktemp("dsresumed") / "out"
    shutil.copytree(ds_launch, out)
    _launch([_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "forge_dist.train", "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"), *CLI,
             "--out_dir", str(out), "--init_from", "resume", "--init_from_ckpt", "iter_0000003",
             "--checkpoint_format", "gathered"])
    return out


def test_resume_under_torchrun_continues_exactly(ds_launch, ds_resumed):
    full, resumed = _losses(ds_launch), _losses(ds_resumed)
    assert [resumed[i] for i in range(3, 6)] == [full[i] for i in range(3, 6)]  # bit for bit
    assert _losses(ds_resumed, "val_loss")[6] == _losses(ds_launch, "val_loss")[6]
    ckpt_dir = os.path.join(ds_resumed, "checkpoints", "iter_0000006")
    with open(os.path.join(ckpt_dir, "deepspeed", "forge_layout.json")) as fh:
        assert json.load(fh)["layout"]["dp_size"] == 2


def test_resume_on_one_process_from_two(ds_launch, tmp_path):
    """DP 2 -> 1 through forge-train: the global batch stays 4 (--batch_size 2 x 2 -> 4 x 1)."""
    out = tmp_path / "out"
    shutil.copytree(ds_launch, out)
    _launch([sys.executable, "-m", "forge_dist.train", "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"),
             *CLI, "--batch_size", "4", "--out_dir", str(out), "--init_from", "resume", "--init_from_ckpt",
             "iter_0000003"])
    full, resumed = _losses(ds_launch), _losses(out)
    assert max(abs(resumed[i] - full[i]) / full[i] for i in range(3, 6)) <= 1e-5


def test_mpirun_keeps_rendezvous_on_loopback(ds_launch, corpus, tmp_path):
    """Under mpirun our launcher detection exports all five rendezvous variables, so DeepSpeed never
    runs its MPI discovery (which takes ``hostname -I``, not loopback here): a ``hostname`` on PATH
    that records any call with -I stays silent. ZeRO-3 from scratch matches the ZeRO-2 run."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    shim, marker, real = tmp_path / "bin", tmp_path / "hostname_I_called", shutil.which("hostname") or "hostname"
    shim.mkdir()
    (shim / "hostname").write_text(f"#!/bin/sh\n[ \"$1\" = -I ] && touch {marker} && echo 192.0.2.99 && exit 0\n"
                                   f"exec {real} \"$@\"\n")
    (shim / "hostname").chmod(0o755)
    out = tmp_path / "out"
    _launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "forge_dist.train",
             "--deepspeed_config", os.path.join(CONFIGS, "zero3_fp32.json"), *CLI, "--max_iters", "3",
             "--dataset", corpus, "--out_dir", str(out)],
            extra_env={"PATH": f"{shim}:{os.environ['PATH']}", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_oob_tcp_if_include": "lo",
                       "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_btl": "self,vader,tcp"})
    assert not marker.exists()
    zero3, zero2 = _losses(out), _losses(ds_launch)
    assert sorted(zero3) == [0, 1, 2]
    assert max(abs(zero3[i] - zero2[i]) / zero2[i] for i in range(3)) <= 1e-6


# --- hostile checkpoints: nothing in DeepSpeed's files is unpickled ----------------------------------
def _poisoned_copy(ds_resumed, tmp_path, pattern):
    """A copy of the run whose iteration-6 DeepSpeed files matching ``pattern`` each carry a
    code-running payload, the manifest re-sealed around them (as an attacker would); returns
    (out_dir, checkpoint, marker files the payloads would create)."""
    from forge_dist.testing.hostile import plant_payload, reseal

    out = tmp_path / "out"
    shutil.copytree(ds_resumed, out)
    ckpt = out / "checkpoints" / "iter_0000006"
    files = sorted(glob.glob(str(ckpt / "deepspeed" / "*" / pattern)))
    assert files, pattern
    control = tmp_path / "control_ran"  # the payload is live: DeepSpeed's torch.load would run it
    plant_payload(shutil.copy(files[0], tmp_path / "control.pt"), str(control))
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    markers = [tmp_path / f"payload_ran_{i}" for i in range(len(files))]
    for f, marker in zip(files, markers):
        plant_payload(f, str(marker))
    reseal(str(ckpt))
    return out, ckpt, markers


def test_code_in_a_deepspeed_checkpoint_never_runs_on_resume(ds_resumed, tmp_path):
    """torchrun resume at the saved layout (DeepSpeed reads its own ZeRO-2 files) of a checkpoint
    whose optimizer partitions carry a payload: refused with the file named, the payload never runs."""
    from forge_dist.testing.spawn import free_port

    out, _, markers = _poisoned_copy(ds_resumed, tmp_path, "*_optim_states.pt")
    proc = _launch([_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "-m", "forge_dist.train", "--deepspeed_config", os.path.join(CONFIGS, "zero2_fp32.json"), *CLI,
                    "--max_iters", "8", "--out_dir", str(out), "--init_from", "resume", "--init_from_ckpt",
                    "iter_0000006"], check=False)
    assert proc.returncode != 0
    assert "refused DeepSpeed checkpoint file" in proc.stderr, proc.stderr[-3000:]
    assert "io.open" in proc.stderr
    assert not any(m.exists() for m in markers)


def test_code_in_a_deepspeed_checkpoint_never_runs_in_forge_convert(ds_resumed, tmp_path, capsys):
    """forge-convert --to forge (streaming the partitions through deepspeed_safe's allow-list, where
    DeepSpeed's zero_to_fp32 would pass weights_only=False) refuses a payload in the model states and
    in the optimizer partitions."""
    from forge_dist.io.convert import main as convert_main

    for pattern in ("*_model_states.pt", "*_optim_states.pt"):
        sub = tmp_path / pattern.strip("*_.pt")
        sub.mkdir()
        _, ckpt, markers = _poisoned_copy(ds_resumed, sub, pattern)
        assert convert_main([str(ckpt), str(sub / "model"), "--to", "forge"]) == 2
        err = capsys.readouterr().err
        assert "refused DeepSpeed checkpoint file" in err and "io.open" in err, err
        assert not any(m.exists() for m in markers) and not (sub / "model").exists()
