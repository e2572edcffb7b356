"""Same as the `forge-prepare` console script: text files or a ReaLLM-Forge folder -> token shards."""
import sys

from forge_dist.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
