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


@pytest.fixture(scope="module")
def counts():
    return spawn(_counts, 2, timeout=150)


def per_layer(counts, variant, sp, phase):
    (c2, t2), (c1, t1) = counts[(variant, sp, 2)][phase], counts[(variant, sp, 1)][phase]
    return {k: c2.get(k, 0) - c1.get(k, 0) for k in set(c2) | set(c1) if c2.get(k, 0) - c1.get(k, 0)}, t2 - t1


@pytest.mark.timeout(200)
def test_megatron_count_per_layer(counts):
    for phase in ("forward", "backward"):
        assert per_layer(counts, "default", False, phase)[0] == {"all_reduce": 2}, phase
        assert per_layer(counts, "default", True, phase)[0] == {"all_gather": 2, "reduce_scatter": 2}, phase


@pytest.mark.timeout(200)
def test_sequence_parallel_moves_the_same_bytes_per_layer(counts):
    for phase in ("forward", "backward"):
        plain, seq = per_layer(counts, "default", False, phase)[1], per_layer(counts, "default", True, phase)[1]
        assert seq == pytest.approx(plain, rel=1e-12) and plain > 0, phase


@pytest.mark.timeout(200)
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


@pytest.mark.timeout(200)
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
