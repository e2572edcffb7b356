"""The native engine's data parallelism (DDP on the DP group, forge_dist/parallel/data_parallel.py)
in two spawned worlds, each running many configurations:

  world 2 (DP=2)          parity with one process of twice the batch (2 accumulated micro-batches,
                          clipping active at every step); collectives per step: one DP bucket
                          whatever the number of parameters (1 or 4 layers), none before the last
                          micro-batch (no_sync); unused parameters as one process would see them;
                          torch.compile (aot_eager) of the DDP-wrapped model equal to eager; one
                          process compiled with dropout equal to eager
  world 4 (TP=2 x DP=2)   parity with one process (sequence parallelism, a replicated KV head,
                          clipping active); compiled with dropout equal to eager (RNG regions, TP
                          collectives and DDP hooks in a compiled model); collectives per step
                          independent of the number of layers; DeepSpeed's mpu creates one
                          one-rank group per rank (its own), not one per rank of the world

The one-process reference is LocalEngine on the same rows, run inside each rank (no collectives).
"""
import pytest
import torch
import torch.distributed as dist

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
ROWS, MICRO, ITERS, CLIP = 4, 2, 3, 0.05  # global rows per micro-batch; grad norms here are ~1-3


def micro_batches(it, dp_rank=0, dp_size=1, n_micro=MICRO):
    out = []
    for m in range(n_micro):
        g = torch.Generator().manual_seed(100 * it + m)
        x = torch.randint(0, TINY["vocab_size"], (ROWS, TINY["block_size"]), generator=g)
        y = torch.randint(0, TINY["vocab_size"], (ROWS, TINY["block_size"]), generator=g)
        rows = ROWS // dp_size
        out.append((x[dp_rank * rows:(dp_rank + 1) * rows], y[dp_rank * rows:(dp_rank + 1) * rows]))
    return out


def build(model_kwargs, groups=None, parallel=None, compile=False, clip=CLIP, zero=False):
    """LocalEngine (groups None) or ParallelEngine on the same initial weights (``zero``: ZeRO-1
    over the data-parallel group, as --zero_stage 1)."""
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.train.engine import LocalEngine
    from forge_dist.train.optim import build_optimizer
    from forge_dist.train.options import TrainConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kwargs))
    cfg = TrainConfig(device="cpu", dtype="float32", learning_rate=1e-2, grad_clip=clip)
    if groups is None:
        return LocalEngine(model, build_optimizer(model, cfg, "cpu"), "cpu", "float32", clip, compile)
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.train.parallel_engine import ParallelEngine

    parallel = parallel or ParallelConfig()
    if groups.tp.size > 1:
        parallelize(model, groups, parallel)
    optimizer = build_optimizer(model, cfg, "cpu", zero_group=groups.dp if zero else None)
    return ParallelEngine(model, optimizer, "cpu", "float32", clip, compile, groups, parallel)


def train(engine, groups=None, iters=ITERS):
    """Losses (mean over replicas), grad norms and the logical weights after ``iters`` steps."""
    dp_rank, dp_size = (0, 1) if groups is None else (groups.dp.rank, groups.dp.size)
    losses, norms = [], []
    for it in range(iters):
        loss = engine.forward_backward(micro_batches(it, dp_rank, dp_size))
        if groups is not None:
            loss = groups.dp.all_reduce(loss, phase="metrics") / dp_size
        norms.append(float(engine.step(1e-2)["grad_norm"]))
        losses.append(loss.item())
    if groups is None:
        return losses, norms, {k: v.clone() for k, v in engine.model.state_dict().items()}
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict

    return losses, norms, gather_full_state_dict(engine.model, groups)


def rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def worst_weight(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def step_counts(engine, groups, n_micro=MICRO):
    """Collectives of one optimizer step, by (group, phase, kind), and those of the micro-batches
    before the last one (no_sync) separately."""
    batches = micro_batches(0, groups.dp.rank, groups.dp.size, n_micro)
    with groups.count_collectives() as early:
        with engine.micro_batch_context(last=False):
            engine.module(*batches[0])[1].backward()
    engine.optimizer.zero_grad(set_to_none=True)
    with groups.count_collectives() as c:
        engine.forward_backward(batches)
        engine.step(1e-3)
    summary = {}
    for e in c.events:
        key = (e.group, e.phase, e.kind)
        summary[key] = summary.get(key, 0) + 1
    return summary, early.count(group="dp")


def _unused(rank, world):
    """A parameter used on one replica only counts zeros for the other; one used nowhere keeps
    None, as one process would see it."""
    from forge_dist.parallel.data_parallel import data_parallel
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.both, self.only_one, self.none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))

        def forward(self, scale):
            out = (self.both * scale).sum()
            return out + (self.only_one * 4.0).sum() if rank == 1 else out

    groups = ProcessGroups.build(Topology(world))
    toy = Toy()
    ddp = data_parallel(toy, groups)
    ddp(float(rank + 1)).backward()  # both: 1 and 2, mean 1.5; only_one: 0 and 4
    return toy.both.grad.tolist(), toy.only_one.grad.tolist(), toy.none.grad


