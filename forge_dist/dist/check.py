"""Launch check: ``<launcher> python -m forge_dist.dist.check`` initialises from the launcher's
environment, all-reduces (rank + 1) and prints one JSON line per rank, e.g.
{"launcher": "mpirun", "rank": 1, "world_size": 2, "backend": "gloo", "sum": 3.0, "expected": 3.0}.
Exits non-zero when the sum is wrong. Used by the launch tests and as a preflight on a cluster."""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from forge_dist.dist.init import init_distributed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout_minutes", type=float, default=2.0)
    parser.add_argument("--init_method", default=None, help="e.g. file:///shared/dir/rdzv (default env://)")
    args = parser.parse_args(argv)
    ctx = init_distributed(timeout_minutes=args.timeout_minutes, init_method=args.init_method)
    t = torch.tensor([ctx.rank + 1.0], device=ctx.device)
    dist.all_reduce(t)
    n = ctx.world_size
    report = {"launcher": ctx.env.launcher, "rank": ctx.rank, "world_size": n, "local_rank": ctx.local_rank,
              "backend": ctx.backend, "master_addr": ctx.env.master_addr, "sum": t.item(),
              "expected": n * (n + 1) / 2}
    sys.stdout.write(json.dumps(report) + "\n")  # one write: lines of concurrent ranks stay whole
    sys.stdout.flush()
    ctx.destroy()
    return 0 if report["sum"] == report["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
