"""ZeRO-stage resharding: a checkpoint saved by DeepSpeed at ZeRO-1 resumes at ZeRO-3, and that
one without DeepSpeed (forge_dist's ParallelEngine at DP=2, and one process: DP 2 -> 1), each
continuing the uninterrupted ZeRO-1 run in fp32 (losses to 1e-6, weights to 1e-5 relative, the
bounds of test_deepspeed_dp.py's data-parallel resumes).

One DP=2 world: ZeRO-1 for ITERS iterations, checkpoint at SAVE_AT; ZeRO-3 resumed from it,
checkpoint at SAVE_AT + 2, the rest; the native engine resumed from the ZeRO-3 checkpoint (weights
consolidated from DeepSpeed's files without pickle, the AdamW moments from the logical copy:
forge_dist.train.optimizer_state). The ZeRO-3 checkpoint with a pickle payload in every rank's
optimizer partition is refused there too (DeepSpeed's own files at the same layout). Then one
process resumes the ZeRO-3 checkpoint with forge_dist's LocalEngine. forge-train's sharded format
(train/deepspeed_sharded.py) takes the same road: saved by ZeRO-1 at SAVE_AT, resumed at ZeRO-3
(saving at SAVE_3), from there at ZeRO-2, by the native engine (saving both formats at SAVE_3 + 1,
resumed by DeepSpeed ZeRO-0 and ZeRO-3), and at ZeRO-1 in one process (DP 2 -> 1), with what each
rank wrote read from DCP's index; the ZeRO-3 run there offloads parameters and optimizer to the CPU
and saves asynchronously. DeepSpeed's own optimizer (the config's "optimizer" section) resumes the
ZeRO-1 checkpoint at ZeRO-3 and saves one that ZeRO-1 at DP=1 resumes; its gathered weights stay on
rank 0 (the writer) only. The same DP=2 world checks
that ZeRO-3 from a meta-device model (deepspeed_init.py: no rank builds it whole) trains exactly as
from a full build, for the shipped ZeRO-3 configs that run on a CPU."""
import contextlib
import os
import shutil

import pytest
import torch

from forge_dist.testing.spawn import spawn

import deepspeed_harness as T  # the DeepSpeed test harness (engines, batches, the learning rate)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SAVE_3 = T.SAVE_AT + 2


@contextlib.contextmanager
def partitions_read():
    """The bytes each read by partitions of a gathered checkpoint's files took (a list), while
    loading the logical optimizer copy or the native optimizer state whole raises."""
    import forge_dist.io.statefile as statefile
    from forge_dist.io import slice_read

    real_load, read = statefile.load_state, []
    readers = (slice_read.StateFileSlices, slice_read.SafetensorsSlices)
    real_close = [r.close for r in readers]

    def load_state(directory, name, *args, **kwargs):
        if name in ("deepspeed_logical", "optimizer"):
            raise AssertionError(f"{name} was loaded whole")
        return real_load(directory, name, *args, **kwargs)

    def recording(close):
        def recorded(self):
            read.append(self.bytes_read)
            close(self)
        return recorded
    statefile.load_state = load_state
    for r, close in zip(readers, real_close):
        r.close = recording(close)
    try:
        yield read
    finally:
        statefile.load_state = real_load
        for r, close in zip(readers, real_close):
            r.close = close


def world2(rank, world, workdir):
    from forge_dist.errors import CheckpointError
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.hostile import plant_payload

    T.quiet()
    z1, z3 = os.path.join(workdir, "z1"), os.path.join(workdir, "z3")
    out = {"z1": T.run_iters(*T.make_engine(1), range(T.ITERS), save_to=z1, sharded_to=os.path.join(workdir, "s_z1"))}
    engine, ctx = T.make_engine(3)
    with partitions_read() as read:  # ZeRO-1 -> ZeRO-3: re-partitioned from the logical copy
        engine.load_state(z1)
    out["z3_logical_read"] = (read, os.path.getsize(os.path.join(z1, "deepspeed_logical.safetensors")))
    first = T.run_iters(engine, ctx, range(T.SAVE_AT, SAVE_3))
    T.save(engine, ctx, z3)
    out["z3"] = T.run_iters(engine, ctx, range(SAVE_3, T.ITERS))
    out["z3"]["loss"] = first["loss"] + out["z3"]["loss"]
    engine, ctx = T.native_engine(z3, ProcessGroups.build(Topology(world)))  # ZeRO-3 -> no ZeRO
    out["native"] = T.run_native(engine, ctx, range(SAVE_3, T.ITERS))
    out.update(sharded_chain(workdir, out["z1"]["sharded"], world))
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


