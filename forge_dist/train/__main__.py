"""``python -m forge_dist.train`` is ``forge-train``."""
import sys

from forge_dist.train.cli import main

sys.exit(main())
