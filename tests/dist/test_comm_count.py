"""Communication accounting at TP=2: the default block does exactly 2 all-reduces forward and 2
backward per layer (Megatron's count); with sequence parallelism they become 2 all-gathers and 2
reduce-scatters each way, moving the same bytes. Per-layer numbers are the difference between a
2-layer and a 1-layer model; the rest is the embedding, the LM head and the loss."""
import pytest
import torch

from forge_dist import ModelConfig
from forge_dist.config.parallel import ParallelConfig
from forge_dist.model.gpt import GPT
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.parallelize import parallelize
from forge_dist.parallel.tensor.metadata import tp_grad_sync
from forge_dist.parallel.topology import Topology
from forge_dist.testing.spawn import spawn
from forge_dist.testing.tp_cases import BASE, CORE_CASES

pytestmark = [pytest.mark.dist, pytest.mark.slow]

VARIANTS = ("default", "mqa_kv1", "qk_norm_scale", "flash_lobo_per_head", "parallel_mlp", "bias", "untied")
PHASES = ("forward", "backward", "grad_sync")


def by_kind(counter):
    kinds = ("all_reduce", "all_gather", "reduce_scatter")
    return {k: counter.count(kind=k) for k in kinds if counter.count(kind=k)}


def _counts(rank, world_size):
    groups = ProcessGroups.build(Topology(world_size, tp=2))
    out = {}
    for variant in VARIANTS:
        for sp in (False, True):
            for n_layer in (1, 2):
                torch.manual_seed(0)
                cfg = ModelConfig(**{**BASE, **CORE_CASES[variant], "n_layer": n_layer})
                model = parallelize(GPT(cfg), groups, ParallelConfig(tensor_parallel_size=2, sequence_parallel=sp))
                x = torch.randint(0, 64, (2, 16))
                counters = {}
                with groups.count_collectives() as counters["forward"]:
                    loss = model(x, x)[1]
                with groups.count_collectives() as counters["backward"]:
                    loss.backward()
                with groups.count_collectives() as counters["grad_sync"]:
                    tp_grad_sync(model, groups)
                out[(variant, sp, n_layer)] = {phase: (by_kind(c), c.traffic()) for phase, c in counters.items()}
    return out


def _all_counts(rank, world_size):
    """One spawned world for both tables (spawning costs seconds; a tiny model milliseconds)."""
    return {"core": _counts(rank, world_size), "variants": _variant_counts(rank, world_size)}


@pytest.fixture(scope="module")
def world():
    return spawn(_all_counts, 2, timeout=280)


@pytest.fixture(scope="module")
def counts(world):
    return world["core"]


def per_layer(counts, variant, sp, phase):
    (c2, t2), (c1, t1) = counts[(variant, sp, 2)][phase], counts[(variant, sp, 1)][phase]
    return {k: c2.get(k, 0) - c1.get(k, 0) for k in set(c2) | set(c1) if c2.get(k, 0) - c1.get(k, 0)}, t2 - t1


@pytest.mark.timeout(300)
def test_megatron_count_per_layer(counts):
    for phase in ("forward", "backward"):
        assert per_layer(counts, "default", False, phase)[0] == {"all_reduce": 2}, phase
        assert per_layer(counts, "default", True, phase)[0] == {"all_gather": 2, "reduce_scatter": 2}, phase


@pytest.mark.timeout(300)
def test_sequence_parallel_moves_the_same_bytes_per_layer(counts):
    for phase in ("forward", "backward"):
        plain, seq = per_layer(counts, "default", False, phase)[1], per_layer(counts, "default", True, phase)[1]
        assert seq == pytest.approx(plain, rel=1e-12) and plain > 0, phase


@pytest.mark.timeout(300)
def test_whole_model_counts(counts):
    L = 2
    assert counts[("default", False, L)]["forward"][0] == {"all_reduce": 2 * L + 4}  # + embedding + 3 in the loss
    assert counts[("default", False, L)]["backward"][0] == {"all_reduce": 2 * L + 1}  # + LM head input
    assert counts[("default", False, L)]["grad_sync"][0] == {}
    assert counts[("default", True, L)]["forward"][0] == {"all_reduce": 4, "all_gather": 2 * L + 1,
                                                          "reduce_scatter": 2 * L}  # + gather after ln_f
    assert counts[("default", True, L)]["backward"][0] == {"all_reduce": 1, "all_gather": 2 * L + 1,
                                                           "reduce_scatter": 2 * L}  # + scatter at the embedding
    assert counts[("default", True, L)]["grad_sync"][0] == {"all_reduce": 1}  # norm gains: one bucket


