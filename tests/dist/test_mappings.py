"""The named autograd collectives, forward and backward, on TP groups of 2 (two of them in a
world of 4) and 4; ProcessGroups.build against the Topology; the collective counter. Exact
comparisons (sums of a few float32 values in a fixed order are tested with 1e-6 relative)."""
import pytest
import torch

from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor import mappings as M
from forge_dist.parallel.topology import KINDS, Topology
from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SHAPE = (2, 8, 12)  # (B, T, C): T and C divide over 4 ranks


def value(r, salt):
    """The tensor group member r contributes (every rank can compute every member's)."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 * salt + r))


def run_mapping(fn, x, grad):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def check(name, got, expected, failures):
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-6, atol=1e-6):
        failures.append(f"{name}: got {tuple(got.shape)}, expected {tuple(expected.shape)}, "
                        f"max diff {(got - expected).abs().max().item() if got.shape == expected.shape else 'n/a'}")


def mapping_cases(g):
    """name -> (fn, input, upstream grad, expected output, expected input grad, expected counts)."""
    r, n = g.rank, g.size
    mine, all_x = value(r, 1), [value(i, 1) for i in range(n)]
    gmine, all_g = value(r, 2), [value(i, 2) for i in range(n)]
    same, same_g = value(99, 3), value(99, 4)  # replicated tensors: equal on every member
    total_x, total_g = sum(all_x), sum(all_g)
    chunk = lambda t, d: t.chunk(n, dim=d)[r]  # noqa: E731
    gathered_g = lambda d: torch.cat([chunk_of(i, d) for i in range(n)], dim=d)  # noqa: E731

    def chunk_of(i, d):  # member i's upstream grad for a scattered output
        return value(i, 2).chunk(n, dim=d)[i]

    return {
        "copy_to_tp_region": (lambda x: M.copy_to_tp_region(x, g), mine, gmine, mine, total_g,
                              {("backward", "all_reduce"): 1}),
        "reduce_from_tp_region": (lambda x: M.reduce_from_tp_region(x, g), mine, gmine, total_x, gmine,
                                  {("forward", "all_reduce"): 1}),
        "scatter_to_tp_region": (lambda x: M.scatter_to_tp_region(x, g), same, chunk(gmine, -1), chunk(same, -1),
                                 gathered_g(-1), {("backward", "all_gather"): 1}),
        "gather_from_tp_region": (lambda x: M.gather_from_tp_region(x, g), chunk(mine, -1), same_g,
                                  torch.cat([chunk_of_x(i, n, -1) for i in range(n)], -1), chunk(same_g, -1),
                                  {("forward", "all_gather"): 1}),
        "scatter_to_sequence_region": (lambda x: M.scatter_to_sequence_region(x, g), same, chunk(gmine, 1),
                                       chunk(same, 1), gathered_g(1), {("backward", "all_gather"): 1}),
        "gather_from_sequence_region": (lambda x: M.gather_from_sequence_region(x, g), chunk(mine, 1), gmine,
                                        torch.cat([chunk_of_x(i, n, 1) for i in range(n)], 1), chunk(total_g, 1),
                                        {("forward", "all_gather"): 1, ("backward", "reduce_scatter"): 1}),
        "gather_from_sequence_region(replicated grad)": (
            lambda x: M.gather_from_sequence_region(x, g, grad_is_partial=False), chunk(mine, 1), same_g,
            torch.cat([chunk_of_x(i, n, 1) for i in range(n)], 1), chunk(same_g, 1),
            {("forward", "all_gather"): 1}),
        "reduce_scatter_to_sequence_region": (lambda x: M.reduce_scatter_to_sequence_region(x, g), mine,
                                              chunk(gmine, 1), chunk(total_x, 1), gathered_g(1),
                                              {("forward", "reduce_scatter"): 1, ("backward", "all_gather"): 1}),
    }


def chunk_of_x(i, n, d):
    return value(i, 1).chunk(n, dim=d)[i]


def _rank_fn(rank, world_size):
    failures = []
    for tp in (2, 4):
        topo = Topology(world_size, tp=tp)
        groups = ProcessGroups.build(topo)
        for kind in KINDS:  # membership agrees with the pure topology; the handle works
            g = groups.get(kind)
            if tuple(g.ranks) != topo.group_of(kind, rank):
                failures.append(f"tp={tp} {kind}: {g.ranks} != {topo.group_of(kind, rank)}")
            if g.size > 1:
                s = g.all_reduce(torch.tensor([float(rank)]))
                if s.item() != float(sum(g.ranks)):
                    failures.append(f"tp={tp} {kind}: all-reduce of ranks gave {s.item()}")
        for name, (fn, x, grad, y_exp, gx_exp, counts) in mapping_cases(groups.tp).items():
            with groups.count_collectives() as counter:
                y, gx = run_mapping(fn, x, grad)
            check(f"tp={tp} {name} forward", y, y_exp, failures)
            check(f"tp={tp} {name} backward", gx, gx_exp, failures)
            if counter.summary() != counts:
                failures.append(f"tp={tp} {name}: collectives {counter.summary()} != {counts}")
        T, n = SHAPE[1], tp
        shard = lambda t: t[:, : T // n]  # noqa: E731  (a sequence shard's shape)
        helpers = {  # (helper, sequence_parallel) -> (input, upstream grad, collectives)
            ("enter_tp_region", False): (value(0, 1), value(0, 2), {("backward", "all_reduce"): 1}),
            ("enter_tp_region", True): (shard(value(0, 1)), value(0, 2),
                                        {("forward", "all_gather"): 1, ("backward", "reduce_scatter"): 1}),
            ("exit_tp_region", False): (value(0, 1), value(0, 2), {("forward", "all_reduce"): 1}),
            ("exit_tp_region", True): (value(0, 1), shard(value(0, 2)),
                                       {("forward", "reduce_scatter"): 1, ("backward", "all_gather"): 1}),
        }
        for (name, sp), (x, grad, counts) in helpers.items():
            with groups.count_collectives() as counter:
                run_mapping(lambda t: getattr(M, name)(t, groups.tp, sp), x, grad)
            if counter.summary() != counts:
                failures.append(f"tp={tp} {name}(sequence_parallel={sp}): {counter.summary()} != {counts}")
        gathered = groups.tp.all_gather(torch.full((2, 3), float(groups.tp.rank)), dim=1)
        if gathered.tolist()[0] != [float(i) for i in range(tp) for _ in range(3)]:
            failures.append(f"tp={tp} all_gather along dim 1 out of order: {gathered.tolist()[0]}")
        replica = groups.tp_replicas(tp // 2)  # pairs of adjacent ranks
        if replica.ranks != topo.tp_replica_groups(tp // 2)[rank // 2]:
            failures.append(f"tp={tp} replica group {replica.ranks}")
    return failures


@pytest.mark.timeout(180)
def test_mappings_on_groups_of_2_and_4():
    per_rank = spawn(_rank_fn, 4, timeout=150, return_all=True)
    assert per_rank == [[]] * 4, "\n".join(f for fs in per_rank for f in fs)
