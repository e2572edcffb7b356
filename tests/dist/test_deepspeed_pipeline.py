"""DeepSpeed's pipeline engine over forge_dist's stages (forge_dist.train.deepspeed_pipeline)
against one process.

One spawned world of 4 ranks (DP=2 x PP=2 unless said, 3 layers, tied token table and head),
several configurations, each from a GPT on the meta device (as forge-train builds it: a stage
draws only its own parameters):

  ZeRO-0 fp32, ZeRO-1 fp32   split 2 + 1 (--pipeline_layers) and 1 + 2 (balanced, the embedding and
                             head counted); 4 iterations, clipping active: losses, grad norms, every gradient of
                             iteration 0 and the weights after the last step against forge_dist's
                             LocalEngine (one process, the same global batch and learning rates)
  resume                     the ZeRO-1 run's checkpoint at iteration 2 resumed by the pipeline
                             engine (DeepSpeed's own files) and by the DeepSpeed engine at PP=1,
                             DP=4 (the logical optimizer copy): both finish as the run did; the
                             same from its sharded checkpoint (each stage rank its partitions)
  bf16 ZeRO-1                trains; weights within bf16 rounding of the fp32 run
  --use_gradient_checkpointing  ZeRO-0: the same numbers as without (a model built whole, not on meta)
  MoE at PP=4 x DP=1         aux and z losses of every stage: loss, gradients, weights
  TP=2 x PP=2, ZeRO-0 and 1  with and without sequence parallelism: loss, grad norms, gradients, weights;
                             ZeRO-1's sharded checkpoint resumed at TP=1 x PP=2 x DP=2 and PP=1 x DP=4

The checkpoint is then consolidated here (forge-convert's reader, no DeepSpeed process group).
"""
import os

import pytest
import torch
import torch.distributed as dist

from forge_dist.testing.spawn import spawn

from deepspeed_harness import GLOBAL_MICRO, TINY, micro_batch  # the DeepSpeed tests' model size and batches

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MODEL = dict(TINY, n_layer=3)
MOE = dict(MODEL, n_layer=4, use_moe=True, n_experts=4, moe_top_k=2, moe_layer_freq=1, moe_aux_loss_coef=0.01,
           moe_z_loss_coef=0.001)  # at PP=4 x DP=1: every stage's auxiliary losses in the objective
ACCUM, ITERS, SAVE_AT, CLIP = 2, 4, 2, 0.5  # clipping acts at every step


def lr(it: int) -> float:
    return 1e-2 * (it + 1) / ITERS


def train_config(dp_size: int, dtype: str = "float32", accum: int = ACCUM):
    from forge_dist.train.options import TrainConfig

    return TrainConfig(batch_size=GLOBAL_MICRO // dp_size, gradient_accumulation_steps=accum, device="cpu",
                       dtype=dtype, grad_clip=CLIP, learning_rate=1e-2, weight_decay_split=True,
                       adamw_weight_decay=0.1)  # two optimizer groups: ZeRO links each one's fragments


def ds_config(stage: int, precision: str = "fp32") -> dict:
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 10 ** 6,
            "zero_optimization": {"stage": stage}}