def sharded_chain(workdir, s1, world):
    """The sharded format (train/deepspeed_sharded.py) through ZeRO stages and engines at DP=2:
    ZeRO-1 -> ZeRO-3 (saves at SAVE_3) -> ZeRO-2, and -> the native engine (saves at SAVE_3 + 1)
    -> DeepSpeed ZeRO-0 (and its gathered checkpoint -> ZeRO-3); with what each rank wrote of the
    ZeRO-1 and ZeRO-3 checkpoints."""
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology

    out = {}
    engine, ctx = T.make_engine(None, config=config("zero3_offload_param.json"))  # parameters and optimizer on CPU
    engine.load_state(s1)
    out["s_z3"] = T.run_iters(engine, ctx, range(T.SAVE_AT, T.ITERS), sharded_to=os.path.join(workdir, "s_z3"),
                              sharded_at=SAVE_3, asynchronous=True)  # written while SAVE_3.. train
    out["s_z3_offload"] = (engine.resolved.offload_param, engine.resolved.offload_optimizer)
    s3 = out["s_z3"]["sharded"]
    engine, ctx = T.make_engine(None, config=json_optimizer(3))  # DeepSpeed's own optimizer, from the JSON
    engine.load_state(s1)
    out["j_z3"] = T.run_iters(engine, ctx, range(T.SAVE_AT, T.ITERS), sharded_to=os.path.join(workdir, "j_z3"),
                              sharded_at=SAVE_3)
    out["j_z3_optimizer"] = (engine.resolved.ds_optimizer, type(engine.inner_optimizer).__name__)
    out["gathered"] = gathered_on_writer_only(engine, ctx, out["j_z3"]["weights"])
    engine, ctx = T.make_engine(2)
    engine.load_state(s3)
    out["s_z2"] = T.run_iters(engine, ctx, range(SAVE_3, T.ITERS))
    engine, ctx = T.native_engine(s3, ProcessGroups.build(Topology(world)))
    out["s_native"] = T.run_native(engine, ctx, range(SAVE_3, T.ITERS), sharded_to=os.path.join(workdir, "s_native"),
                                 sharded_at=SAVE_3 + 1, gathered_to=os.path.join(workdir, "g_native"))
    engine, ctx = T.make_engine(0)
    engine.load_state(out["s_native"]["sharded"])
    out["s_z0"] = T.run_iters(engine, ctx, range(SAVE_3 + 1, T.ITERS))
    engine, ctx = T.make_engine(3)  # the native engine's gathered format (optimizer.*) -> ZeRO-3
    with partitions_read() as read:
        engine.load_state(out["s_native"]["gathered"])
    g = out["s_native"]["gathered"]
    out["g_z3_read"] = (sum(read), sum(os.path.getsize(f) for f in (os.path.join(g, "optimizer.safetensors"),
                                                                   os.path.join(g, "model", "model.safetensors"))))
    out["g_z3"] = T.run_iters(engine, ctx, range(SAVE_3 + 1, T.ITERS))
    out["s_written"] = {name: T.written_per_rank(path) for name, path in (("z1", s1), ("z3", s3))}
    out["s_bf16"] = bf16_round_trip(workdir)
    return out


def json_optimizer(stage):
    """T.ds_config with an "optimizer" section: DeepSpeed builds the optimizer from the JSON (torch's
    AdamW class through ``torch_adam``: FusedAdam would cost an 85 s JIT build on a CPU machine)."""
    cfg = T.ds_config(stage)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
    return cfg


