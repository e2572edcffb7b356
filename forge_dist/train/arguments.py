"""Moved to ``forge_dist.config.arguments``; this name stays importable (the same module object)."""
import sys

import forge_dist.config.arguments as _moved

sys.modules[__name__] = _moved
