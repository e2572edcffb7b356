"""The spawn helper: results come back, a failing rank's traceback is re-raised with its rank,
and a hung world is killed at the timeout with the stacks it was stuck in."""
import time

import pytest
import torch
import torch.distributed as dist

from forge_dist.testing.spawn import RankError, SpawnTimeout, spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _sum_ranks(rank, world_size, offset):
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item(), "world": dist.get_world_size()}


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 waits for a peer that is gone


def _hang_on_rank_1(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


@pytest.mark.timeout(120)
def test_results_from_every_rank():
    assert spawn(_sum_ranks, 2, 10, return_all=True) == [
        {"rank": 0, "sum": 21, "world": 2}, {"rank": 1, "sum": 21, "world": 2}]


@pytest.mark.timeout(120)
def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(RankError, match=r"rank 1 of 2 failed") as info:
        spawn(_fail_on_rank_1, 2, timeout=60)
    assert info.value.rank == 1
    assert "ValueError: deliberate failure on rank one" in str(info.value)
    assert "_fail_on_rank_1" in str(info.value)  # the child's own frames


@pytest.mark.timeout(120)
def test_hung_world_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(SpawnTimeout, match=r"ranks still running: \[0, 1\]") as info:  # 0 waits in the final barrier
        spawn(_hang_on_rank_1, 2, timeout=20)  # room for slow starts on a loaded machine
    assert time.monotonic() - start < 50
    assert "rank 1 was stuck in" in str(info.value) and "_hang_on_rank_1" in str(info.value)
