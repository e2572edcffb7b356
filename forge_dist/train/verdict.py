"""One verdict per failed or hung collective, shared through the rendezvous store.

When a collective on a large group fails, every survivor asks the same question: which member's
heartbeat stopped? Each reading every member's heartbeat is N reads per survivor, about N^2
requests on the one store at the moment the job is failing (a million at 1,000 ranks, every
half second). Here the first survivor to claim the failure's key (``store.add``) is its judge: it
reads the members' heartbeats in one batched request (``check`` + ``multi_get``) per attempt and
publishes the verdict under that key. Every other survivor polls that one key (every 0.5 s while
the judge waits for a heartbeat to go stale) and takes the verdict: a bounded number of small
requests each, independent of the world size; the judge's O(N) read is paid once per attempt. A survivor whose judge died too before publishing (the wait is bounded)
judges for itself, as every survivor did before.

A hung collective is judged again at every poll of the watchdog, so there the judge holds a lease:
its latest verdict, with its time, under the collective's key. The other members read that record
and use it while it is fresh; when it is stale (the judge left or died) one of them takes it over.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Callable, Dict, Iterable, Optional

POLL_S = 0.5


def read_heartbeats(store, ranks: Iterable[int]) -> Dict[int, Optional[dict]]:
    """The heartbeats ``hb/<r>`` of ``ranks`` (None for a rank that never beat): one ``check`` and
    one ``multi_get`` when every rank has beaten (``multi_get`` would block on a missing key)."""
    ranks = list(ranks)
    out: Dict[int, Optional[dict]] = dict.fromkeys(ranks)
    if not ranks:
        return out
    present = ranks if store.check([f"hb/{r}" for r in ranks]) else [r for r in ranks if store.check([f"hb/{r}"])]
    if present:
        values = store.multi_get([f"hb/{r}" for r in present])
        out.update({r: json.loads(v) for r, v in zip(present, values)})
    return out


def failure_key(entry, kind: str = "failed") -> str:
    """The store key every member of the same collective derives alike (``kind``: failed, hung):
    its group with the ranks, sequence number and op, hashed to a short fixed length."""
    return f"verdict/{kind}/" + hashlib.sha1(f"{entry.group}#{entry.seq}:{entry.op}".encode()).hexdigest()[:20]


def shared_verdict(store, key: str, judge: Callable[[], list], wait_s: float, poll_s: float = POLL_S) -> Optional[list]:
    """``judge()`` when this rank is the first to claim ``key`` (then published under it), else
    the published verdict, polled for up to ``wait_s``; None when none came (the judge died too)."""
    if store.add(f"{key}/claim", 1) == 1:
        verdict = judge()
        store.set(f"{key}/done", json.dumps(verdict))
        return verdict
    end = time.time() + wait_s
    while True:
        if store.check([f"{key}/done"]):
            return json.loads(store.get(f"{key}/done"))
        if time.time() >= end:
            return None
        time.sleep(min(poll_s, max(0.0, end - time.time())))


def leased_verdict(store, key: str, me: int, judge: Callable[[], list], max_age_s: float) -> Optional[list]:
    """For a wait that goes on (a hung collective): a verdict of ``judge()`` at most ``max_age_s``
    old. The member holding ``key``'s lease judges at each call and publishes; the others read its
    latest record (one request), and take the lease over when the record is stale. None while the
    judge's first verdict is not out yet."""
    record = f"{key}/latest"
    now = time.time()
    claim = json.dumps({"rank": me, "time": now, "verdict": None})
    current = store.compare_set(record, "", claim).decode()  # creates the record (the lease) when absent
    latest = json.loads(current)
    if latest["rank"] != me and now - latest["time"] > max_age_s:  # the judge is gone: take over
        latest = json.loads(store.compare_set(record, current, claim))
    if latest["rank"] != me:
        return latest["verdict"] if now - latest["time"] <= max_age_s else None
    verdict = judge()
    store.set(record, json.dumps({"rank": me, "time": time.time(), "verdict": verdict}))
    return verdict
