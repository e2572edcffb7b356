"""``<launcher> python -m forge_dist.testing.rank_exit RANK=STATUS ...``: each rank finds its rank the
way forge-train does (forge_dist.dist.env, no process group) and exits with the status given for it
(0 otherwise, after a second, so a launcher that reported the first or the last rank to end would
be caught). Used to check that a launcher's exit status is its worst rank's."""
import sys
import time

from forge_dist.dist.env import detect_launch_env


def main(argv=None) -> int:
    wanted = dict(item.split("=", 1) for item in (sys.argv[1:] if argv is None else argv))
    rank = detect_launch_env().rank
    status = int(wanted.get(str(rank), 0))
    if status == 0:
        time.sleep(1.0)
    print(f"rank {rank} exits {status}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
