"""The hang verdicts of the diagnostics watchdog, from heartbeats in an in-memory store: a member
with a stale heartbeat is lost, one waiting in another collective is deadlocked, one computing is
slow, one in the same collective (or past it) arrived; the first named culprit is kept for all."""
import json
import re
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


class _CountingStore:
    """The store, logging each request as (method, keys it reads or writes)."""

    def __init__(self, store):
        self.store, self.log = store, []

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def logged(*args):
            self.log.append((name, list(args[0]) if name in ("check", "multi_get") else [args[0]]))
            return method(*args)
        return logged


def _survivors(tmp_path, world, store):
    """Diagnostics of ranks 0..world-2 whose world all_reduce failed; rank world-1 died 30 s ago."""
    group, ranks = f"world({','.join(map(str, range(world)))})", tuple(range(world))
    out = []
    for rank in range(world - 1):
        diag = Diagnostics(RunContext(rank=rank, world_size=world), str(tmp_path), timeout_s=4)  # beat 0.5 s
        diag.store, diag.step = store, 6
        diag.recorder.failed = Entry(34, "all_reduce_max", group, ranks, ((1,),), "float32", "here", time.time(),
                                     error="Connection reset by peer")
        out.append(diag)
    for rank in range(world):
        _beat(out[0], rank, age=30 if rank == world - 1 else 0, seq={group: 34},
              current={"group": group, "seq": 34, "op": "all_reduce_max", "site": "here"})
    return out


def test_one_judge_per_failure_the_others_read_its_verdict(tmp_path):
    """64 survivors of a 65-rank world name the lost rank with O(N) store reads in all (one judge
    reads the 64 heartbeats in one batch, the rest read its verdict), not N per survivor (N^2)."""
    import threading

    world = 65
    store = _CountingStore(dist.PrefixStore("test/", dist.HashStore()))
    survivors = _survivors(tmp_path, world, store)
    store.log.clear()
    lines = [None] * len(survivors)

    def report(i):
        lines[i] = survivors[i].report_failure(RuntimeError("Connection reset by peer"))

    threads = [threading.Thread(target=report, args=(i,)) for i in range(len(survivors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    group = f"world({','.join(map(str, range(world)))})"
    verdicts = set()
    for rank, line in enumerate(lines):
        head, tail = f"rank {rank}: all_reduce_max on {group} #34 (step 6) failed: ", f"; diagnostics in {tmp_path}"
        assert line.startswith(head) and line.endswith(f"{tmp_path / 'diagnostics' / f'rank_{rank}.txt'}"), line
        verdicts.add(line[len(head):line.index(tail)])
    assert len(verdicts) == 1, verdicts  # the same verdict on every survivor
    assert re.fullmatch(rf"rank {world - 1} on node{world - 1} did not arrive \(heartbeat: none for 3[01] s; "
                        r"process gone, node down or frozen\)", verdicts.pop())
    # every survivor reading every heartbeat: 64 x 64 x 2 = 8192 heartbeat keys read
    heartbeat_reads = sum(k.startswith("hb/") for name, keys in store.log if name != "set" for k in keys)
    polls = sum(name == "check" and keys[0].endswith("/done") for name, keys in store.log)  # bounded by time
    assert heartbeat_reads <= 4 * (world - 1), heartbeat_reads  # one batched read by the judge: 128
    assert len(store.log) - polls <= 6 * (world - 1), (len(store.log), polls)


def test_a_survivor_whose_judge_died_judges_alone(tmp_path):
    store = dist.PrefixStore("test/", dist.HashStore())
    diag = _survivors(tmp_path, 3, store)[1]
    from forge_dist.train.verdict import failure_key

    store.add(failure_key(diag.recorder.failed) + "/claim", 1)  # rank 0 claimed the failure, then died
    diag.verdict_wait_s = 0.2
    line = diag.report_failure(RuntimeError("Connection reset by peer"))
    assert re.match(r"rank 1: all_reduce_max on world\(0,1,2\) #34 \(step 6\) failed: rank 2 on node2 did not "
                    r"arrive \(heartbeat: none for 3[01] s", line), line


def test_a_hung_collective_is_judged_by_one_member_and_the_lease_passes_on(tmp_path, capsys):
    """64 members of a 65-rank world wait past --collective_timeout_s for rank 64, which computes:
    at each poll one member reads the heartbeats and the others its verdict (a warning each,
    once); when that judge's record goes stale, the next member to look takes the lease over."""
    world = 65
    store = _CountingStore(dist.PrefixStore("test/", dist.HashStore()))
    members = _survivors(tmp_path, world, store)
    group = members[0].recorder.failed.group
    _beat(members[0], world - 1, seq={group: 33})  # alive, computing, not yet at #34
    for diag in members:
        diag.recorder.failed, diag.recorder.current = None, Entry(
            34, "all_reduce_max", group, tuple(range(world)), ((1,),), "float32", "here", time.time() - 60)
    store.log.clear()
    for _ in range(3):  # three polls of every watchdog
        for diag in members:
            diag._check_hang()
    heartbeat_reads = sum(k.startswith("hb/") for name, keys in store.log if name != "set" for k in keys)
    assert heartbeat_reads == 3 * 2 * (world - 1), heartbeat_reads  # rank 0 judged: 3 batched reads
    assert len(store.log) <= 3 * 3 * (world - 1), len(store.log)  # every member reading: 3 x 64 x 128 keys
    for rank in range(world - 1):
        first = (tmp_path / "diagnostics" / f"rank_{rank}.txt").read_text().splitlines()[0]
        assert first == (f"forge_dist diagnostics: slow collective: rank {world - 1} on node{world - 1} did not "
                         f"arrive: it is not in a collective, at step 3"), first
    assert capsys.readouterr().err.count("still waiting") == world - 1  # once per member

    from forge_dist.train.verdict import failure_key

    key = failure_key(members[0].recorder.current, "hung") + "/latest"
    store.set(key, json.dumps({**json.loads(store.get(key)), "time": time.time() - 60}))  # rank 0 is gone
    store.log.clear()
    members[5]._check_hang()
    assert json.loads(store.get(key))["rank"] == 5
    assert sum(name == "multi_get" for name, _ in store.log) == 1  # rank 5 judged
