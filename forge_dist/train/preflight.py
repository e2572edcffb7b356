"""``forge-preflight``: the command-line entry of forge_dist.dist.preflight.

It lives in train/ because it resolves the options and starts the launch exactly as forge-train
does (``train.cli.run_launched``); the checks themselves stay in dist/, below the trainer.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from forge_dist.dist.preflight import __doc__ as PREFLIGHT_DOC
from forge_dist.dist.preflight import run_preflight


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``forge-preflight [--bandwidth_mb M] [--min_free_gb G] <forge-train options>``, under any
    launcher: validates like forge-train, then runs the preflight instead of training."""
    import argparse

    from forge_dist.train.cli import run_launched

    parser = argparse.ArgumentParser(prog="forge-preflight", description=PREFLIGHT_DOC, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth_mb", type=float, default=8.0, help="all-reduce size for the bandwidth (MiB)")
    parser.add_argument("--min_free_gb", type=float, default=1.0, help="free disk out_dir needs on every rank")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nAll other options are forge-train's (forge-train --help); they select the layout, "
              "the configuration that is hashed and out_dir.")
        return 0
    return run_launched(rest, prog="forge-preflight",
                        body=lambda ctx, resolved, launch: run_preflight(
                            ctx, resolved.values, resolved.train_cfg.out_dir, own.bandwidth_mb, own.min_free_gb,
                            launch.env.local_rank))


if __name__ == "__main__":
    sys.exit(main())
