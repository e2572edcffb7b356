"""forge-train with a fault injected, for the failure drills (tests only; never used by forge-train).

    python -m forge_dist.testing.drill --signal KILL --rank 3 --call 7 -- <forge-train options>
    python -m forge_dist.testing.drill --signal KILL --rank 3 --in_save 4 -- <forge-train options>
    python -m forge_dist.testing.drill --signal KILL --rank 0 --in_publish 4 -- <forge-train options>

runs forge-train (forge_dist.train.cli.main) in this process, and on rank ``--rank`` sends itself
``SIG<signal>`` inside the engine's forward-backward call number ``--call`` (1-based: the middle of
iteration ``call - 1`` of a fresh run, or of ``start + call - 1`` of a resumed one), or, with
``--in_save N``, inside the sharded save of iteration N once this rank's shards are written and
before they are hashed and published (with --async_checkpoint: in the background thread, while the
main thread trains on), or, with ``--in_publish N`` (rank 0, which publishes), once the sealed
checkpoint of iteration N is renamed into place and before ``latest`` moves to it. KILL is a crashed rank, STOP a frozen one (a hang: its sockets stay open),
TERM a preemption.
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


def inject_in_save(iteration: int, signum: int) -> None:
    from forge_dist.train.sharded_save import ShardedCheckpointer

    original = ShardedCheckpointer._publish

    def publish(self, files, group, info):
        if info["iteration"] == iteration:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signum)
        return original(self, files, group, info)

    ShardedCheckpointer._publish = publish


def inject_in_publish(iteration: int, signum: int) -> None:
    from forge_dist.io.checkpoint_read import checkpoint_name
    from forge_dist.train import checkpoint

    original = checkpoint._write_pointer

    def write_pointer(root, pointer, name):
        if pointer == "latest" and name == checkpoint_name(iteration):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signum)
        return original(root, pointer, name)

    checkpoint._write_pointer = write_pointer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="forge_dist.testing.drill")
    parser.add_argument("--signal", default="KILL")
    parser.add_argument("--rank", type=int, default=0)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--call", type=int)
    where.add_argument("--in_save", type=int, help="the iteration whose sharded save is interrupted")
    where.add_argument("--in_publish", type=int, help="the iteration whose publish (rank 0) is interrupted")
    parser.add_argument("train", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    from forge_dist.train.cli import main as train_main
    from forge_dist.train.engine import LocalEngine

    if int(os.environ.get("RANK", "0")) == args.rank:
        signum = getattr(signal, "SIG" + args.signal)
        if args.in_save is not None:
            inject_in_save(args.in_save, signum)
        elif args.in_publish is not None:
            inject_in_publish(args.in_publish, signum)
        else:
            inject(LocalEngine, args.call, signum)  # ParallelEngine inherits it
    train = args.train[1:] if args.train[:1] == ["--"] else args.train
    return train_main(train)


if __name__ == "__main__":
    sys.exit(main())
