"""A rank lost during one of DeepSpeed's own collectives, for the failure drills (tests only).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python -m forge_dist.testing.lost_peer --dies 0 OUT

Each rank joins an env:// gloo world (the rendezvous store on rank 0, as under any launcher),
starts forge-train's diagnostics (heartbeats on that store), and waits one heartbeat interval;
rank ``--dies`` then SIGKILLs itself while the other enters ``deepspeed.comm.all_reduce``, which
bypasses forge_dist's flight recorder. The survivor prints the line forge-train would print for
the gloo error it gets (train/foreign_collectives.py and Diagnostics.report_failure) and exits 3.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="forge_dist.testing.lost_peer")
    parser.add_argument("--dies", type=int, required=True)
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch
    import torch.distributed as dist

    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import skip_shm_build
    from forge_dist.train.diagnostics import EXIT_LOST_RANK, Diagnostics

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    diagnostics = Diagnostics(RunContext(rank=rank, world_size=world), args.out_dir, timeout_s=4.0).start()
    dist.barrier()
    time.sleep(3 * diagnostics.heartbeat_s)  # the watchdog has beaten and read rank 0's host
    if rank == args.dies:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    try:
        ds_comm.all_reduce(torch.ones(4))
    except Exception as e:  # what Trainer.fit does with it
        if not diagnostics.failed(e):
            raise
        print(f"forge-train: error: {diagnostics.report_failure(e)}", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_RANK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
