"""Hang and lost-rank diagnosis: a watchdog thread per rank, heartbeats, one file per rank.

A hung multi-node job usually shows nothing: every rank waits inside a collective for one that
will never come. Here each rank runs a small daemon thread that

  * publishes a heartbeat every ``heartbeat_s`` seconds to the rendezvous store (the c10d store
    every rank already shares): time, step, the collective in flight, its sequence number;
  * watches the collective in flight (forge_dist.parallel.flight): when it has waited longer than
    ``--collective_timeout_s``, the heartbeats of the group's members are read (by one waiting
    member, which shares its verdict through the store: verdict.py) and it names the rank
    that did not arrive: no heartbeat for a while (process gone, node down, frozen), or alive but
    in another collective (the ranks took different branches: a deadlock). Either way it writes
    ``out_dir/diagnostics/rank_<r>.txt``, prints one line naming that rank and ends the process
    (exit 3: torch's own timeout would only fire after --dist_timeout_minutes, without a name). A
    member that is alive and computing (a straggler, or rank 0 writing a large checkpoint) gets a
    warning and the wait goes on;
  * on SIGUSR2 writes the diagnostics file of its rank and asks every other rank, through the
    store, to write theirs (``kill -USR2 <any rank's pid>`` dumps the whole job). The signal
    reaches the thread through ``signal.set_wakeup_fd``, so it works while the main thread is
    blocked in a collective. SIGUSR2 because SIGTERM and SIGUSR1 mean "preempted" (preemption.py).

A collective that fails (gloo raises when a peer's connection closes: a rank died) is reported the
same way from the main thread: ``report_failure`` waits for the dead rank's heartbeat to go stale
and returns the line naming it; forge-train prints it and exits 3. One survivor per failure reads
the heartbeats and the others take its verdict from the store (verdict.py), so the store serves
O(N) reads per failure, not N per survivor.

File format (text; one section per heading)::

    forge_dist diagnostics: <reason>
    time / rank / host / pid / step / in flight / sequence numbers / verdict
    last collectives (oldest first): #seq group(ranks) op dtype[shape] at file:line in fn  time  state
    python stacks (all threads): faulthandler's dump
"""
from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from forge_dist.train.verdict import POLL_S, failure_key, leased_verdict, read_heartbeats, shared_verdict

DIAGNOSTICS_DIR = "diagnostics"
EXIT_LOST_RANK = 3
DUMP_SIGNAL = "SIGUSR2"


