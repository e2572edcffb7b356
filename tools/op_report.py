"""python tools/op_report.py: the same as the forge-ops-report console script."""
from forge_dist.ops.report import main

if __name__ == "__main__":
    raise SystemExit(main())
