"""The collective flight recorder in a spawned world of 2: sequence numbers and call sites of the
recorded collectives, --debug_collectives naming both ranks when they take different branches, the
straggler fields, a diagnostics file, and SIGUSR2 to one rank making every rank write theirs. One
world runs every case."""
import os
import signal
import time

import pytest
import torch

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _cases(rank, world_size, out_dir):
    from forge_dist.parallel.flight import CollectiveMismatch
    from forge_dist.testing.runs import parallel_context
    from forge_dist.train.diagnostics import Diagnostics, straggler_fields

    ctx = parallel_context(rank, world_size, tp=2)
    tp, recorder = ctx.groups.tp, ctx.recorder
    out = {}
    tp.all_reduce(torch.ones(3))
    tp.all_gather(torch.ones(2, 4), dim=0)
    ctx.barrier()
    ring, current, seq = recorder.snapshot()
    out["ring"] = [(e.seq, e.op, e.group, e.shapes, e.dtype, e.site) for e in ring]
    out["current"], out["seq"] = current, seq

    recorder.debug = True
    tp.all_reduce(torch.ones(2))  # the same on both ranks: passes
    try:
        if rank == 0:  # "one rank took another branch"
            tp.all_reduce(torch.ones(4))
        else:
            tp.all_gather(torch.ones(4), dim=0)
        out["mismatch"] = None
    except CollectiveMismatch as e:
        out["mismatch"] = str(e)
    recorder.debug = False

    out["straggler"] = straggler_fields(ctx, [0.5, 2.0][rank])
    diag = Diagnostics(ctx, out_dir, timeout_s=60)
    diag.at_step(7)
    path = diag.dump("test dump")
    with open(path) as fh:
        out["dump"] = fh.read()
    ctx.barrier()

    # SIGUSR2 to rank 0 alone: it dumps, and rank 1 dumps on its request (through the store)
    requested = os.path.join(out_dir, "requested")
    watchdog = Diagnostics(ctx, requested, timeout_s=4).start()  # heartbeat every 0.5 s
    ctx.barrier()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(3)
    ctx.barrier()
    watchdog.close()
    with open(os.path.join(requested, "diagnostics", f"rank_{rank}.txt")) as fh:
        out["requested"] = fh.readline().strip()
    return out


@pytest.mark.timeout(120)
def test_recorder_debug_mismatch_straggler_and_dump(tmp_path):
    results = spawn(_cases, 2, str(tmp_path), timeout=100, return_all=True)
    for rank, r in enumerate(results):
        ops = [(e[1], e[2], e[3], e[4]) for e in r["ring"]]
        assert ops == [("all_reduce", "tp(0,1)", ((3,),), "float32"), ("all_gather", "tp(0,1)", ((2, 4),), "float32"),
                       ("barrier", "world(0,1)", (), "object")]
        assert [e[0] for e in r["ring"]] == [1, 2, 1] and r["current"] is None
        assert r["seq"] == {"tp(0,1)": 2, "world(0,1)": 1}
        site = r["ring"][0][5]
        assert site.startswith("tests/dist/test_flight.py:") or "test_flight.py:" in site, site
        msg = r["mismatch"]
        assert msg is not None and "group tp(0,1)" in msg
        assert "rank 0: all_reduce float32[[4]] (#4)" in msg and "rank 1: all_gather float32[[4]] (#4)" in msg
        assert msg.count("test_flight.py:") == 2  # both call sites
        assert r["straggler"] == {"compute_s": [0.5, 2.0][rank], "straggler_rank": 1, "straggler_compute_s": 2.0,
                                  "compute_s_median": 2.0}
        dump = r["dump"]
        assert dump.startswith("forge_dist diagnostics: test dump\n")
        assert f"rank: {rank} of 2\n" in dump and "step: 7\n" in dump and "in flight: none" in dump
        assert "barrier" in dump and "python stacks (all threads):" in dump and "_cases" in dump
    assert sorted(os.listdir(tmp_path / "diagnostics")) == ["rank_0.txt", "rank_1.txt"]
    assert [r["requested"] for r in results] == ["forge_dist diagnostics: SIGUSR2 received",
                                                 "forge_dist diagnostics: diagnostics requested by another rank"]
