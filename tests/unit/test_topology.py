"""Topology: rank <-> coordinates and group lists, checked without processes up to 4096 ranks;
and the process-free ProcessGroups (single, layout)."""
import pytest
import torch

from forge_dist.errors import ConfigError
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.topology import KINDS, Topology


def test_megatron_order_small():
    t = Topology(16, tp=2, pp=2)  # dp = 4
    assert t.dp == 4
    assert t.groups("tp") == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]
    assert t.groups("dp") == [(0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)]
    assert t.groups("pp")[:3] == [(0, 8), (1, 9), (2, 10)]
    assert t.groups("embedding")[:2] == [(0, 8), (1, 9)]
    assert t.groups("mp") == [(0, 1, 8, 9), (2, 3, 10, 11), (4, 5, 12, 13), (6, 7, 14, 15)]
    c = t.coord(11)
    assert (c.pp, c.dp, c.tp) == (1, 1, 1) and t.rank(1, 1, 1) == 11


def test_expert_parallel_is_carved_out_of_data_parallel():
    t = Topology(16, tp=2, pp=1, ep=4)  # dp = 8, edp = 2
    assert t.group_of("ep", 0) == (0, 2, 4, 6) and t.group_of("ep", 9) == (9, 11, 13, 15)  # adjacent replicas
    assert t.group_of("expert_dp", 0) == (0, 8) and t.group_of("expert_dp", 3) == (3, 11)  # stride ep
    for rank in range(16):
        dp_group = set(t.group_of("dp", rank))
        assert set(t.group_of("ep", rank)) <= dp_group
        assert set(t.group_of("expert_dp", rank)) <= dp_group
        assert len(t.group_of("ep", rank)) * len(t.group_of("expert_dp", rank)) == len(dp_group)
        c = t.coord(rank)
        assert c.dp == c.edp * t.ep + c.ep


def test_embedding_groups():
    t = Topology(4, tp=2)  # one stage: the rank itself holds wte and lm_head
    assert t.groups("embedding") == [(0,), (1,), (2,), (3,)]
    t = Topology(6, tp=2, pp=3)  # middle stage ranks 2, 3 hold no embedding
    assert t.groups("embedding") == [(0, 4), (1, 5)]
    assert t.group_of("embedding", 2) == () and t.group_of("embedding", 5) == (1, 5)


@pytest.mark.parametrize("world,tp,pp,ep", [(1, 1, 1, 1), (8, 2, 2, 2), (1024, 8, 4, 4), (4096, 8, 8, 8),
                                            (1536, 4, 3, 2)])
def test_every_kind_partitions_the_world(world, tp, pp, ep):
    t = Topology(world, tp=tp, pp=pp, ep=ep)
    sizes = {"tp": tp, "dp": t.dp, "pp": pp, "ep": ep, "expert_dp": t.dp // ep, "mp": tp * pp,
             "embedding": min(2, pp)}
    ends = {r for r in range(world) if t.coord(r).pp in (0, pp - 1)}  # the stages holding embeddings
    for kind in KINDS:
        groups = t.groups(kind)
        members = [r for g in groups for r in g]
        assert sorted(members) == sorted(ends if kind == "embedding" else range(world)), kind
        assert all(len(g) == sizes[kind] and list(g) == sorted(g) for g in groups), kind
        owner = {r: g for g in groups for r in g}
        for rank in range(0, world, max(1, world // 97)):  # group_of agrees with the lists
            assert t.group_of(kind, rank) == owner.get(rank, ()), (kind, rank)
    for rank in range(world):
        c = t.coord(rank)
        assert t.rank(c.pp, c.dp, c.tp) == rank


def test_tp_groups_stay_inside_a_node():
    gpus_per_node = 8
    t = Topology(1024, tp=8, pp=4)
    for g in t.groups("tp"):
        assert len({r // gpus_per_node for r in g}) == 1


def test_tp_replica_groups():
    t = Topology(8, tp=4)
    assert t.tp_replica_groups(4) == [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,)]
    assert t.tp_replica_groups(2) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert t.tp_replica_groups(1) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    with pytest.raises(ValueError, match="3 shards"):
        t.tp_replica_groups(3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=6, tp=4), r"world size 6 is not a product of tensor_parallel_size=4 x pipeline_parallel_size=1"),
    (dict(world_size=8, tp=2, pp=2), None),
    (dict(world_size=8, tp=2, ep=3), r"expert_parallel_size=3 must divide the data-parallel size 4"),
    (dict(world_size=8, tp=0), r"tensor_parallel_size=0 must be a positive integer"),
    (dict(world_size=8, tp=2, dp=2), r"tp=2 x pp=1 x dp=2 = 4 != world size 8"),
])
def test_bad_sizes_name_the_numbers(kwargs, message):
    if message is None:
        Topology(**kwargs)
        return
    with pytest.raises(ConfigError, match=message):
        Topology(**kwargs)


def test_coordinates_out_of_range():
    t = Topology(4, tp=2)
    with pytest.raises(ValueError, match="rank 4 outside"):
        t.coord(4)
    with pytest.raises(ValueError, match="unknown group kind"):
        t.groups("sp")


def test_single_process_groups_run_without_torch_distributed():
    groups = ProcessGroups.single()
    x = torch.randn(3, 4)
    with groups.count_collectives() as counter:
        assert groups.tp.all_reduce(x) is x
        assert groups.tp.all_gather(x, dim=1) is x
        assert groups.tp.reduce_scatter(x, dim=0) is x
        assert groups.tp.split(x, dim=1) is x
    assert counter.count() == 0
    assert all(groups.get(k).size == 1 for k in KINDS)


def test_layout_has_membership_but_refuses_collectives():
    t = Topology(8, tp=2, pp=2)
    g = ProcessGroups.layout(t, rank=5)
    assert g.tp.ranks == (4, 5) and g.tp.rank == 1
    assert g.dp.ranks == (5, 7) and g.pp.ranks == (1, 5)
    assert g.tp_replicas(1).ranks == (4, 5)
    with pytest.raises(RuntimeError, match="no process group"):
        g.tp.all_reduce(torch.ones(2))