# --- inside the world -------------------------------------------------------------------------------
def make_engine(stage, pp=2, precision="fp32", model_kwargs=MODEL, accum=ACCUM, tp=1, sp=False, layers=None,
                full=False):
    import logging

    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import deepspeed_engine_factory
    from forge_dist.train.deepspeed_pipe_module import canonical_names

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    world = dist.get_world_size()
    groups = ProcessGroups.build(Topology(world, pp=pp, tp=tp))
    ctx = RunContext(rank=dist.get_rank(), world_size=world, dp_rank=groups.coord.dp, dp_size=groups.topology.dp)
    ctx.groups = groups
    ctx.parallel_config = ParallelConfig(pipeline_parallel_size=pp, tensor_parallel_size=tp, sequence_parallel=sp,
                                         pipeline_layers=layers)
    torch.manual_seed(0)  # the same model on every rank: on meta, as forge-train builds it, unless ``full``
    model = GPT(ModelConfig(**model_kwargs), defer_init=not full)
    drawn = {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    cfg = train_config(ctx.dp_size, "bfloat16" if precision == "bf16" else "float32", accum)
    engine = deepspeed_engine_factory(model, cfg, {"deepspeed_config": ds_config(stage, precision)}, ctx)
    held = {name for name, _ in engine._named}  # this stage's parameters, by their first GPT name
    canonical = canonical_names(model)
    engine.materialised_elsewhere = sorted(n for n, p in model.named_parameters(remove_duplicate=False)
                                           if n in drawn and not p.is_meta and canonical[n] not in held)
    engine.left_on_meta = sum(p.is_meta for n, p in model.named_parameters(remove_duplicate=False) if n in drawn)
    assert not engine.materialised_elsewhere, (dist.get_rank(), engine.materialised_elsewhere[:4])  # every rank
    return engine, ctx


def grads(engine):
    """Logical name -> gradient of every parameter, all stages, on rank 0 (after forward_backward)."""
    from deepspeed.utils import safe_get_full_grad

    from forge_dist.parallel.tensor.metadata import full_tensor, shard_info

    mine = {}
    for name, p in engine._named:  # ZeRO-1 keeps the averaged gradient in its partitions
        g = p.grad if p.grad is not None else safe_get_full_grad(p)  # collective over DP
        if g is not None:
            mine[name] = full_tensor(g, shard_info(p), engine.groups).clone()  # TP shards joined
    parts = engine._gather_stages(mine)
    return None if parts is None else {k: v for part in parts for k, v in part.items()}


def run_iters(engine, ctx, iters, save_to=None, sharded_to=None):
    from forge_dist.train.sharded_save import ShardedCheckpointer

    out = {"loss": [], "grad_norm": [], "elsewhere": engine.materialised_elsewhere, "on_meta": engine.left_on_meta}
    for it in iters:
        if save_to is not None and it == SAVE_AT:
            if ctx.is_main:
                os.makedirs(save_to, exist_ok=True)
            ctx.barrier()
            engine.save_state(save_to, ctx)
            out["saved"] = engine.full_state_dict()
        if sharded_to is not None and it == SAVE_AT:  # forge-train's sharded format (train/deepspeed_sharded.py)
            out["sharded"] = ShardedCheckpointer(ctx).save(sharded_to, it, engine.model, engine, {"iteration": it})
        loss = engine.forward_backward([micro_batch(it, m, ctx.dp_rank, ctx.dp_size) for m in range(engine.gas)])
        if it == 0 and engine.layout["pp_size"] > 1:
            out["grads"] = grads(engine)
        out["loss"].append(ctx.mean(loss.item()))  # the pipeline engine's is already the DP mean
        out["grad_norm"].append(engine.step(lr(it))["grad_norm"])
    out["weights"] = engine.full_state_dict()
    return out


def world4(rank, world, workdir):
    os.environ["FORGE_OPS"] = "reference"  # the same numerics as the one-process reference below
    out = {"ref": reference(), "ref_moe": reference(MOE, accum=4)} if rank == 0 else {}
    for stage in (0, 1):  # ZeRO-0 with --pipeline_layers 2,1; ZeRO-1 with the balanced split
        save_to = os.path.join(workdir, "z1") if stage == 1 else None
        sharded_to = os.path.join(workdir, "s_z1") if stage == 1 else None
        engine, ctx = make_engine(stage, layers="2,1" if stage == 0 else None)
        out[stage] = run_iters(engine, ctx, range(ITERS), save_to=save_to, sharded_to=sharded_to)
        out[stage]["parts"] = list(engine.model.parts)  # DeepSpeed's partition of the n_layer + 2 pieces
    engine, ctx = make_engine(1)
    engine.load_state(os.path.join(workdir, "z1"))  # the same layout: DeepSpeed's own files
    out["resume"] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    engine, ctx = make_engine(1, pp=1, full=True)  # PP=1: the DeepSpeed engine takes a model built whole
    engine.load_state(os.path.join(workdir, "z1"))  # PP=2 x DP=2 -> PP=1 x DP=4: the logical copy
    out["resume_pp1"] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    for key, pp in (("s_resume", 2), ("s_resume_pp1", 1)):  # the sharded checkpoint: PP=2 -> PP=2 and -> PP=1
        engine, ctx = make_engine(1, pp=pp, full=pp == 1)  # PP=1: a model built whole
        engine.load_state(out[1]["sharded"])
        out[key] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    out["s_writers"] = writers(out[1]["sharded"])
    out["bf16"] = run_iters(*make_engine(1, precision="bf16"), range(ITERS))
    out["recompute"] = run_iters(*make_engine(0, model_kwargs=dict(MODEL, use_gradient_checkpointing=True),
                                              full=True), range(ITERS))  # each block recomputed in DeepSpeed's
    # backward; and a model handed over whole (built before DeepSpeed cuts it) trains the same
    out["moe"] = run_iters(*make_engine(0, pp=4, model_kwargs=MOE, accum=4), range(ITERS))  # 1f1b: >= P
    for stage in (0, 1):  # ZeRO-0 with sequence parallelism, ZeRO-1 with DeepSpeed's partitioned sends
        save_to = os.path.join(workdir, "tp_z1") if stage == 1 else None
        sharded_to = os.path.join(workdir, "s_tp_z1") if stage == 1 else None
        out[f"tp_z{stage}"] = run_iters(*make_engine(stage, tp=2, sp=stage == 0), range(ITERS), save_to=save_to,
                                        sharded_to=sharded_to)
    out["s_tp_writers"] = writers(out["tp_z1"]["sharded"])
    for key, kw in (("s_tp_pp2_dp2", dict(pp=2)), ("s_tp_pp1_dp4", dict(pp=1, full=True))):  # TP=2 -> TP=1
        engine, ctx = make_engine(1, **kw)
        engine.load_state(out["tp_z1"]["sharded"])
        out[key] = run_iters(engine, ctx, range(SAVE_AT, ITERS))
    return out


def writers(checkpoint):
    """{DCP entry: the ranks that wrote a chunk of it} of a sharded checkpoint."""
    from forge_dist.io.dcp_storage import read_index

    index = read_index(os.path.join(checkpoint, "model", "dcp"))
    out = {}
    for idx, info in index.storage_data.items():
        out.setdefault(idx.fqn, set()).add(int(info.relative_path.split("_")[2]))
    return out


# --- the one-process reference ------------------------------------------------------------------------
def reference(model_kwargs=MODEL, accum=ACCUM):
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.testing.local_run import local_engine, run_local

    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kwargs))
    return run_local(local_engine(model, train_config(1, accum=accum), CLIP), model, range(ITERS),
                     lambda it: [micro_batch(it, m) for m in range(accum)], lr, grads_at=0)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def worst(got: dict, want: dict) -> float:
    assert set(got) == set(want), set(got) ^ set(want)
    return max(rel(got[k], want[k]) for k in want if want[k].is_floating_point())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ds_pipe"))
    out = spawn(world4, 4, workdir, timeout=400)
    return out, out["ref"], workdir  # the one-process references, run by rank 0 with FORGE_OPS=reference


