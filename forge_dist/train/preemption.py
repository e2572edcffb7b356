"""Graceful stop on a preemption signal: finish the step in flight, checkpoint, exit 0.

Schedulers warn a job before they kill it: SLURM sends SIGTERM at the end of the grace period of
``scancel``/``scontrol requeue`` (and the signal of ``#SBATCH --signal=USR1@60`` ahead of the time
limit), Kubernetes and most clouds send SIGTERM. ``Preemption`` turns SIGTERM and SIGUSR1 into a
request; the trainer asks ``agreed(ctx)`` once per step boundary, a MAX all-reduce of the local
flags, so every rank sees the request at the same iteration even when only one rank (or one node)
got the signal. The trainer then writes the checkpoint of that iteration and returns; forge-train
exits 0 and ``--init_from resume`` continues exactly (the checkpoint records that the evaluation of
its iteration has not run yet, so the resumed run runs it).

The handler only sets a flag (signal handlers run between Python bytecodes in the main thread, so
a rank blocked in a collective notices when it returns); a second signal is logged and changes
nothing. SIGUSR2 is left free for the diagnostics dump (forge_dist.train.diagnostics).
"""
from __future__ import annotations

import signal
import sys
import time
from typing import Optional, Sequence

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preemption:
    """``install()`` the handlers (main thread only; elsewhere it does nothing), ``requested``:
    this rank got a signal, ``agreed(ctx)``: a collective, True on every rank once any rank got
    one. ``close()`` restores the previous handlers."""

    def __init__(self, signals: Sequence[str] = PREEMPT_SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.signal_name: Optional[str] = None  # the first signal received, on this rank
        self.received_at: Optional[float] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self.received_at = name, time.time()
            print(f"forge-train: {name} received: finishing the current step, then saving a checkpoint "
                  f"and exiting", file=sys.stderr, flush=True)
        else:
            print(f"forge-train: {name} received again; already stopping after this step", file=sys.stderr,
                  flush=True)

    def install(self) -> "Preemption":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a trainer run from a worker thread)
                break
        return self

    def close(self) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python (e.g. faulthandler); the
            # default action is the closest we can restore
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, ctx) -> bool:
        """True on every rank if any rank was asked to stop (one 1-element all-reduce)."""
        stop = ctx.any(self.requested)
        if stop and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return stop

    def __enter__(self) -> "Preemption":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()
