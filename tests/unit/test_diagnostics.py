"""The hang verdicts of the diagnostics watchdog, from heartbeats in an in-memory store: a member
with a stale heartbeat is lost, one waiting in another collective is deadlocked, one computing is
slow, one in the same collective (or past it) arrived; the first named culprit is kept for all."""
import json
import time

import torch.distributed as dist

from forge_dist.parallel.flight import Entry
from forge_dist.train.context import RunContext
from forge_dist.train.diagnostics import Diagnostics


def _diagnostics(tmp_path):
    diag = Diagnostics(RunContext(rank=0, world_size=5), str(tmp_path), timeout_s=8)
    diag.store = dist.PrefixStore("test/", dist.HashStore())
    return diag


def _beat(diag, rank, age=0.0, current=None, seq=None, step=3, **extra):
    diag.store.set(f"hb/{rank}", json.dumps({"time": time.time() - age, "step": step, "host": f"node{rank}",
                                             "pid": 100 + rank, "seq": seq or {}, **extra,
                                             **({"current": current} if current else {})}))


def test_verdicts_for_each_kind_of_member(tmp_path):
    diag = _diagnostics(tmp_path)  # heartbeat every 1 s: stale after 4 s
    entry = Entry(7, "all_reduce", "world(0,1,2,3,4)", (0, 1, 2, 3, 4), ((4,),), "float32", "here", time.time())
    _beat(diag, 1, age=30)  # frozen or gone
    _beat(diag, 2, current={"group": "tp(2,3)", "seq": 12, "op": "all_gather", "site": "model.py:9 in forward"})
    _beat(diag, 3, seq={"world(0,1,2,3,4)": 6})  # computing, not yet at #7
    _beat(diag, 4, current={"group": "world(0,1,2,3,4)", "seq": 7, "op": "all_reduce", "site": "here"})
    fatal, slow = diag.missing(entry)
    assert fatal == ["rank 1 on node1 did not arrive (heartbeat: none for 30 s; process gone, node down or frozen)",
                     "rank 2 on node2 did not arrive: it is waiting in all_gather on tp(2,3) #12 at model.py:9 in forward"]
    assert slow == ["rank 3 on node3 did not arrive: it is not in a collective, at step 3"]


def test_a_rank_that_left_is_not_blamed_and_the_first_culprit_is_kept(tmp_path):
    diag = _diagnostics(tmp_path)
    entry = Entry(2, "all_reduce", "dp(0,2)", (0, 2), ((4,),), "float32", "here", time.time())
    _beat(diag, 2, age=30, exiting=True)  # rank 2 left on purpose after losing its own peer
    assert diag.missing(entry) == ([], [])
    first = ["rank 3 did not arrive (heartbeat: none for 9 s; process gone, node down or frozen)"]
    assert diag._blame(first) == first
    assert diag._blame(["rank 2 did not arrive"]) == first  # a later reporter names the same rank
    assert diag._blame([]) == first


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def test_a_failure_outside_the_recorder_is_read_from_the_exception():
    """foreign_collectives: gloo's error inside a torch.distributed call (here a stand-in compiled
    under torch's file name) gives the call, the world (group=None) and the caller; the same text
    raised elsewhere, or another error, is not a transport failure."""
    from forge_dist.train.foreign_collectives import foreign_failure

    ns: dict = {}
    exec(compile("def all_reduce(tensor, group=None):\n"
                 "    raise RuntimeError('[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer')\n",
                 "/site/torch/distributed/distributed_c10d.py", "exec"), ns)

    def allreduce_bucket():
        ns["all_reduce"](None)

    entry = foreign_failure(_raised(allreduce_bucket), 2)
    assert (entry.op, entry.group, entry.ranks, entry.seq) == ("all_reduce", "world(0,1)", (0, 1), 0)
    assert entry.site.endswith("test_diagnostics.py:" + str(allreduce_bucket.__code__.co_firstlineno + 1)
                               + " in allreduce_bucket") and "Connection reset by peer" in entry.error

    def elsewhere():
        raise RuntimeError("Connection reset by peer")  # e.g. a download, not a collective

    assert foreign_failure(_raised(elsewhere), 2) is None
    assert foreign_failure(ValueError("bad"), 2) is None