@pytest.mark.timeout(300)
def test_variants_add_only_gradient_syncs(counts):
    for variant in VARIANTS:
        for sp in (False, True):
            for phase in ("forward", "backward"):
                assert per_layer(counts, variant, sp, phase)[0] == per_layer(counts, "default", sp, phase)[0], (
                    variant, sp, phase)
    assert counts[("mqa_kv1", False, 2)]["grad_sync"][0] == {"all_reduce": 1}  # replicated KV head
    assert counts[("qk_norm_scale", False, 2)]["grad_sync"][0] == {"all_reduce": 1}  # per-layer scalar
    assert counts[("flash_lobo_per_head", False, 2)]["grad_sync"][0] == {}  # sharded with its heads
    print("\n| variant | sequence parallel | per layer fwd | per layer bwd | whole model fwd | bwd | grad sync |")
    for variant in VARIANTS:
        for sp in (False, True):
            c = counts[(variant, sp, 2)]
            cells = [per_layer(counts, variant, sp, "forward")[0], per_layer(counts, variant, sp, "backward")[0]]
            cells += [c[p][0] for p in PHASES]
            print(f"| {variant} | {sp} | " + " | ".join(str(x) for x in cells) + " |")


# --- every variant family: collectives per layer (2-layer minus 1-layer model), TP=2 ------------
# (variant case, sequence parallel) -> ({forward kind: count}, {backward kind: count}) per layer
PER_LAYER = {
    ("mlp=dual_path", False): ({"AR": 2}, {"AR": 2}),  # both down projections summed, reduced once
    ("mlp=swiglu", False): ({"AR": 2}, {"AR": 2}),
    ("mlp=kan", False): ({"AR": 1}, {"AR": 1}),  # the KAN runs whole on the residual stream: no region
    ("attention=identity", False): ({"AR": 1}, {"AR": 1}),
    ("attention=mla", False): ({"AR": 2}, {"AR": 2}),
    ("attention=linear", False): ({"AR": 2}, {"AR": 2}),
    ("attention=infinite", False): ({"AR": 2}, {"AR": 2}),  # the heads' partial sum reduced before c_proj
    ("attention=infinite", True): ({"AR": 1, "AG": 2, "RS": 1}, {"AG": 2, "RS": 2}),
    ("attention=iqa", False): ({"AR": 3}, {"AR": 2}),  # n_cproj=2: the sum reduced at each projection
    ("attention=ssm", False): ({"AR": 3}, {"AR": 3}),  # x_proj: all-reduce forward and backward
    ("attention=ssm", True): ({"AR": 1, "AG": 2, "RS": 2}, {"AR": 1, "AG": 2, "RS": 2}),
    ("attention=co4", False): ({"AR": 2, "AG": 1}, {"AR": 2, "RS": 1}),  # q_proj's input channels gathered
    ("linear=kan", False): ({"AG": 2}, {"AR": 2}),  # whole KANs: row inputs gathered, nothing summed
    ("option=quantize_mlp_act", False): ({"AR": 6}, {"AR": 2}),  # 2 hidden points x (max, min)
    ("quantize_attn_act", False): ({"AR": 14}, {"AR": 2}),  # 6 head points x (max, min)
    ("quantize_attn_act", True): ({"AR": 14, "AG": 2, "RS": 2}, {"AG": 2, "RS": 2}),  # + output point
}
# configurations counted here that are no parity case (every attention point on at once: see
# tp_cases.ATTN_POINTS_A for why parity runs them in two sets)
EXTRA_CONFIGS = {"quantize_attn_act": {**BASE, "quantize_attn_act": True}}


def _variant_counts(rank, world_size):
    from forge_dist.testing.parity import comm_counts
    from forge_dist.testing.tp_cases import all_cases

    groups = ProcessGroups.build(Topology(world_size, tp=2))
    cases = {**dict(all_cases()), **EXTRA_CONFIGS}
    out = {}
    for name, sp in list(PER_LAYER) + [("option=moe", False), ("option=moe", True)]:
        for n_layer in (1, 2):
            pc = ParallelConfig(tensor_parallel_size=2, sequence_parallel=sp)
            out[(name, sp, n_layer)] = comm_counts({**cases[name], "n_layer": n_layer}, groups, pc)
    return out


@pytest.mark.timeout(300)
def test_collectives_per_layer_of_every_variant_family(world):
    counts = world["variants"]
    for (name, sp), expected in PER_LAYER.items():
        one, two = counts[(name, sp, 1)], counts[(name, sp, 2)]
        got = tuple({k: two[p].get(k, 0) - one[p].get(k, 0) for k in set(two[p]) | set(one[p])
                     if two[p].get(k, 0) - one[p].get(k, 0)} for p in ("forward", "backward"))
        assert got == expected, (name, sp, got)
    # MoE in layer 0 (4 experts, each an MLP sharded inside: one all-reduce each way per expert),
    # a plain MLP in layer 1; under SP the MoE gathers the whole sequence once and splits it back
    assert counts[("option=moe", False, 2)]["forward"] == {"AR": 1 + 3 + 2 + 4 + 1}
    assert counts[("option=moe", False, 2)]["backward"] == {"AR": 1 + 2 + 4 + 1}
    assert counts[("option=moe", True, 2)]["forward"] == {"AR": 1 + 3 + 4, "AG": 2 + 1 + 1 + 1, "RS": 2 + 1}