def gathered_on_writer_only(engine, ctx, weights):
    """The gathered format's weights (train.checkpoint.gathered_weights): rank 0 gets the full
    weights, the other ranks None (each tensor dropped as soon as it is gathered)."""
    import torch.distributed as dist

    from forge_dist.train.checkpoint import gathered_weights

    held = gathered_weights(engine, ctx)
    others = [None] * dist.get_world_size()
    dist.all_gather_object(others, held is None)
    same = held is not None and held.keys() == weights.keys() and all(torch.equal(held[k], weights[k]) for k in held)
    return {"others_hold_none": others[1:], "writer_equal": same}


def bf16_round_trip(workdir):
    """bf16 (fp32 masters in DeepSpeed's optimizer wrappers, bf16 parameters): the sharded checkpoint of
    stage 0 read back at ZeRO-3 and ZeRO-1 holds the saved masters, moments and step exactly, and the
    bf16 parameters the forward uses are refreshed from them (the same evaluation loss)."""
    engine, ctx = T.make_engine(0, "bf16")
    T.run_iters(engine, ctx, range(3))
    x, y = T.micro_batch(7, 0, ctx.dp_rank, ctx.dp_size)
    path = T.sharded_save(engine, ctx, os.path.join(workdir, "s_bf16"), 3)
    out = {"saved": engine.logical_optimizer_state(), "saved_loss": engine.eval_loss(x, y).item()}
    for stage in (3, 1):
        engine, ctx = T.make_engine(stage, "bf16")
        engine.load_state(path)
        out[stage] = {"state": engine.logical_optimizer_state(), "loss": engine.eval_loss(x, y).item()}
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
    from forge_dist.io.checkpoint_read import checkpoint_name

    T.quiet()
    engine, ctx = T.native_engine(os.path.join(workdir, "z3"))  # DP 2 -> 1, ZeRO-3 -> one process
    out = {"native": T.run_native(engine, ctx, range(SAVE_3, T.ITERS))}
    engine, ctx = T.make_engine(1)  # the sharded ZeRO-3 checkpoint at DP 2 -> ZeRO-1 at DP 1
    engine.load_state(os.path.join(workdir, "s_z3", checkpoint_name(SAVE_3)))
    out["s_one"] = T.run_iters(engine, ctx, range(SAVE_3, T.ITERS))
    engine, ctx = T.make_engine(None, config=json_optimizer(1))  # DeepSpeed's optimizer: ZeRO-3 DP 2 -> ZeRO-1 DP 1
    engine.load_state(os.path.join(workdir, "j_z3", checkpoint_name(SAVE_3)))
    out["j_one"] = T.run_iters(engine, ctx, range(SAVE_3, T.ITERS))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("resharding"))
    out = spawn(world2, 2, workdir, timeout=300)
    one = spawn(world1, 1, workdir, timeout=120)
    out["one"], out["s_one"], out["j_one"] = one["native"], one["s_one"], one["j_one"]
    out["workdir"] = workdir
    return out


def test_zero1_resumes_at_zero3(runs):
    e = T.errors("ZeRO-1 -> ZeRO-3 (DP=2) vs uninterrupted ZeRO-1", runs["z3"], runs["z1"], offset=T.SAVE_AT)
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, e


def test_zero3_reads_only_its_partitions_of_gathered_checkpoints(runs):
    """ZeRO-1 -> ZeRO-3 from a gathered checkpoint, and the native engine's gathered checkpoint ->
    ZeRO-3: each rank reads its partitions of the logical optimizer copy (weights and both moments),
    or of model.safetensors and optimizer.*, and never loads them whole (the resumes' parity:
    test_zero1_resumes_at_zero3, test_sharded_checkpoint_across_zero_stages_engines_and_dp)."""
    read, size = runs["z3_logical_read"]
    assert len(read) == 1 and 0.4 * size < read[0] < 0.6 * size, (read, size)
    read, size = runs["g_z3_read"]  # the native engine's gathered checkpoint: weights and moments
    assert 0.4 * size < read < 0.6 * size, (read, size)


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


