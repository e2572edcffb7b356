"""forge-train with a fault injected, for the failure drills (tests only; never used by forge-train).

    python -m forge_dist.testing.drill --signal KILL --rank 3 --call 7 -- <forge-train options>

runs forge-train (forge_dist.train.cli.main) in this process, and on rank ``--rank`` sends itself
``SIG<signal>`` inside the engine's forward-backward call number ``--call`` (1-based: the middle of
iteration ``call - 1`` of a fresh run, or of ``start + call - 1`` of a resumed one). KILL is a
crashed rank, STOP a frozen one (a hang: its sockets stay open), TERM a preemption.
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
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signum)
        return original(self, micro_batches)

    engine_cls.forward_backward = forward_backward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="forge_dist.testing.drill")
    parser.add_argument("--signal", default="KILL")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--call", type=int, required=True)
    parser.add_argument("train", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    from forge_dist.train.cli import main as train_main
    from forge_dist.train.engine import LocalEngine

    if int(os.environ.get("RANK", "0")) == args.rank:
        inject(LocalEngine, args.call, getattr(signal, "SIG" + args.signal))  # ParallelEngine inherits it
    train = args.train[1:] if args.train[:1] == ["--"] else args.train
    return train_main(train)


if __name__ == "__main__":
    sys.exit(main())