@pytest.fixture(scope="module")
def moe_reference(runs):
    return runs[0]["ref_moe"]


def test_pipeline_zero_0_and_1_match_one_process(runs):
    out, ref, _ = runs
    for stage in (0, 1):
        run = out[stage]
        assert min(ref["grad_norm"]) > CLIP  # clipping acts: the global norm over both stages matters
        assert max(rel(a, b) for a, b in zip(run["loss"], ref["loss"])) <= 1e-6, (stage, run["loss"], ref["loss"])
        assert max(rel(a, b) for a, b in zip(run["grad_norm"], ref["grad_norm"])) <= 1e-5, (stage, run["grad_norm"])
        assert worst(run["grads"], ref["grads"]) <= 1e-5, stage  # the tied table: both stages' parts summed
        assert worst(run["weights"], ref["weights"]) <= 1e-5, stage


def test_deepspeed_partition_is_our_split(runs):
    """Piece 0 is the embeddings, piece i + 1 block i, the last the head: the bounds DeepSpeed gets
    are our plan's (--pipeline_layers, or the balanced split with the embedding and head counted)."""
    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.pipeline.split import pipeline_plan

    out = runs[0]
    balanced = pipeline_plan(ParallelConfig(pipeline_parallel_size=2), ModelConfig(**MODEL))
    assert out[0]["parts"] == [0, 3, 5]  # --pipeline_layers 2,1
    assert out[1]["parts"] == [0, balanced.layers[0][1] + 1, MODEL["n_layer"] + 2]