def world2(rank, world):
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology

    groups = ProcessGroups.build(Topology(world))
    out = {"ref": train(build(TINY)), "dp": train(build(TINY, groups), groups)}
    out["dp_compiled"] = train(build(TINY, groups, compile="aot_eager"), groups)
    # --compile on one process, dropout on: the RNG stream inside the compiled region
    out["local_dropout"] = [train(build(dict(TINY, dropout=0.1), compile=c)) for c in (False, "aot_eager")]
    out["counts"] = {n: step_counts(build(dict(TINY, n_layer=n), groups), groups) for n in (1, 4)}
    out["counts_one_micro"] = step_counts(build(TINY, groups), groups, n_micro=1)[0]
    out["params"] = {n: sum(1 for _ in build(dict(TINY, n_layer=n)).model.parameters()) for n in (1, 4)}
    out["unused"] = _unused(rank, world)
    return out


TP_MODEL = dict(TINY, n_kv_group=1)  # one KV head, replicated on both TP ranks: partial gradients


def world4(rank, world):
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology

    groups = ProcessGroups.build(Topology(world, tp=2))
    pc = ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)
    out = {"ref": train(build(TP_MODEL)), "tp_dp": train(build(TP_MODEL, groups, pc), groups)}
    # ZeRO-1: the same run with the AdamW state sharded over dp, and its gathered (checkpoint) state
    from forge_dist.parallel.zero import consolidate, local_state

    states = []
    for zero in (False, True):
        engine = build(TP_MODEL, groups, pc, zero=zero)
        out[f"zero={zero}"] = train(engine, groups)
        consolidate(engine.optimizer)
        states.append(engine.full_optimizer_state() if groups.coord.dp == 0 else None)
        out[f"moments zero={zero}"] = sum(v.numel() for st in local_state(engine.optimizer).values()
                                          for k, v in st.items() if k == "exp_avg")
    out["zero states"] = states
    # --compile under TP x DP with dropout: RNG regions, TP collectives and DDP's hooks in the compiled model
    out["dropout"] = [train(build(dict(TP_MODEL, dropout=0.1), groups, pc, compile=c), groups)
                      for c in (False, "aot_eager")]
    out["counts"] = {n: step_counts(build(dict(TP_MODEL, n_layer=n), groups, pc), groups)[0] for n in (1, 3)}
    out["mpu"] = _mpu_groups(rank, world)
    return out


def _mpu_groups(rank, world):
    """DeepSpeedMPU.build at DP=4 (model-parallel group of one) and TP=2 x DP=2 (pipeline group of
    one): one new_group call per rank, its own, usable as a one-rank group."""
    from forge_dist.parallel import mpu as mpu_module
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology

    calls = []
    real = dist.new_group

    def counting(ranks=None, *args, **kwargs):
        calls.append(list(ranks))
        return real(ranks, *args, **kwargs)

    mpu_module.dist.new_group = counting
    try:
        out = {}
        for tp in (1, 2):
            groups = ProcessGroups.build(Topology(world, tp=tp))
            calls.clear()
            mpu = mpu_module.DeepSpeedMPU.build(groups)
            one = mpu.get_model_parallel_group() if tp == 1 else mpu.get_pipe_parallel_group()
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=one)
            out[tp] = (list(calls), dist.get_world_size(one), dist.get_rank(one), x.item())
        return out
    finally:
        mpu_module.dist.new_group = real


@pytest.fixture(scope="module")
def dp2():
    return spawn(world2, 2, timeout=420)


@pytest.fixture(scope="module")
def tp2_dp2():
    return spawn(world4, 4, timeout=480, return_all=True)


@pytest.mark.timeout(480)
def test_dp2_equals_one_process_with_twice_the_batch(dp2):
    (ref_loss, ref_norm, ref_w) = dp2["ref"]
    assert min(ref_norm) > CLIP  # clipping acts at every step
    for key in ("dp", "dp_compiled"):
        loss, norm, w = dp2[key]
        assert rel(loss, ref_loss) < 1e-6 and rel(norm, ref_norm) < 1e-5, key
        assert worst_weight(w, ref_w) < 1e-5, key  # AdamW magnifies fp32 noise near eps: see parity.py


