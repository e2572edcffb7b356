"""forge-train with a fault injected, for the failure drills (tests only; never used by forge-train).

    python -m forge_dist.testing.drill --signal KILL --rank 3 --call 7 -- <forge-train options>
    python -m forge_dist.testing.drill --signal KILL --rank 0 --at write:4 -- <forge-train options>

runs forge-train (forge_dist.train.cli.main) in this process, and on rank ``--rank`` sends itself
``SIG<signal>`` inside the engine's forward-backward call number ``--call`` (1-based: the middle of
iteration ``call - 1`` of a fresh run, or of ``start + call - 1`` of a resumed one), or, with
``--at POINT:N``, at that point of the checkpoint save of iteration N (forge_dist.testing.kill_points:
``write`` this rank about to write its shards, ``save`` its shards written, ``seal`` rank 0 about
to seal and rename, ``publish`` renamed but ``latest`` not moved, ``published`` ``latest`` moved;
with --async_checkpoint the first three happen in the background thread while the main thread
trains on). KILL is a crashed rank, STOP a frozen one (a hang: its sockets stay open), TERM a
preemption.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def inject(engine_cls, call: int, signum: int) -> None:
    original, calls = engine_cls.forward_backward, []

    def forward_backward(self, micro_batches):
        calls.append(1)
        if len(calls) == call:
            _signal_self(signum)
        return original(self, micro_batches)

    engine_cls.forward_backward = forward_backward


def _signal_self(signum: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


def main(argv=None) -> int:
    from forge_dist.testing.kill_points import POINTS, arm

    parser = argparse.ArgumentParser(prog="forge_dist.testing.drill")
    parser.add_argument("--signal", default="KILL")
    parser.add_argument("--rank", type=int, default=0)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--call", type=int)
    where.add_argument("--at", metavar="POINT:N", help=f"a point of the save of iteration N: {', '.join(POINTS)}")
    parser.add_argument("train", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    from forge_dist.train.cli import main as train_main
    from forge_dist.train.engine import LocalEngine

    if int(os.environ.get("RANK", "0")) == args.rank:
        signum = getattr(signal, "SIG" + args.signal)
        if args.at is not None:
            point, _, iteration = args.at.partition(":")
            arm(point, int(iteration), lambda: _signal_self(signum))
        else:
            inject(LocalEngine, args.call, signum)  # ParallelEngine inherits it
    train = args.train[1:] if args.train[:1] == ["--"] else args.train
    return train_main(train)


if __name__ == "__main__":
    sys.exit(main())