def test_pipeline_with_gradient_checkpointing(runs):
    out, ref, _ = runs
    run = out["recompute"]
    assert max(rel(a, b) for a, b in zip(run["loss"], ref["loss"])) <= 1e-6
    assert worst(run["grads"], ref["grads"]) <= 1e-5 and worst(run["weights"], ref["weights"]) <= 1e-5


def test_zero_1_equals_zero_0(runs):
    out, _, _ = runs
    assert out[1]["loss"][0] == out[0]["loss"][0]  # the same forward whatever the split
    assert max(rel(a, b) for a, b in zip(out[1]["loss"], out[0]["loss"])) <= 1e-6
    assert worst(out[1]["weights"], out[0]["weights"]) <= 1e-6  # the clipped steps round differently


def assert_continues(out, keys, full=1):
    """The runs resumed from SAVE_AT (``keys``) finish as the uninterrupted run ``out[full]`` (ZeRO-1) did."""
    full = out[full]
    for key in keys:
        resumed = out[key]
        assert max(rel(a, b) for a, b in zip(resumed["loss"], full["loss"][SAVE_AT:])) <= 1e-6, key
        assert worst(resumed["weights"], full["weights"]) <= 1e-6, key


def test_pipeline_checkpoint_resumes_here_and_at_pp1(runs):
    out, _, _ = runs
    assert_continues(out, ("resume", "resume_pp1"))
    assert out["resume"]["loss"] == out[1]["loss"][SAVE_AT:]  # DeepSpeed's own files: exact


def test_pipeline_sharded_checkpoint_resumes_here_and_at_pp1(runs):
    """forge-train's sharded format from DeepSpeed's pipeline engine (ZeRO-1, PP=2 x DP=2): each stage
    rank writes only its stages' ZeRO partitions under one-process names (the tied table by stage 0),
    and the pipeline engine at PP=2 and the DeepSpeed engine at PP=1 x DP=4 finish as the run did."""
    out, _, _ = runs
    assert_continues(out, ("s_resume", "s_resume_pp1"))
    written = out["s_writers"]
    assert "model/lm_head.weight" not in written and "optim/transformer.wte.weight/exp_avg" in written
    for fqn, ranks in written.items():  # ranks 0, 1: stage 0 (embeddings, block 0); 2, 3: stage 1
        if not fqn.endswith("/step"):
            stage1 = ".h.1." in fqn or ".h.2." in fqn or "ln_f" in fqn
            assert ranks <= ({2, 3} if stage1 else {0, 1}), (fqn, ranks)


