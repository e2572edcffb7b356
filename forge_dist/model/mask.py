"""Moved to ``forge_dist.ops.mask``; this name stays importable (the same module object)."""
import sys

import forge_dist.ops.mask as _moved

sys.modules[__name__] = _moved
