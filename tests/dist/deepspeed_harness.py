"""The DeepSpeed tests' harness (tests/dist/test_deepspeed*.py): a tiny GPT, its batches and
learning rates, the DeepSpeed engine built for a ZeRO stage or a config, a training loop that
checkpoints (DeepSpeed's gathered format or forge-train's sharded one), the single-process
reference (forge_dist's LocalEngine) and the relative errors the tests bound.

Every run uses the same global batch (8 sequences: 4 per micro-batch, 2 micro-batches) and the same
learning rate at every iteration, whatever the data-parallel size."""
import logging
import os
import warnings

import torch
import torch.distributed as dist

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
TP_MODEL = dict(TINY, n_kv_group=1)  # one KV head, replicated on both TP ranks: partial gradients
GLOBAL_MICRO, ACCUM, ITERS, SAVE_AT = 4, 2, 10, 5
CLIP = 2.0  # gradient norms here stay near 1: clipping never triggers, so ZeRO-1/2 can be bit-exact
CLIP_TP = 0.5  # the TP world clips at every step (clipping and its norm against the reference)
STAGES = (0, 1, 2, 3)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed")


def shipped_configs(runnable_here: bool = False):
    """configs/deepspeed/*.json; ``runnable_here``: without the *_gpu.json ones (fp16), which a CPU
    run without fp16 support refuses (tests/unit/test_deepspeed_config.py checks the refusal), and
    the *_cpu_adam.json ones, which test_deepspeed_optimizers.py trains (they need DeepSpeed's
    cpu_adam op built)."""
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".json"))
    if runnable_here:
        names = [n for n in names if not n.endswith(("_gpu.json", "_cpu_adam.json"))]
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


# --- engines and loops (run inside spawned worlds) ----------------------------------------------
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



# --- forge_dist's own engines on a DeepSpeed checkpoint -----------------------------------------
def native_engine(checkpoint, groups=None):
    """forge_dist's own engine (no DeepSpeed) with the weights of a DeepSpeed checkpoint and its
    optimizer state: ParallelEngine over ``groups``, else LocalEngine."""
    from forge_dist import ModelConfig
    from forge_dist.io.deepspeed_ckpt import consolidate
    from forge_dist.io.state import load_state
    from forge_dist.model.gpt import GPT
    from forge_dist.train.context import RunContext
    from forge_dist.train.parallel_engine import parallel_engine_factory
    from forge_dist.train.sharded_save import is_sharded_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = RunContext(rank=rank, world_size=world, dp_rank=rank, dp_size=world)
    model = GPT(ModelConfig(**TINY))
    if not is_sharded_checkpoint(checkpoint):  # a sharded one: the engine reads the weights with the moments
        state, _, _ = consolidate(os.path.join(checkpoint, "deepspeed"))
        load_state(model, state, "the consolidated DeepSpeed checkpoint")
    if groups is not None:
        from forge_dist.config.parallel import ParallelConfig

        ctx.groups, ctx.parallel_config = groups, ParallelConfig()
    engine = parallel_engine_factory(model, train_config(world), {}, ctx)
    engine.load_state(checkpoint)
    return engine, ctx


def run_native(engine, ctx, iters, sharded_to=None, sharded_at=None, gathered_to=None):
    """run_iters for forge_dist's engines: losses and the final logical weights (and
    checkpoints before ``sharded_at``: the sharded format, and the gathered one under ``gathered_to``)."""
    from forge_dist.train.checkpoint import save_checkpoint

    out = {"loss": []}
    for it in iters:
        if sharded_to is not None and it == sharded_at:
            out["sharded"] = sharded_save(engine, ctx, sharded_to, it)
            if gathered_to is not None:
                out["gathered"] = save_checkpoint(gathered_to, it, engine.model, engine, {"iteration": it}, ctx)
        loss = engine.forward_backward([micro_batch(it, m, ctx.dp_rank, ctx.dp_size) for m in range(ACCUM)])
        engine.step(lr(it))
        out["loss"].append(ctx.mean(loss.item()))
    full = engine.full_state_dict()  # collective under TP; None on data-parallel replicas but the first
    out["weights"] = None if full is None else {k: v.detach().clone() for k, v in full.items()}
    return out


# --- the single-process reference -----------------------------------------------------------------
def reference(model_kwargs=TINY, clip=CLIP):
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.testing.local_run import local_engine, run_local

    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kwargs))
    return run_local(local_engine(model, train_config(1, clip=clip), clip), model, range(ITERS),
                     lambda it: [micro_batch(it, m) for m in range(ACCUM)], lr)


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