@pytest.mark.timeout(480)
def test_dp_collectives_do_not_grow_with_the_parameters(dp2):
    """The gradient reduction is DDP's: one all-reduce per bucket (this model fits one), issued
    during the last micro-batch's backward, whatever the number of parameters."""
    assert dp2["params"][4] > 2 * dp2["params"][1]
    (small, early_small), (big, early_big) = dp2["counts"][1], dp2["counts"][4]
    assert small == big == {("dp", "grad_sync", "all_reduce"): 1}
    assert early_small == early_big == 0  # no_sync: nothing before the last micro-batch
    assert dp2["counts_one_micro"] == small  # accumulation adds no collective


@pytest.mark.timeout(480)
def test_unused_parameters_as_one_process(dp2):
    both, only_one, none = dp2["unused"]
    assert both == [1.5] * 3 and only_one == [2.0] * 3 and none is None


@pytest.mark.timeout(540)
def test_tp2_dp2_equals_one_process_with_clipping(tp2_dp2):
    ref_loss, ref_norm, ref_w = tp2_dp2[0]["ref"]
    assert min(ref_norm) > CLIP
    for rank_out in tp2_dp2:
        loss, norm, w = rank_out["tp_dp"]
        assert rel(loss, ref_loss) < 1e-5 and rel(norm, ref_norm) < 1e-5
        assert worst_weight(w, ref_w) < 1e-5


@pytest.mark.timeout(540)
def test_zero1_under_tp_dp_equals_replicated_adamw(tp2_dp2):
    """--zero_stage 1 (ZeroRedundancyOptimizer over dp) at TP=2 x DP=2: the same losses and weights
    as replicated AdamW (exactly: AdamW is elementwise), each replica holding a strict part of the
    moments, and the gathered optimizer state (what a checkpoint writes) equal to replicated AdamW's."""
    for rank_out in tp2_dp2:
        (loss, norm, w), (zloss, znorm, zw) = rank_out["zero=False"], rank_out["zero=True"]
        assert zloss == loss and znorm == norm and worst_weight(zw, w) == 0.0
        assert 0 < rank_out["moments zero=True"] < rank_out["moments zero=False"]
    for rank_out in tp2_dp2[:2]:  # data-parallel rank 0 (TP ranks 0 and 1) holds the gathered state
        plain, zero = rank_out["zero states"]
        assert plain["state"].keys() == zero["state"].keys() and plain["param_groups"] == zero["param_groups"]
        for i, entry in plain["state"].items():
            for k, v in entry.items():
                assert torch.equal(torch.as_tensor(zero["state"][i][k]), torch.as_tensor(v)), (i, k)


@pytest.mark.timeout(540)
def test_compile_under_tp_dp_with_dropout_equals_eager(tp2_dp2):
    for rank_out in tp2_dp2:
        (loss, norm, w), (c_loss, c_norm, c_w) = rank_out["dropout"]
        assert rel(c_loss, loss) < 1e-6 and rel(c_norm, norm) < 1e-5 and worst_weight(c_w, w) < 1e-6


@pytest.mark.timeout(480)
def test_compile_on_one_process_with_dropout_equals_eager(dp2):
    (loss, norm, w), (c_loss, c_norm, c_w) = dp2["local_dropout"]
    assert loss != dp2["ref"][0]  # dropout acted
    assert rel(c_loss, loss) < 1e-6 and rel(c_norm, norm) < 1e-5 and worst_weight(c_w, w) < 1e-6


@pytest.mark.timeout(540)
def test_tp_dp_collectives_do_not_grow_with_the_layers(tp2_dp2):
    one, three = tp2_dp2[0]["counts"][1], tp2_dp2[0]["counts"][3]
    grad_sync = {k: v for k, v in one.items() if k[1] == "grad_sync"}
    assert grad_sync == {k: v for k, v in three.items() if k[1] == "grad_sync"}
    assert grad_sync[("dp", "grad_sync", "all_reduce")] == 1  # DDP's bucket
    # the partial gradients (one bucket, on the TP group or its replica group of the same ranks) + the norm
    assert sum(n for (group, _, _), n in grad_sync.items() if group.startswith("tp")) == 2, grad_sync


@pytest.mark.timeout(540)
def test_mpu_creates_only_its_own_one_rank_group(tp2_dp2):
    for rank, rank_out in enumerate(tp2_dp2):
        for tp in (1, 2):
            calls, size, group_rank, reduced = rank_out["mpu"][tp]
            assert calls == [[rank]] and (size, group_rank, reduced) == (1, 0, float(rank)), (rank, tp)
