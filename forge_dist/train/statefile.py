"""Moved to ``forge_dist.io.statefile``; this name stays importable (the same module object)."""
import sys

import forge_dist.io.statefile as _moved

sys.modules[__name__] = _moved
