#!/usr/bin/env python
"""Convert checkpoints between forge_dist and ReaLLM-Forge formats (same as `forge-convert`).

    python tools/convert_checkpoint.py SRC DST --to {forge,reallm-forge}
"""
import sys

from forge_dist.io.convert import main

if __name__ == "__main__":
    sys.exit(main())