def _store():
    """The c10d store every rank of the run shares, under its own prefix (None without one)."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        return dist.PrefixStore("forge_dist_diagnostics/", dist.distributed_c10d._get_default_store())
    except Exception:  # noqa: BLE001  (a private torch API: no store, no heartbeats)
        return None


class CollectiveFailure(RuntimeError):
    """A collective raised (a peer is gone); the message names the lost rank when it can."""


def straggler_fields(ctx, compute_s: float) -> dict:
    """Metrics of the step just done: each rank's compute time (its step time minus the time spent
    inside collectives, which is mostly waiting for the slowest rank); the slowest rank and its
    time, the median. A collective: every rank calls it at the same logged steps."""
    times = ctx.gather_floats(compute_s)
    slowest = max(range(len(times)), key=times.__getitem__)
    ordered = sorted(times)
    return {"compute_s": times[ctx.rank], "straggler_rank": slowest, "straggler_compute_s": times[slowest],
            "compute_s_median": ordered[len(ordered) // 2]}


class Diagnostics:
    def __init__(self, ctx, out_dir: str, timeout_s: float, debug: bool = False):
        self.ctx, self.recorder = ctx, ctx.recorder
        self.dir = os.path.join(out_dir, DIAGNOSTICS_DIR)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = min(10.0, max(0.5, self.timeout_s / 8))
        self.poll_s = min(1.0, self.heartbeat_s / 2)  # the watchdog's
        self.verdict_wait_s = 4 * self.heartbeat_s + 3  # the judge's reading window, and a margin
        self.host = socket.gethostname()
        self.store = _store() if ctx.distributed else None
        self.step: Optional[int] = None
        self.rank0_host: Optional[str] = self.host if ctx.rank == 0 else None  # read once from its heartbeat
        self.warned: set = set()
        self.requests_seen = 0
        self.steps_seen = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pipe: Optional[Tuple[int, int]] = None
        self._previous: Dict[str, object] = {}
        if self.recorder is not None:
            self.recorder.debug = bool(debug)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Diagnostics":
        if self.recorder is None:  # a single process has no collectives to diagnose
            return self
        self._install_signal()
        self._heartbeat()
        self._learn_rank0_host()
        self._thread = threading.Thread(target=self._watch, name="forge-diagnostics", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous["fd"])
            signal.signal(signal.SIGUSR2, self._previous["handler"] or signal.SIG_DFL)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def __enter__(self) -> "Diagnostics":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _install_signal(self) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR2"):
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._previous["handler"] = signal.signal(signal.SIGUSR2, lambda *a: None)  # the C handler writes w
        self._previous["fd"] = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._pipe = (r, w)

    def at_step(self, it: int) -> None:
        self.step = it
        if self.recorder is not None:
            self.recorder.step = it
            self.steps_seen += 1
            if self.rank0_host is None and self.steps_seen > 1:
                # rank 0 wrote its heartbeat in start(), before its first collective, which every rank
                # has passed by its second step: from then on rank 0's host is known even if the store
                # dies with it (the watchdog thread's reads may all have come too early under load)
                self._learn_rank0_host()

    # --- the watchdog thread --------------------------------------------------------------------
    def _watch(self) -> None:
        poll = self.poll_s
        next_beat = time.time() + self.heartbeat_s
        while not self._stop.is_set():
            if self._pipe is not None:
                ready, _, _ = select.select([self._pipe[0]], [], [], poll)
                if ready and signal.SIGUSR2 in os.read(self._pipe[0], 64):
                    self.dump(f"{DUMP_SIGNAL} received")
                    self._request_all()
            else:
                self._stop.wait(poll)
            try:
                if time.time() >= next_beat:  # the store is shared by every rank: once per interval
                    self._heartbeat()
                    self._check_requests()
                    self._learn_rank0_host()
                    next_beat = time.time() + self.heartbeat_s
                self._check_hang()
            except Exception as e:  # noqa: BLE001  (the watchdog must never kill a healthy run)
                print(f"forge-train: rank {self.ctx.rank}: diagnostics watchdog: {e}", file=sys.stderr, flush=True)

    def _request_all(self) -> None:
        if self.store is not None:
            self.requests_seen = self.store.add("requests", 1)

    def _check_requests(self) -> None:
        if self.store is None:
            return
        n = self.store.add("requests", 0)
        if n > self.requests_seen:
            self.requests_seen = n
            self.dump("diagnostics requested by another rank")

    def _position(self) -> dict:
        _, _, seq = self.recorder.snapshot()
        current = self.recorder.in_flight()
        pos = {"time": time.time(), "step": self.step, "host": self.host, "pid": os.getpid(), "seq": seq}
        if current is not None:
            pos["current"] = {"group": current.group, "seq": current.seq, "op": current.op, "site": current.site}
        return pos

    def _heartbeat(self) -> None:
        if self.store is not None:
            self.store.set(f"hb/{self.ctx.rank}", json.dumps(self._position()))

    def _learn_rank0_host(self) -> None:
        if self.rank0_host is None and self.store is not None and self.store.check(["hb/0"]):
            self.rank0_host = json.loads(self.store.get("hb/0"))["host"]

    # --- verdicts -------------------------------------------------------------------------------
    def missing(self, entry) -> Tuple[List[str], List[str]]:
        """(members that are lost or elsewhere: a reason to stop, members that are only slow)."""
        if self.store is None:
            return [], []
        fatal, slow, now = [], [], time.time()
        for r, hb in read_heartbeats(self.store, [r for r in entry.ranks if r != self.ctx.rank]).items():
            if hb is not None and hb.get("exiting"):
                continue  # it left after losing another rank: the culprit is in the store's "lost"
            if hb is None or now - hb["time"] > 3 * self.heartbeat_s + 1:
                age = "never" if hb is None else f"none for {now - hb['time']:.0f} s"
                host = "" if hb is None else f" on {hb['host']}"
                fatal.append(f"rank {r}{host} did not arrive (heartbeat: {age}; process gone, node down or frozen)")
                continue
            cur = hb.get("current")
            if cur is not None and cur["group"] == entry.group and cur["seq"] == entry.seq:
                continue  # arrived
            if hb["seq"].get(entry.group, 0) >= entry.seq:
                continue  # already past it
            where = (f"waiting in {cur['op']} on {cur['group']} #{cur['seq']} at {cur['site']}" if cur is not None
                     else f"not in a collective, at step {hb['step']}")
            (fatal if cur is not None else slow).append(f"rank {r} on {hb['host']} did not arrive: it is {where}")
        return fatal, slow

    def _blame(self, fatal: List[str]) -> List[str]:
        """The lost ranks the first reporter of the run named (so a rank that left after its peer
        died is not blamed by the ranks waiting for it), ``fatal`` when this rank is the first."""
        if self.store is None:
            return fatal
        if fatal:
            self.store.compare_set("lost", "", json.dumps(fatal))
        return json.loads(self.store.get("lost")) if self.store.check(["lost"]) else []

    def _leave(self) -> None:
        """Mark this rank as leaving on purpose, so no other rank names it as the lost one."""
        if self.store is not None:
            try:
                self.store.set(f"hb/{self.ctx.rank}", json.dumps({**self._position(), "exiting": True}))
            except Exception:  # noqa: BLE001
                pass

    def _check_hang(self) -> None:
        current = self.recorder.in_flight()
        if current is None or time.time() - current.start < self.timeout_s:
            return
        waited = time.time() - current.start
        verdict = self.missing(current) if self.store is None else leased_verdict(
            self.store, failure_key(current, "hung"), self.ctx.rank, lambda: self.missing(current), 3 * self.poll_s + 2)
        if verdict is None:
            return  # the member judging this collective has not published yet (verdict.py)
        fatal, slow = verdict
        fatal = self._blame(fatal)
        head = (f"rank {self.ctx.rank}: {current.op} on {current.group} #{current.seq} (step {self.step}) has waited "
                f"{waited:.0f} s (--collective_timeout_s {self.timeout_s:g})")
        if fatal:
            path = self.dump(f"collective timeout: {'; '.join(fatal)}")
            self._leave()
            print(f"forge-train: {head}: {'; '.join(fatal)}; diagnostics in {path}", file=sys.stderr, flush=True)
            os._exit(EXIT_LOST_RANK)  # the main thread is blocked in C++: nothing else can end it
        key = (current.group, current.seq)
        if key not in self.warned:
            self.warned.add(key)
            path = self.dump(f"slow collective: {'; '.join(slow) or 'every member arrived'}")
            print(f"forge-train: warning: {head}: {'; '.join(slow) or 'waiting for the transport'}; still waiting "
                  f"(diagnostics in {path})", file=sys.stderr, flush=True)

    def failed(self, error: Optional[BaseException] = None) -> bool:
        """Whether a collective of this rank raised (a lost peer, a transport timeout): a recorded
        one, or one outside the recorder (DeepSpeed's own) that ``error`` came from
        (foreign_collectives.py), which is then recorded as the failed one."""
        if self.recorder is None:
            return False
        if self.recorder.failed is None and error is not None:
            from forge_dist.train.foreign_collectives import foreign_failure

            self.recorder.failed = foreign_failure(error, self.ctx.world_size)
        return self.recorder.failed is not None

    def report_failure(self, error: BaseException) -> str:
        """The line naming the lost rank after a collective raised (waits for heartbeats to go stale)."""
        entry = self.recorder.failed if self.recorder is not None else None
        if entry is None:
            return f"rank {self.ctx.rank}: {' '.join(str(error).split())[:300]}"
        fatal: List[str] = []
        if self.store is not None:
            try:  # one judge per failure reads the heartbeats; the others take its verdict (verdict.py)
                fatal = shared_verdict(self.store, failure_key(entry), lambda: self._judge_failure(entry),
                                       self.verdict_wait_s)
                fatal = self._blame([]) if fatal == [] else fatal  # a culprit named since, elsewhere
                if fatal is None:  # the judge died before publishing: judge alone, as every rank once did
                    fatal = self._judge_failure(entry)
            except Exception:  # noqa: BLE001  (the store itself died with its host, rank 0)
                fatal = [f"rank 0{self._rank0_host()} (which hosts the rendezvous store{self._store_address()}) "
                         f"is unreachable: process gone or node down"] if self.ctx.rank else []
        who = "; ".join(fatal) or f"no member's heartbeat stopped (a network failure?): {entry.error}"
        path = self.dump(f"collective failed: {entry.error}; {who}")
        self._leave()
        which = f"#{entry.seq}" if entry.seq else f"at {entry.site}"  # seq 0: a collective outside the recorder
        step = f" (step {self.step})" if self.step is not None else ""
        return (f"rank {self.ctx.rank}: {entry.op} on {entry.group} {which}{step} failed: {who}; "
                f"diagnostics in {path}")

    def _judge_failure(self, entry) -> List[str]:
        """The members of the failed collective whose heartbeat stopped (or the culprit another
        reporter named first), read again every 0.5 s until one goes stale (3 intervals) or that
        long has passed."""
        end = time.time() + 3 * self.heartbeat_s + 2
        while True:
            fatal = self._blame([f for f in self.missing(entry)[0] if "heartbeat" in f])
            if fatal or time.time() >= end:
                return fatal
            time.sleep(POLL_S)

    def _rank0_host(self) -> str:
        """`` on HOST`` for rank 0 (its heartbeat, read while the store lived), else ''."""
        return f" on {self.rank0_host}" if self.rank0_host else ""

    @staticmethod
    def _store_address() -> str:
        try:
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
            while hasattr(store, "underlying_store"):
                store = store.underlying_store
            return f" at {store.host}:{store.port}" if hasattr(store, "host") else ""
        except Exception:  # noqa: BLE001  (a private torch API: the message goes without it)
            return ""

    # --- the file -------------------------------------------------------------------------------
    def dump(self, reason: str) -> str:
        """Write ``diagnostics/rank_<r>.txt`` (atomically) and return its path."""
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"rank_{self.ctx.rank}.txt")
        tmp = f"{path}.tmp-{os.getpid()}"
        _, _, seq = self.recorder.snapshot()
        current = self.recorder.in_flight()
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"forge_dist diagnostics: {reason}\n")
            fh.write(f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\nrank: {self.ctx.rank} of {self.ctx.world_size}\n"
                     f"host: {self.host}\npid: {os.getpid()}\nstep: {self.step}\n")
            fh.write(f"in flight: {current.describe() if current is not None else 'none'}\n")
            failed = self.recorder.failed
            fh.write(f"failed: {failed.describe() if failed is not None else 'none'}\n")
            fh.write("sequence numbers: " + " ".join(f"{g}={n}" for g, n in sorted(seq.items())) + "\n")
            fh.write(f"\nlast collectives (oldest first):\n{self.recorder.format_ring()}\n")
            fh.write("\npython stacks (all threads):\n")
            fh.flush()
            faulthandler.dump_traceback(file=fh, all_threads=True)
        os.replace(tmp, path)
        return path
