"""Moved to ``forge_dist.variants``; this name stays importable (the same module object)."""
import sys

import forge_dist.variants as _moved

sys.modules[__name__] = _moved