def test_sharded_checkpoint_across_zero_stages_engines_and_dp(runs):
    """forge-train's sharded format under DeepSpeed: ZeRO-1 -> ZeRO-3 -> ZeRO-2, ZeRO-3 -> the native
    engine -> DeepSpeed ZeRO-0, and ZeRO-3 at DP=2 -> ZeRO-1 at DP=1, each continuing the
    uninterrupted ZeRO-1 run (the bounds of the logical copy's resumes above); and the native
    engine's gathered checkpoint -> ZeRO-3 (g_z3)."""
    for name, offset in (("s_z3", T.SAVE_AT), ("s_z2", SAVE_3), ("s_native", SAVE_3), ("s_z0", SAVE_3 + 1),
                         ("s_one", SAVE_3), ("g_z3", SAVE_3 + 1)):
        e = T.errors(f"sharded {name} vs uninterrupted ZeRO-1", runs[name], runs["z1"], offset=offset)
        assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, (name, e)


def test_sharded_checkpoint_with_deepspeeds_own_optimizer(runs):
    """The DeepSpeed config's "optimizer" section (DeepSpeed builds the optimizer): it resumes our
    ZeRO-1 checkpoint at ZeRO-3, saves its own, which ZeRO-1 at DP=1 resumes, each continuing the
    uninterrupted run."""
    assert runs["j_z3_optimizer"] == (True, "AdamW"), runs["j_z3_optimizer"]
    for name, offset in (("j_z3", T.SAVE_AT), ("j_one", SAVE_3)):
        e = T.errors(f"DeepSpeed's optimizer {name} vs uninterrupted ZeRO-1", runs[name], runs["z1"], offset=offset)
        assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, (name, e)


def test_zero3_offload_async_sharded_checkpoint(runs):
    """ZeRO-3 with offload_param and offload_optimizer (cpu; torch AdamW steps the offloaded
    partitions, no cpu_adam build) saving asynchronously (DCP's async save: this rank's partitions
    copied to CPU memory before save returns, written while training goes on): it continues the
    uninterrupted run, and the checkpoint it wrote in the background resumes exactly (s_z2, s_native,
    s_one above read it)."""
    assert runs["s_z3_offload"] == (True, True)
    print(f"\nasync save published when save() returned: {runs['s_z3']['published_at_return']}", end="")
    e = T.errors("offloaded ZeRO-3, async save, vs uninterrupted ZeRO-1", runs["s_z3"], runs["z1"], offset=T.SAVE_AT)
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, e


def test_gathered_weights_are_held_by_the_writer_only(runs):
    """The gathered format under DeepSpeed at DP=2: rank 0 gets the full weights, rank 1 nothing."""
    assert runs["gathered"] == {"others_hold_none": [True], "writer_equal": True}, runs["gathered"]


def test_sharded_deepspeed_ranks_write_only_their_partitions(runs):
    """Every weight and moment value is written once, and each of the 2 ranks wrote about half:
    its ZeRO partition (ZeRO-1's flat partitions, ZeRO-3's per-parameter ones), nothing gathered."""
    for name, (per_rank, total) in runs["s_written"].items():
        print(f"\nsharded {name}: elements written per rank {per_rank} of {total}", end="")
        assert sum(per_rank.values()) == total, (name, per_rank, total)
        assert sorted(per_rank) == [0, 1] and max(per_rank.values()) <= 0.51 * total, (name, per_rank, total)


def test_sharded_bf16_state_reads_back_exactly(runs):
    out = runs["s_bf16"]
    saved = out["saved"]
    assert saved["step"] == 3
    for stage in (3, 1):
        loaded = out[stage]["state"]
        assert loaded["step"] == 3 and loaded["params"].keys() == saved["params"].keys(), stage
        for name, tensors in saved["params"].items():
            assert tensors.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
            for key, t in tensors.items():
                assert torch.equal(loaded["params"][name][key], t), (stage, name, key)
        assert out[stage]["loss"] == out["saved_loss"], stage