def test_tp_pipeline_sharded_checkpoint_resumes_at_other_layouts(runs):
    """TP=2 x PP=2 under DeepSpeed's pipeline engine (ZeRO-1) writes the sharded format, each rank its
    TP shard of its stage, which PP=2 x DP=2 (TP=1) and PP=1 x DP=4 resume, finishing as the run did."""
    out, _, _ = runs
    assert_continues(out, ("s_tp_pp2_dp2", "s_tp_pp1_dp4"), full="tp_z1")
    written = out["s_tp_writers"]
    for fqn in ("model/transformer.h.0.attn.c_attn_q.weight", "model/transformer.h.2.mlp.c_fc.weight"):
        assert written[fqn] == ({0, 1} if ".h.0." in fqn else {2, 3}), (fqn, written[fqn])  # both TP halves


def test_pipeline_checkpoint_converts(runs):
    """forge-convert's DeepSpeed reader takes the layer_XX files (weights_only) under the GPT's names."""
    from forge_dist.io.deepspeed_ckpt import consolidate, load_deepspeed

    out, _, workdir = runs
    for name, run in (("z1", out[1]), ("tp_z1", out["tp_z1"])):  # TP: the logical copy's fp32 weights
        state, cfg, meta = consolidate(os.path.join(workdir, name))
        assert meta["layout"]["pp_size"] == 2 and cfg.n_layer == MODEL["n_layer"]
        assert set(state) == set(run["saved"]), name
        for k, v in run["saved"].items():
            assert torch.equal(state[k], v), (name, k)
    model, info = load_deepspeed(os.path.join(workdir, "z1"))
    assert info["iter_num"] == SAVE_AT


def test_pipeline_bf16_trains(runs):
    out, ref, _ = runs
    bf16 = out["bf16"]
    assert max(rel(a, b) for a, b in zip(bf16["loss"], ref["loss"])) <= 2e-2
    assert worst(bf16["weights"], ref["weights"]) <= 5e-2
    assert all(v.dtype == torch.float32 for v in bf16["weights"].values() if v.is_floating_point())


def test_pipeline_moe_aux_losses_of_every_stage(runs, moe_reference):
    """PP=4: MoE layers on all four stages; their load-balancing and z losses are in the logged loss
    and in every gradient, at the one process's scale (1 / micro-batches)."""
    run, ref = runs[0]["moe"], moe_reference
    assert max(rel(a, b) for a, b in zip(run["loss"], ref["loss"])) <= 1e-6, (run["loss"], ref["loss"])
    assert worst(run["grads"], ref["grads"]) <= 1e-5  # the routers' gradients carry the aux losses
    assert worst(run["weights"], ref["weights"]) <= 1e-4


def test_pipeline_with_tensor_parallel_stages(runs):
    """TP=2 x PP=2 (ZeRO-0 sequence parallel; ZeRO-1 not, its activations sent split over TP by DeepSpeed;
    a vocab-parallel head, the tied table's shards tied per TP rank):
    gradients gathered over TP and the stages, grad norms with each logical value counted once."""
    out, ref, _ = runs
    for stage in (0, 1):
        run = out[f"tp_z{stage}"]
        assert max(rel(a, b) for a, b in zip(run["loss"], ref["loss"])) <= 1e-6, (stage, run["loss"], ref["loss"])
        assert max(rel(a, b) for a, b in zip(run["grad_norm"], ref["grad_norm"])) <= 1e-5, (stage, run["grad_norm"])
        assert worst(run["grads"], ref["grads"]) <= 1e-5, stage
        assert worst(run["weights"], ref["weights"]) <= 1e-5, stage


def test_a_stage_never_materialises_other_stages(runs):
    """From the GPT on the meta device (as forge-train builds it), each rank draws only the
    parameters its stage holds (and they equal one process's: the parity tests above); every other
    drawn parameter stays on meta, under TP and at PP=4 too."""
    out = runs[0]
    for key in (0, 1, "resume", "bf16", "moe", "tp_z0", "tp_z1"):
        assert out[key]["elsewhere"] == [], (key, out[key]["elsewhere"][:4])
        assert out[key]["on_meta"] > 0, key  # rank 0 (stage 0) holds no later block
    assert out["recompute"]["on_meta"] == 0  # the control: a model handed over whole
