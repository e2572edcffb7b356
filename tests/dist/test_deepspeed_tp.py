"""The DeepSpeed engine under tensor x data parallelism (TP=2 x DP=2, one world of 4): sequence
parallelism and a replicated KV head (partial gradients), ZeRO 0-3 against the single-process run
(forge_dist's LocalEngine, in this process), and the same without the TP gradient sums (which must
then fail: the test can tell); the sharded ZeRO-1 checkpoint resumed at ZeRO-3 and at TP=1 x DP=4
ZeRO-2 (train/deepspeed_sharded.py); ZeRO-3 drawn from the meta device, and from --init_from
prev_run's weights (each rank reading only its partitions); the ZeRO-2 checkpoint
consolidated and converted. Harness: deepspeed_harness.py."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from forge_dist.testing.spawn import spawn

from deepspeed_harness import (CLIP_TP, ITERS, SAVE_AT, STAGES, TP_MODEL, ds_config, errors, lr, make_engine,
                               micro_batch, quiet, reference, rel, run_iters, save, train_config, written_per_rank)

pytestmark = [pytest.mark.dist, pytest.mark.slow]


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
    out["prev_run"] = zero3_prev_run(out["tp2_z2_saved"], groups, pc)
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


PREV_LACKS = "transformer.h.1.mlp.c_fc.weight"  # what the prev_run checkpoint lacks keeps its drawn value


def zero3_prev_run(saved, groups, pc):
    """--init_from prev_run under ZeRO-3 at TP=2 x DP=2 (build_model on meta; each rank reads only
    its partitions of its TP shards: deepspeed_init.py), against the full build that loads the
    weights by name, then sliced: (full, meta) of the initial weights and 3 iterations each, and
    per rank the elements it asked for of each tensor and the size of its partitions."""
    from forge_dist import ModelConfig
    from forge_dist.io.slice_read import StateDictSlices
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import shard_info
    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import deepspeed_engine_factory
    from forge_dist.train.model_build import build_model

    from test_sharded_init import _NoWholeModel  # every whole-model conversion path raises

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, train_cfg = ModelConfig(**TP_MODEL), train_config(2, clip=CLIP_TP)
    prev = {k: v for k, v in saved.items() if k != PREV_LACKS}
    values = {"deepspeed_config": ds_config(3)}
    out = {}
    for case in ("full", "meta"):
        reader = StateDictSlices(prev, "the prev_run weights")
        ctx = RunContext(rank=rank, world_size=world, dp_rank=groups.coord.dp, dp_size=groups.topology.dp)
        if case == "full":  # every rank builds the whole model and copies the weights by name
            model, _ = build_model(cfg, train_cfg, ctx, prev_state=reader)
            ctx.groups, ctx.parallel_config = groups, pc
            engine = deepspeed_engine_factory(parallelize(model, groups, pc), train_cfg, values, ctx)
        else:
            ctx.groups, ctx.parallel_config = groups, pc
            with _NoWholeModel():
                model, _ = build_model(cfg, train_cfg, ctx, prev_state=reader, on_meta=True)
                assert all(p.is_meta for p in model.transformer.h.parameters() if p.dim() > 1)
                engine = deepspeed_engine_factory(model, train_cfg, values, ctx)
            asked = {}  # elements read per tensor
            for name, _, sizes in reader.requests:
                asked[name] = asked.get(name, 0) + math.prod(sizes)
            r, dp = groups.coord.dp, groups.topology.dp  # this rank's partition: [r * ceil(n / DP), +ceil(n / DP))
            parts = {n: (min(-(-p.ds_numel // dp), max(0, p.ds_numel - -(-p.ds_numel // dp) * r)),
                         getattr(shard_info(p), "padded_size", None) is not None)
                     for n, p in model.named_parameters() if len(p.ds_shape) > 1}
            out["read_by_rank"] = [None] * world
            dist.all_gather_object(out["read_by_rank"], (asked, parts))
        initial = engine.full_state_dict()
        out[case] = (initial, run_iters(engine, ctx, range(3)))
    return out


@pytest.fixture(scope="module")
def tp_dp(workdir):
    return spawn(world4_tp, 4, workdir, timeout=400)


@pytest.fixture(scope="module")
def ref_tp():
    """One process, the TP world's model and clip (no spawn: forge_dist's LocalEngine here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_OPS", "reference")  # the pure-PyTorch numerics, as quiet() sets in the workers
        return reference(TP_MODEL, CLIP_TP)


# --- tensor x data parallel ------------------------------------------------------------------------
def test_tp2_dp2_matches_single_process(tp_dp, ref_tp):
    ref = ref_tp
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


def test_tp2_dp2_zero3_prev_run_reads_only_its_partitions(tp_dp):
    """--init_from prev_run under ZeRO-3 at TP=2 x DP=2: the model stays on meta and each rank reads
    from the checkpoint only its ZeRO-3 partition of each TP shard (no whole-model path is called),
    the tensor the checkpoint lacks is drawn, and the initial weights and 3 iterations equal the full
    build that copies the weights by name, exactly."""
    from forge_dist.train.deepspeed_init import wants_meta_model

    assert wants_meta_model({"deepspeed_config": ds_config(3), "init_from": "prev_run"})  # build_run: on meta
    prev = tp_dp["prev_run"]
    (full_init, full), (meta_init, meta) = prev["full"], prev["meta"]
    assert full_init.keys() == meta_init.keys()
    for k, v in full_init.items():
        assert torch.equal(meta_init[k], v), k
    saved = tp_dp["tp2_z2_saved"]
    assert not torch.equal(full_init[PREV_LACKS], saved[PREV_LACKS])  # drawn, not read
    assert torch.equal(full_init["transformer.h.0.mlp.c_fc.weight"], saved["transformer.h.0.mlp.c_fc.weight"])
    assert meta["loss"] == full["loss"]
    for k, v in full["weights"].items():
        assert torch.equal(meta["weights"][k], v), k
    by_rank = prev["read_by_rank"]
    names = [n for n in by_rank[0][1] if n != PREV_LACKS]
    assert len(names) > 10 and all(PREV_LACKS not in asked for asked, _ in by_rank)
    for asked, parts in by_rank:  # exactly this rank's partition of its TP shard (vocabulary padding unread)
        for name in names:
            numel, padded = parts[name]
            assert asked.get(name, 0) == numel or (padded and asked.get(name, 0) < numel), (name, asked, numel)
        assert sum(asked.get(n, 0) for n in names) < 0.5 * sum(saved[n].numel() for n in names)
    for name in names:  # each element by one rank, or by both TP ranks of a replicated tensor
        total = sum(asked.get(name, 0) for asked, _ in by_rank)
        assert total in (saved[name].numel(), 2 * saved[name].numel()), (name, total)


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
